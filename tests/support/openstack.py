"""Real OpenStack servers for the tests: Glance and Keystone from PyPI, under gunicorn, on sqlite.

Each runs from its own virtualenv (`.venv-glance`, `.venv-keystone`, made by `scripts/test`
through `ensure_all_venvs`), so their pins never fight the project's.

Fixtures (session-scoped; each server starts once, on free loopback ports):

- `glance_noauth`: a `GlanceServer` without Keystone (no paste flavor): every request is
  accepted as an admin of no project. `glance_noauth.url` is its unversioned endpoint, the
  way a catalog lists it.
- `keystone_glance`: a `KeystoneGlance`: a Keystone (fernet tokens, `admin` / `ADMIN_PASSWORD`
  in project `admin`, domain `Default`, region `RegionOne`, one public identity endpoint) and a
  Glance that authenticates tokens against it, registered in Keystone's catalog as the `image`
  service so openstacksdk finds it. `keystone_glance.member` is a second user with only the
  `member` role in `admin` (for policy refusals); `admin_token()`, `openrc(path)` and
  `application_credential(name)` give the other ways in.
- `openstack_templates`: synced databases and keys, kept in .pytest_cache across sessions, so
  a server starts in seconds (db_sync and bootstrap take ten or more).

Glance serves one request at a time (see `GlanceServer.spawn`): a request sent while an upload
is under way waits for it. `download_image()` fetches what Glance stored; `make_qcow2()` makes
a real QCOW2 (Glance checks the bytes against `disk_format`).

Start-up facts this module relies on (Glance 33, Keystone 30, gunicorn 27):

- the Glance app `glance.wsgi.api:application` reads `$OS_GLANCE_CONFIG_DIR/glance-api.conf`
  and `glance-api-paste.ini` (copied from the venv's etc/glance/); `glance-manage db_sync` first;
- gunicorn 27 wants `--no-control-socket` (several instances would share one socket path);
- without Keystone, `[oslo_policy] enforce_new_defaults = false`, or every call is refused;
- Keystone's app parses `sys.argv` (gunicorn's) with oslo.config, so it is loaded through a
  two-line wrapper module that resets `sys.argv` first;
- Glance's `keystone_authtoken` needs `interface = public`: bootstrap made only that endpoint.

Readiness is polled with a deadline; a server that dies or does not answer fails the fixture
with the tail of its log. Processes run in their own process group, killed at teardown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GLANCE_VENV = ROOT / ".venv-glance"
KEYSTONE_VENV = ROOT / ".venv-keystone"
ADMIN_PASSWORD = "admin-secret"  # the Keystone bootstrap admin's
MEMBER_PASSWORD = "member-secret"
REGION = "RegionOne"
START_DEADLINE_S = 60.0
TEMPLATE_AUTH_URL = "http://127.0.0.1:1/v3"  # in a template's catalog; replaced at start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _venv_bin(venv: Path, name: str) -> Path:
    path = venv / "bin" / name
    if not path.exists():
        raise RuntimeError(f"{path} is missing: run scripts/test, which creates {venv.name}")
    return path


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _run(*cmds: list[str | Path], log: Path, env: dict[str, str] | None = None) -> None:
    """Run set-up commands in parallel, their output appended to `log`; fail with its tail."""
    with open(log, "ab") as out:
        procs = [
            subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=env)
            for cmd in cmds
        ]
        codes = [proc.wait(timeout=120) for proc in procs]
    for cmd, code in zip(cmds, codes, strict=True):
        if code != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd[-2:]))} failed:\n{log_tail(log)}")


class ServerProcess:
    """One gunicorn server: started in its own process group, polled until it answers."""

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, cmd: list[str | Path], env: dict[str, str], ready_url: str) -> None:
        self.spawn(cmd, env)
        self.wait_ready(ready_url)

    def spawn(self, cmd: list[str | Path], env: dict[str, str]) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(c) for c in cmd],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def wait_ready(self, ready_url: str) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{log_tail(self.log)}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as response:
                    response.read()
                    return
            except urllib.error.HTTPError:
                return  # it answers; a 300 or 401 on the root is an answer
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"{self.name} did not answer within {START_DEADLINE_S:.0f} s:\n{log_tail(self.log)}"
        )

    def stop(self) -> None:
        if self.proc is None:
            return
        # The whole group at once: a throw-away server keeps nothing worth a graceful stop,
        # and gunicorn's own quick shutdown still takes seconds.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None


def _gunicorn(venv: Path, port: int, app: str, *extra: str, threads: int = 4) -> list[str | Path]:
    return [
        _venv_bin(venv, "gunicorn"),
        "--no-control-socket",
        "--workers", "1",
        "--threads", str(threads),
        "--timeout", "600",
        "--bind", f"127.0.0.1:{port}",
        *extra,
        app,
    ]  # fmt: skip


def _clean_env(**extra: str) -> dict[str, str]:
    # No proxy either: every server here is on loopback, and Glance's web-download would
    # send its fetch of the origin through an inherited http_proxy.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OS_", "PYTHON")) and not k.lower().endswith("_proxy")
    }
    env["PYTHONWARNINGS"] = "ignore"  # their deprecation noise would bury the real errors
    env.update(extra)
    return env


@dataclasses.dataclass
class KeystoneAuth:
    """What Glance needs to check tokens against a Keystone."""

    auth_url: str
    username: str = "admin"
    password: str = ADMIN_PASSWORD
    project_name: str = "admin"


class GlanceServer:
    """A Glance API with the file store and sqlite, in `directory`."""

    def __init__(
        self,
        directory: Path,
        *,
        keystone: KeystoneAuth | None = None,
        port: int | None = None,
        extra_conf: str = "",
    ) -> None:
        self.dir = directory
        self.keystone = keystone
        self.port = port or free_port()
        self.extra_conf = extra_conf
        self.images_dir = directory / "images"
        self.log = directory / "glance.log"
        self.process = ServerProcess("glance", self.log)

    @property
    def url(self) -> str:
        """The unversioned endpoint, as a catalog lists it."""
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> None:
        for sub in ("images", "staging", "tasks"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(GLANCE_VENV / "etc" / "glance" / "glance-api-paste.ini", self.dir)
        if self.keystone:
            ks = self.keystone
            auth = f"""
[paste_deploy]
flavor = keystone
[keystone_authtoken]
www_authenticate_uri = {ks.auth_url}
auth_url = {ks.auth_url}
auth_type = password
project_domain_name = Default
user_domain_name = Default
project_name = {ks.project_name}
username = {ks.username}
password = {ks.password}
interface = public
region_name = {REGION}
"""
        else:
            auth = ""
        (self.dir / "glance-api.conf").write_text(
            f"""[DEFAULT]
enabled_backends = fs:file
[database]
connection = sqlite:///{self.dir}/glance.sqlite
[glance_store]
default_backend = fs
[fs]
filesystem_store_datadir = {self.images_dir}
[os_glance_staging_store]
filesystem_store_datadir = {self.dir}/staging
[os_glance_tasks_store]
filesystem_store_datadir = {self.dir}/tasks
[oslo_policy]
enforce_new_defaults = false
{auth}
{self.extra_conf}
"""
        )

    def start(self, template: Path | None = None) -> None:
        """Start, with a copy of `template`'s synced database when given: seconds saved."""
        self.spawn(template)
        self.wait_ready()

    def spawn(self, template: Path | None = None) -> None:
        """Start the process without waiting for it to answer."""
        self.write_config()
        env = _clean_env(OS_GLANCE_CONFIG_DIR=str(self.dir))
        if template is not None:
            shutil.copy(template / "glance.sqlite", self.dir)
        else:
            conf = self.dir / "glance-api.conf"
            _run([_venv_bin(GLANCE_VENV, "glance-manage"), "--config-file", conf, "db_sync"],
                 log=self.log, env=env)  # fmt: skip
        # One request at a time: Glance on sqlite is not safe for concurrent writers (an aborted
        # upload's clean-up and a DELETE of the same image fail with "database is locked").
        # Production Glance runs on MySQL; here a request waits for the one before it.
        app = "glance.wsgi.api:application"
        self.process.spawn(_gunicorn(GLANCE_VENV, self.port, app, threads=1), env)

    def wait_ready(self) -> None:
        self.process.wait_ready(f"{self.url}/versions")

    def stop(self) -> None:
        self.process.stop()


_KEYSTONE_APP = """\
# Keystone's app parses sys.argv with oslo.config; under gunicorn that is gunicorn's own.
import sys

sys.argv = sys.argv[:1]
from keystone.wsgi.api import application  # noqa: E402,F401
"""


class KeystoneServer:
    """A Keystone with fernet tokens and sqlite, bootstrapped with an admin, in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.log = directory / "keystone.log"
        self.process = ServerProcess("keystone", self.log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth_url(self) -> str:
        return f"{self.url}/v3"

    def write_config(self, directory: Path) -> Path:
        conf = directory / "keystone.conf"
        # bcrypt's fewest rounds: every token request hashes the password once.
        conf.write_text(
            f"""[database]
connection = sqlite:///{directory}/keystone.sqlite
[identity]
password_hash_rounds = 4
[token]
provider = fernet
[fernet_tokens]
key_repository = {directory}/fernet-keys
[fernet_receipts]
key_repository = {directory}/fernet-keys
[credential]
key_repository = {directory}/credential-keys
"""
        )
        return conf

    def bootstrap(self, directory: Path, auth_url: str) -> None:
        """Make the database, the keys and the admin, with `auth_url` as identity endpoint."""
        directory.mkdir(parents=True, exist_ok=True)
        conf = self.write_config(directory)
        manage = [_venv_bin(KEYSTONE_VENV, "keystone-manage"), "--config-file", conf]
        env = _clean_env()
        owner = ["--keystone-user", "root", "--keystone-group", "root"]
        # Independent steps in parallel: each keystone-manage spends seconds importing.
        _run(
            [*manage, "db_sync"],
            [*manage, "fernet_setup", *owner],
            [*manage, "credential_setup", *owner],
            log=self.log,
            env=env,
        )
        _run(
            [*manage, "bootstrap", "--bootstrap-password", ADMIN_PASSWORD,
             "--bootstrap-public-url", auth_url, "--bootstrap-region-id", REGION],
            log=self.log,
            env=env,
        )  # fmt: skip

    def start(self, template: Path | None = None) -> None:
        """Start, from a copy of `template` (made by `bootstrap`) when given: seconds saved."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if template is None:
            self.bootstrap(self.dir, self.auth_url)
        else:
            for name in ("fernet-keys", "credential-keys"):
                shutil.copytree(template / name, self.dir / name)
            shutil.copy(template / "keystone.sqlite", self.dir)
            with contextlib.closing(sqlite3.connect(self.dir / "keystone.sqlite")) as db, db:
                db.execute("UPDATE endpoint SET url = ? WHERE url = ?",
                           (self.auth_url, TEMPLATE_AUTH_URL))  # fmt: skip
        conf = self.write_config(self.dir)
        (self.dir / "keystone_app.py").write_text(_KEYSTONE_APP)
        self.process.start(
            _gunicorn(KEYSTONE_VENV, self.port, "keystone_app:application",
                      "--pythonpath", str(self.dir)),
            _clean_env(OS_KEYSTONE_CONFIG_FILES=str(conf)),
            self.auth_url,
        )  # fmt: skip

    def stop(self) -> None:
        self.process.stop()


class _Identity:
    """Just enough of Keystone's v3 API, with an admin token, to set up the catalog and users."""

    def __init__(self, auth_url: str) -> None:
        self.auth_url = auth_url
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": "admin",
                            "domain": {"id": "default"},
                            "password": ADMIN_PASSWORD,
                        }
                    },
                },
                "scope": {"project": {"name": "admin", "domain": {"id": "default"}}},
            }
        }
        request = urllib.request.Request(
            f"{auth_url}/auth/tokens",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            self.token = response.headers["X-Subject-Token"]
            self.user_id = json.loads(response.read())["token"]["user"]["id"]

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"{self.auth_url}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "X-Auth-Token": self.token},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
        return json.loads(text) if text else {}

    def add_image_service(self, glance_url: str) -> None:
        service = self.call("POST", "/services", {"service": {"type": "image", "name": "glance"}})
        endpoint = {
            "service_id": service["service"]["id"],
            "interface": "public",
            "url": glance_url,
            "region_id": REGION,
        }
        self.call("POST", "/endpoints", {"endpoint": endpoint})

    def add_member(self, name: str, password: str) -> None:
        """A user with only the `member` role in project `admin`."""
        user = self.call(
            "POST", "/users", {"user": {"name": name, "password": password, "domain_id": "default"}}
        )["user"]
        project = self.call("GET", "/projects?name=admin")["projects"][0]
        role = self.call("GET", "/roles?name=member")["roles"][0]
        self.call("PUT", f"/projects/{project['id']}/users/{user['id']}/roles/{role['id']}")


@dataclasses.dataclass
class KeystoneGlance:
    """A Keystone and a Glance behind it; the credentials a registrar would be given."""

    keystone: KeystoneServer
    glance: GlanceServer
    username: str = "admin"
    password: str = ADMIN_PASSWORD
    project_name: str = "admin"
    user_domain_name: str = "Default"
    project_domain_name: str = "Default"
    region: str = REGION
    member: str = "member"
    member_password: str = MEMBER_PASSWORD

    @property
    def auth_url(self) -> str:
        return self.keystone.auth_url

    @property
    def glance_url(self) -> str:
        return self.glance.url

    def admin_token(self) -> str:
        """A fresh admin token, for the tests' own requests to Glance."""
        return _Identity(self.auth_url).token

    def application_credential(self, name: str) -> tuple[str, str]:
        """Create an application credential of the admin's; return its (id, secret)."""
        identity = _Identity(self.auth_url)
        made = identity.call(
            "POST",
            f"/users/{identity.user_id}/application_credentials",
            {"application_credential": {"name": name}},
        )["application_credential"]
        return made["id"], made["secret"]

    def openrc(self, path: Path, *, password: str | None = None) -> Path:
        """Write an admin-openrc.sh as Keystone's install guide has it; return its path."""
        path.write_text(
            f"""export OS_PROJECT_DOMAIN_NAME={self.project_domain_name}
export OS_USER_DOMAIN_NAME={self.user_domain_name}
export OS_PROJECT_NAME={self.project_name}
export OS_USERNAME={self.username}
export OS_PASSWORD={password or self.password}
export OS_AUTH_URL={self.auth_url}
export OS_IDENTITY_API_VERSION=3
export OS_IMAGE_API_VERSION=2
export OS_REGION_NAME={self.region}
"""
        )
        return path


def _template(cache: Path, kind: str, pins: Path, build: Callable[[Path], None]) -> Path:
    """A directory `build` made once per server version, reused by later sessions."""
    key = hashlib.sha1(pins.read_bytes() + TEMPLATE_AUTH_URL.encode()).hexdigest()[:12]
    done = cache / f"{kind}-{key}"
    if not done.is_dir():
        work = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=cache))
        build(work)
        with contextlib.suppress(OSError):  # another session made it first: theirs will do
            work.rename(done)
    return done


@pytest.fixture(scope="session")
def openstack_templates(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Synced databases and keys, kept in pytest's cache (.pytest_cache) across sessions."""
    cache_plugin = getattr(pytestconfig, "cache", None)
    if cache_plugin is not None:
        cache = Path(cache_plugin.mkdir("openstack-templates"))
    else:
        cache = tmp_path_factory.mktemp("openstack-templates")

    def build_glance(work: Path) -> None:
        server = GlanceServer(work)
        server.write_config()
        env = _clean_env(OS_GLANCE_CONFIG_DIR=str(work))
        manage = _venv_bin(GLANCE_VENV, "glance-manage")
        _run([manage, "--config-file", work / "glance-api.conf", "db_sync"], log=server.log,
             env=env)  # fmt: skip

    def build_keystone(work: Path) -> None:
        KeystoneServer(work).bootstrap(work, TEMPLATE_AUTH_URL)

    return {
        "glance": _template(cache, "glance", _venv_bin(GLANCE_VENV, "../.installed"), build_glance),
        "keystone": _template(
            cache, "keystone", _venv_bin(KEYSTONE_VENV, "../.installed"), build_keystone
        ),
    }


@pytest.fixture(scope="session")
def glance_noauth(
    tmp_path_factory: pytest.TempPathFactory, openstack_templates: dict[str, Path]
) -> Iterator[GlanceServer]:
    server = GlanceServer(tmp_path_factory.mktemp("glance-noauth"))
    try:
        server.start(openstack_templates["glance"])
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def keystone_glance(
    tmp_path_factory: pytest.TempPathFactory, openstack_templates: dict[str, Path]
) -> Iterator[KeystoneGlance]:
    keystone = KeystoneServer(tmp_path_factory.mktemp("keystone"))
    glance = GlanceServer(
        tmp_path_factory.mktemp("glance-keystone"),
        keystone=KeystoneAuth(auth_url=keystone.auth_url),
    )
    try:
        # Both load at once; Glance asks Keystone nothing until the first request.
        glance.spawn(openstack_templates["glance"])
        keystone.start(openstack_templates["keystone"])
        identity = _Identity(keystone.auth_url)
        identity.add_image_service(glance.url)
        identity.add_member("member", MEMBER_PASSWORD)
        glance.wait_ready()
        yield KeystoneGlance(keystone=keystone, glance=glance)
    finally:
        glance.stop()
        keystone.stop()


def make_qcow2(path: Path, payload: bytes, *, virtual_size: str = "4M") -> Path:
    """Write a real QCOW2 (Glance checks that `qcow2` bytes are one) whose first guest bytes
    are `payload`, with `qemu-img` from Debian's qemu-utils; return `path`."""
    raw = path.with_suffix(".raw")
    raw.write_bytes(payload)
    subprocess.run(["qemu-img", "resize", "-f", "raw", str(raw), virtual_size],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
                   check=True, capture_output=True)  # fmt: skip
    raw.unlink()
    return path


def download_image(glance_url: str, image_id: str, token: str | None = None) -> bytes:
    """The bytes Glance stored for an image (give a token when Glance is behind Keystone)."""
    headers = {"X-Auth-Token": token} if token else {}
    request = urllib.request.Request(f"{glance_url}/v2/images/{image_id}/file", headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read()
