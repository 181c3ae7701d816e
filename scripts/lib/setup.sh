# Shared set-up for scripts/test, scripts/demo and scripts/bench (sourced, not run).

# Debian packages the project needs at run and test time.
SYSTEM_PACKAGES=(
    fuse3 libfuse3-dev pkg-config   # FUSE, and what pyfuse3 builds against
    gcc python3-dev                 # pyfuse3 has no wheel: it compiles
    nginx-light                     # the real HTTP origin
    e2fsprogs                       # mkfs.ext4 -d builds realistic images
    attr file curl                  # getfattr, file(1), curl for tests and the demo
    bzip2 xz-utils ncompress        # compressed ZFILESYSTEM variants
    systemd                         # systemd-analyze verify of our units
    rclone httpdirfs                # competitors measured by benchmarks/bench_read.py
    openssl                         # the euca2ools pipeline measured by benchmarks/bench_bundle.py
    openjdk-17-jdk-headless         # the ORCA client (Java) whose log lines the tests check
    qemu-utils                      # qemu-img: real qcow2 images for the QCOW2 tests
)

ensure_system_packages() {
    local missing=() pkg
    for pkg in "${SYSTEM_PACKAGES[@]}"; do
        [[ $pkg == \#* ]] && continue
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        echo "installing system packages: ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# ensure_venv EXTRAS: create .venv if needed; reinstall only when pyproject.toml changed.
ensure_venv() {
    local extras=$1 stamp=.venv/.installed
    local want
    want="$(sha1sum pyproject.toml | cut -d' ' -f1) $extras"
    if [[ ! -x .venv/bin/python ]]; then
        python3 -m venv .venv
    fi
    if [[ ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
        echo "installing the project into .venv ($extras)" >&2
        .venv/bin/python -m pip install -q --upgrade pip >/dev/null
        .venv/bin/python -m pip install -q -e ".[$extras]"
        echo "$want" >"$stamp"
    fi
}

# OpenStack test servers (issue 15): Glance and Keystone from PyPI, each in its own virtualenv so
# their pins (oslo.*, SQLAlchemy, ...) never fight the project's. Reinstalled only when a pin changes.
GLANCE_PINS=(glance==33.0.0 gunicorn==27.0.1)
KEYSTONE_PINS=(keystone==30.0.0 gunicorn==27.0.1)

# ensure_server_venv DIR PIN...: create DIR with exactly these pins, cached by a stamp file.
ensure_server_venv() {
    local dir=$1 stamp=$1/.installed want
    shift
    want="$*"
    if [[ -x $dir/bin/python && -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
        return
    fi
    echo "installing $want into $dir" >&2
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$dir/bin/python" -m pip install -q "$@"
    echo "$want" >"$stamp"
}

# ensure_all_venvs EXTRAS: .venv and both server venvs at once. Each install is mostly one pip
# process on one core, so on a fresh machine running them side by side saves about a minute of CI.
# Each one's output goes to a log that is shown only when it fails.
ensure_all_venvs() {
    local extras=$1 logs name failed=0
    logs=$(mktemp -d)
    ensure_venv "$extras" >"$logs/project" 2>&1 &
    local project=$!
    ensure_server_venv .venv-glance "${GLANCE_PINS[@]}" >"$logs/glance" 2>&1 &
    local glance=$!
    ensure_server_venv .venv-keystone "${KEYSTONE_PINS[@]}" >"$logs/keystone" 2>&1 &
    local keystone=$!
    for name in project glance keystone; do
        if ! wait "${!name}"; then
            echo "setting up the $name virtualenv failed:" >&2
            cat "$logs/$name" >&2
            failed=1
        else
            cat "$logs/$name" >&2   # the one-line "installing ..." notes, if any
        fi
    done
    rm -rf "$logs"
    return "$failed"
}
