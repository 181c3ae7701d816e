"""ImageProxy end to end on one machine: what `scripts/demo` runs once the venv is ready.

It builds a sample image set (an ext4 filesystem gzipped as ZFILESYSTEM, a kernel, a ramdisk
and the metadata XML naming their SHA-1s), serves it from a local nginx, starts moto's server
as the stand-in Eucalyptus (S3 + EC2), writes one config file, mounts imgstore, starts the
registrar, and sends the very SOAP 1.1 request ORCA's Axis2 stub sends. It prints the answer,
the mount, and the cloud's view; sends the same request again to show it is answered from the
registry; and tears everything down, also on Ctrl-C, SIGTERM or failure.

`scripts/demo openstack` does the same against a real Glance (without Keystone) instead of
moto, with a QCOW2 in the image set too, and shows each image as `openstack image show` would;
`demo_glance.py` holds that part.

Every process it starts listens on 127.0.0.1 only; everything lives in one temporary
directory, removed at the end (`--keep` leaves it, with the logs, for a look afterwards).

Exit codes: 0 the demo ran; 1 a step failed (the message names it, and the tail of the
failing daemon's log follows); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gzip
import hashlib
import http.client
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from xml.sax.saxutils import escape

import demo_glance  # beside this file, which Python puts first on sys.path

BIN = Path(sys.executable).parent  # the venv's console scripts sit beside its python
NGINX = "/usr/sbin/nginx"
SERVICE_PATH = "/axis2/services/IMAGEPROXY"
ORCA_NS = "http://imageproxy.orca"
SOAP11_NS = "http://schemas.xmlsoap.org/soap/envelope/"
ACCOUNT_ID = "123456789012"  # moto's default account: the manifest's <user>
BUCKET = "imageproxy-demo"
LOG_TAIL_LINES = 30
_LISTENING = re.compile(r"SOAP service listening on (http://[^\s/]+)")


class DemoError(Exception):
    """Raised when a step fails; `log` is the daemon log that explains it, if any."""

    def __init__(self, message: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.log = log


class Interrupted(BaseException):
    """Raised from a signal handler so that teardown runs on SIGTERM and SIGHUP too."""


# --- output ---

_T0 = time.monotonic()


def section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(3, 74 - len(title)), flush=True)


def say(text: str = "") -> None:
    print(text, flush=True)


def show_command(cmd: list[str], cwd: Path | None = None) -> str:
    """Run a read-only command, print it with its output, and return the output."""
    say("$ " + " ".join(cmd))
    # Wide enough for rich's tables (imgstore ls, registrar list) to keep SHA-1s on one line.
    env = {**os.environ, "COLUMNS": "200"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd, env=env)
    out = (res.stdout + res.stderr).rstrip()
    if out:
        say(out)
    if res.returncode != 0:
        raise DemoError(f"`{' '.join(cmd)}` failed with exit code {res.returncode}")
    return res.stdout


def show_metrics(url: str) -> dict[str, float]:
    """Print a daemon's /metrics without comments, creation times and buckets; return them."""
    say(f"$ curl -s {url} | grep -v -e '^#' -e _created -e _bucket")
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("#") and "_created" not in line and "_bucket" not in line:
            say(line)
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:])


def wait_for(
    what: str, ready: Callable[[], bool], deadline_s: float, proc: Daemon | None = None
) -> None:
    """Poll `ready()` until true; fail if `proc` dies or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while not ready():
        if proc is not None and proc.proc.poll() is not None:
            raise DemoError(f"{proc.name} exited with code {proc.proc.returncode}", proc.log)
        if time.monotonic() > deadline:
            raise DemoError(
                f"{what} not ready after {deadline_s:.0f} s", proc.log if proc else None
            )
        time.sleep(0.05)


# --- processes ---


@dataclass
class Daemon:
    """A process we started, in its own session (so a terminal's Ctrl-C reaches only us)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(
        cls,
        track: list[Daemon],
        name: str,
        cmd: list[str],
        log: Path,
        env: dict[str, str] | None = None,
    ) -> Daemon:
        """Start `cmd`, appending it to `track` at once, so teardown stops it even if it is
        interrupted while waiting for the daemon to become ready."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        daemon = cls(name, proc, log)
        track.append(daemon)
        return daemon

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(grace_s)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> int:
    """Status of a GET, or 0 when nothing answers yet."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


# --- the sample image set ---


@dataclass
class Part:
    type: str
    name: str
    sha1: str
    size: int


@dataclass
class ImageSet:
    metadata_name: str
    metadata_sha1: str
    parts: list[Part] = field(default_factory=list)
    filesystem_sha1: str = ""  # of the ext4 filesystem itself, once decompressed


def sha1_of(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _populate(src: Path) -> None:
    """A small tree that looks like a guest's root filesystem."""
    rng = random.Random(2011)
    (src / "etc").mkdir(parents=True)
    (src / "etc/hostname").write_text("imageproxy-demo\n")
    (src / "etc/os-release").write_text('PRETTY_NAME="ImageProxy demo guest"\nID=demo\n')
    (src / "etc/motd").write_text("Registered by ImageProxy, served lazily by imgstore.\n")
    (src / "usr/bin").mkdir(parents=True)
    (src / "usr/bin/hello").write_bytes(rng.randbytes(512 * 1024))
    (src / "var/log").mkdir(parents=True)
    words = ["boot", "eth0", "up", "dhcp", "lease", "ok", "sshd", "listening", "cloud-init"]
    lines = (
        f"Nov 23 12:{i // 60 % 60:02d}:{i % 60:02d} demo " + " ".join(rng.choices(words, k=6))
        for i in range(20000)
    )
    (src / "var/log/syslog").write_text("\n".join(lines) + "\n")


def build_images(root: Path, work: Path, qcow2: bool = False) -> ImageSet:
    """Write the parts into `root`, the origin's document root; with `qcow2`, the same
    filesystem as a QCOW2 disk too."""
    src = work / "rootfs"
    _populate(src)
    raw = work / "filesystem.img"
    with open(raw, "wb") as f:
        f.truncate(16 << 20)
    res = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", "demo-root", "-d", str(src), str(raw)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise DemoError(f"mkfs.ext4 -d failed: {res.stderr.strip()}")
    say(f"ext4 filesystem: {raw.stat().st_size >> 20} MiB (mkfs.ext4 -d from a small tree)")

    fs_gz = root / "demo-root.img.gz"
    with open(raw, "rb") as src_f, gzip.GzipFile(fs_gz, "wb", compresslevel=6, mtime=0) as dst:
        shutil.copyfileobj(src_f, dst, 1 << 20)
    rng = random.Random(4)
    kernel, ramdisk = root / "vmlinuz-demo", root / "initrd-demo.img"
    kernel.write_bytes(rng.randbytes(2 << 20))  # stand-ins: the bytes matter, not what they are
    ramdisk.write_bytes(gzip.compress(rng.randbytes(1 << 20), mtime=0))

    files = [("ZFILESYSTEM", fs_gz), ("KERNEL", kernel), ("RAMDISK", ramdisk)]
    if qcow2:
        disk = root / "demo-root.qcow2"
        try:
            demo_glance.make_qcow2(raw, disk)
        except demo_glance.GlanceSetupError as exc:
            raise DemoError(str(exc)) from exc
        say(f"QCOW2 disk: {disk.stat().st_size} bytes (qemu-img convert -f raw -O qcow2)")
        files.append(("QCOW2", disk))
    images = ImageSet("demo-image.xml", "", filesystem_sha1=sha1_of(raw))
    for type_, path in files:
        images.parts.append(Part(type_, path.name, sha1_of(path), path.stat().st_size))
    return images


def metadata_xml(images: ImageSet, base_url: str) -> bytes:
    entries = "".join(
        f"  <image>\n    <type>{p.type}</type>\n    <signature>{p.sha1}</signature>\n"
        f"    <url>{escape(base_url + '/' + p.name)}</url>\n  </image>\n"
        for p in images.parts
    )
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<images>\n{entries}</images>\n'.encode()


# --- the origin (nginx) ---

_SYNC = "/.demo-sync"


def nginx_conf(work: Path, root: Path, port: int) -> str:
    # As root, nginx workers would run as "nobody", who cannot read a 0700 temp dir: with
    # master_process off one process serves, with no privilege drop.
    temps = "\n".join(
        f"    {k}_temp_path {work / ('tmp_' + k)};"
        for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {work / "nginx.pid"};
error_log {work / "nginx-error.log"} info;
events {{ worker_connections 256; }}
http {{
    log_format demo '$request_method $uri $status $body_bytes_sent "$http_range"';
    access_log {work / "nginx-access.log"} demo;
{temps}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location = {_SYNC} {{ return 204; }}
    }}
}}
"""


@dataclass
class Origin:
    daemon: Daemon
    base_url: str
    access_log: Path

    def requests(self) -> int:
        """Requests nginx finished so far, not counting our own sync probes.

        nginx logs a request when it finalises it, which can be just after the client got the
        last byte: a probe request's own line appearing proves every earlier line is written.
        """
        before = self._lines()
        http_get(self.base_url + _SYNC)
        wait_for("nginx access log", lambda: len(self._lines()) > len(before), 10, self.daemon)
        return sum(1 for line in self._lines() if f" {_SYNC} " not in line)

    def _lines(self) -> list[str]:
        try:
            return self.access_log.read_text().splitlines()
        except FileNotFoundError:
            return []


def start_origin(track: list[Daemon], work: Path, root: Path) -> Origin:
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(nginx_conf(work, root, port))
    daemon = Daemon.start(
        track, "nginx", [NGINX, "-c", str(conf), "-p", str(work)], work / "nginx.log"
    )
    base_url = f"http://127.0.0.1:{port}"
    wait_for("nginx", lambda: http_get(base_url + _SYNC) == 204, 15, daemon)
    return Origin(daemon, base_url, work / "nginx-access.log")


# --- the stand-in cloud (moto) and its keys ---


def start_moto(track: list[Daemon], work: Path) -> tuple[Daemon, str]:
    port = free_port()
    cmd = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    say("$ " + " ".join(cmd))
    daemon = Daemon.start(
        track, "moto_server", cmd, work / "moto.log", {"PYTHONWARNINGS": "ignore"}
    )
    url = f"http://127.0.0.1:{port}"
    wait_for("moto_server", lambda: http_get(url + "/moto-api/data.json") == 200, 60, daemon)
    return daemon, url


def make_key_and_cert(directory: Path, stem: str, common_name: str) -> tuple[Path, Path]:
    """A throw-away RSA key and self-signed certificate, as `<stem>-pk.pem`/`<stem>-cert.pem`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / f"{stem}-pk.pem", directory / f"{stem}-cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


# --- the config file ---


@dataclass
class Site:
    config: Path
    cache_dir: Path
    mountpoint: Path
    state_dir: Path
    metrics_listen: str = ""


def euca_cloud_section(work: Path, cloud_url: str) -> str:
    """The `[cloud]` section for moto, with throw-away certificates and keys."""
    keys = work / "euca"
    keys.mkdir()
    _, cloud_cert = make_key_and_cert(keys, "cloud", "Demo Eucalyptus cloud")
    user_key, user_cert = make_key_and_cert(keys, "euca2-admin", "demo admin")
    return f"""[cloud]                 # moto_server stands in for Eucalyptus (S3 + EC2 on one port)
ec2_url = "{cloud_url}"
s3_url = "{cloud_url}"
access_key = "demo"
secret_key = "demo"
account_id = "{ACCOUNT_ID}"
region = "us-east-1"
cloud_cert = "{cloud_cert}"
user_cert = "{user_cert}"
user_key = "{user_key}"
poll_interval = 0.2
register_timeout = 60
"""


def write_config(work: Path, cloud_section: str, bucket: bool = True) -> Site:
    """The one config file of both daemons; `bucket` is Eucalyptus's, unused by Glance."""
    site = Site(work / "imageproxy.toml", work / "cache", work / "images", work / "state")
    site.metrics_listen = f"127.0.0.1:{free_port()}"
    bucket_line = f'bucket = "{BUCKET}"\n' if bucket else ""
    site.config.write_text(
        f"""# Written by scripts/demo: the same file serves both daemons.
[store]
cache_dir = "{site.cache_dir}"
mountpoint = "{site.mountpoint}"
cache_size = "1G"
min_free = "16M"        # the demo runs in /tmp, which may be small
metrics_listen = "{site.metrics_listen}"  # imgstore's GET /metrics

[registrar]
listen = "127.0.0.1:0"  # a free port; the registrar logs which
{bucket_line}state_dir = "{site.state_dir}"
allowed_networks = ["127.0.0.0/8"]  # the demo's origin is on loopback

{cloud_section}"""
    )
    site.mountpoint.mkdir()
    return site


# --- imgstore ---


def mount_imgstore(site: Site) -> None:
    cmd = [str(BIN / "imgstore"), "mount", "--config", str(site.config)]
    say("$ " + " ".join(cmd))
    res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        # Until the mount is up, the daemon reports on our pipe, not in its log file.
        log = site.config.parent / "imgstore-mount.log"
        log.write_text(res.stdout + res.stderr)
        message = res.stderr.strip().splitlines()[-1:] or [f"exit code {res.returncode}"]
        raise DemoError(f"imgstore mount failed: {message[0]}", log)
    if not (site.mountpoint / "by-sha1").is_dir():
        raise DemoError("imgstore mount returned but by-sha1/ is missing", _imgstore_log(site))
    say(f"mounted; the daemon logs to {_imgstore_log(site)}")


def _imgstore_log(site: Site) -> Path:
    return site.cache_dir / "imgstore.log"


def _imgstore_pid(site: Site) -> int | None:
    """The mount daemon's pid, which it writes into the cache directory's lock file."""
    try:
        text = (site.cache_dir / "mount.lock").read_text()
    except OSError:
        return None
    match = re.match(r"pid (\d+)", text)
    return int(match.group(1)) if match else None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def unmount_imgstore(site: Site) -> None:
    pid = _imgstore_pid(site)
    subprocess.run(
        ["fusermount3", "-u", "-z", str(site.mountpoint)], capture_output=True, timeout=30
    )
    if pid is None:
        return
    # Unmounting ends the daemon's FUSE session: it exits on its own. If not, ask, then insist.
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _alive(pid):
            return


# --- the registrar and the SOAP call ---


def start_registrar(track: list[Daemon], site: Site, work: Path) -> tuple[Daemon, str]:
    cmd = [str(BIN / "registrar"), "serve", "--config", str(site.config)]
    say("$ " + " ".join(cmd))
    daemon = Daemon.start(track, "registrar", cmd, work / "registrar.log")
    found: list[str] = []

    def listening() -> bool:
        match = _LISTENING.search(daemon.log.read_text(errors="replace"))
        if match and not found:
            found.append(match.group(1))
        return bool(found) and http_get(found[0] + "/healthz") == 200

    wait_for("registrar", listening, 60, daemon)
    return daemon, found[0]


def envelope(url: str, signature: str) -> bytes:
    """RegisterImage exactly as ORCA's Axis2 1.1 stub serialises it."""
    return (
        "<?xml version='1.0' encoding='UTF-8'?>"
        f'<soapenv:Envelope xmlns:soapenv="{SOAP11_NS}"><soapenv:Body>'
        f'<ns1:RegisterImage xmlns:ns1="{ORCA_NS}"><ns1:url>{escape(url)}</ns1:url>'
        f"<ns1:signature>{escape(signature)}</ns1:signature></ns1:RegisterImage>"
        "</soapenv:Body></soapenv:Envelope>"
    ).encode()


def axis2_headers(host: str, port: int) -> list[tuple[str, str]]:
    """The headers Axis2 1.1 sends, in its order: SOAP 1.1, chunked body."""
    return [
        ("Content-Type", "text/xml; charset=UTF-8"),
        ("SOAPAction", '"urn:RegisterImage"'),
        ("User-Agent", "Axis2"),
        ("Host", f"{host}:{port}"),
        ("Transfer-Encoding", "chunked"),
    ]


def register_image(endpoint: str, url: str, signature: str, log: Path) -> tuple[str, float]:
    """Send the SOAP call; return the `return` text and the seconds it took."""
    host, port = endpoint.removeprefix("http://").split("/")[0].rsplit(":", 1)
    body = envelope(url, signature)
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    started = time.monotonic()
    try:
        conn.putrequest("POST", SERVICE_PATH, skip_host=True, skip_accept_encoding=True)
        for name, value in axis2_headers(host, int(port)):
            conn.putheader(name, value)
        conn.endheaders()
        conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        response = conn.getresponse()
        payload = response.read()
    except OSError as exc:
        raise DemoError(f"the SOAP call to {endpoint} failed: {exc}", log) from None
    finally:
        conn.close()
    elapsed = time.monotonic() - started
    try:
        doc = ET.fromstring(payload)
    except ET.ParseError:
        raise DemoError(
            f"the registrar answered HTTP {response.status} with no SOAP envelope: "
            f"{payload[:200]!r}",
            log,
        ) from None
    fault = doc.find(f".//{{{SOAP11_NS}}}Fault")
    if fault is not None:
        raise DemoError(f"SOAP fault: {fault.findtext('faultstring', '').strip()}", log)
    answer = doc.find(f".//{{{ORCA_NS}}}RegisterImageResponse/{{{ORCA_NS}}}return")
    if response.status != 200 or answer is None:
        raise DemoError(f"HTTP {response.status} without a RegisterImageResponse", log)
    return answer.text or "", elapsed


def properties(text: str) -> dict[str, str]:
    """The answer's `KEY=value` lines (ids need none of java.util.Properties' escapes)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and line[0] not in "#!" and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def show_cloud(cloud_url: str, ids: list[str]) -> None:
    """What the stand-in cloud now holds: the bundles in S3, the images in EC2."""
    import boto3  # the demo looks at the cloud the way an operator's euca2ools would

    session = boto3.session.Session(
        aws_access_key_id="demo", aws_secret_access_key="demo", region_name="us-east-1"
    )
    s3 = session.client("s3", endpoint_url=cloud_url)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    say(f"S3 bucket {BUCKET}: {len(keys)} objects (a manifest and its parts per image)")
    folders: dict[str, list[str]] = {}
    for key in keys:
        folder, _, name = key.rpartition("/")
        folders.setdefault(folder, []).append(name.removeprefix(folder))
    for folder, names in folders.items():
        say(f"  {folder}/{{{','.join(names)}}}")
    ec2 = session.client("ec2", endpoint_url=cloud_url)
    say("EC2 DescribeImages:")
    for image in ec2.describe_images(ImageIds=ids)["Images"]:
        say(f"  {image['ImageId']}  {image.get('State', '?'):<10} {image.get('Name', '')}")


def count_uploads(moto_log: Path) -> int:
    """S3 PUTs moto has logged (one line per request)."""
    return sum(1 for line in moto_log.read_text(errors="replace").splitlines() if '"PUT /' in line)


# --- the real Glance of `scripts/demo openstack` ---


def start_glance(track: list[Daemon], work: Path) -> tuple[Daemon, str]:
    directory, log, port = work / "glance", work / "glance.log", free_port()
    say(f"$ glance-manage db_sync  # OS_GLANCE_CONFIG_DIR={directory}")
    try:
        cmd, env = demo_glance.prepare(directory, port, log)
    except demo_glance.GlanceSetupError as exc:
        raise DemoError(str(exc), log if log.exists() else None) from exc
    say("$ " + " ".join(cmd))
    daemon = Daemon.start(track, "glance", cmd, log, env)
    url = f"http://127.0.0.1:{port}"
    wait_for("glance", lambda: http_get(url + "/versions") != 0, 60, daemon)
    return daemon, url


def show_glance(glance_url: str, ids: dict[str, str], images: ImageSet, log: Path) -> None:
    """Each image as `openstack image show` prints it, checked: active, the right formats and
    links, and exactly the published bytes (read back from Glance)."""
    say("$ openstack image list")
    for image in demo_glance.list_images(glance_url):
        say(f"  {image['id']}  {image['status']:<8} {image['name']}")
    published = {p.type: (p.sha1, f"{p.name} as published") for p in images.parts}
    fs_gz = next(p.name for p in images.parts if p.type == "ZFILESYSTEM")
    published["FILESYSTEM"] = (images.filesystem_sha1, f"the ext4 filesystem in {fs_gz}")
    for kind, image_id in ids.items():
        say(f"\n$ openstack image show {image_id}   # {kind}")
        image = demo_glance.get_image(glance_url, image_id)
        say(demo_glance.show_table(image))
        if problem := demo_glance.check(image, kind, ids):
            raise DemoError(f"{kind} image {image_id}: {problem}", log)
        size, sha1 = demo_glance.download_sha1(glance_url, image_id)
        want, what = published[kind]
        if sha1 != want:
            raise DemoError(f"{kind} image {image_id} holds other bytes than {what}", log)
        say(f"read back from Glance: {size} bytes, SHA-1 {sha1}, the same as {what}")


# --- the demo ---


class Demo:
    """Owns every process, mount and directory it creates, and removes them in `teardown`."""

    def __init__(self, keep: bool, openstack: bool = False) -> None:
        self.keep = keep
        self.openstack = openstack
        self.work = Path(tempfile.mkdtemp(prefix="imageproxy-demo-"))
        self.daemons: list[Daemon] = []
        self.site: Site | None = None

    def run(self) -> None:
        say(f"ImageProxy demo; working directory {self.work}")
        section("1. A sample image set, as a user would publish it")
        root = self.work / "www"
        root.mkdir()
        images = build_images(root, self.work, qcow2=self.openstack)

        section("2. The origin web server (nginx on 127.0.0.1)")
        origin = start_origin(self.daemons, self.work, root)
        metadata = metadata_xml(images, origin.base_url)
        (root / images.metadata_name).write_bytes(metadata)
        images.metadata_sha1 = hashlib.sha1(metadata).hexdigest()
        metadata_url = f"{origin.base_url}/{images.metadata_name}"
        say(f"serving {root} at {origin.base_url}/")
        say("$ sha1sum " + " ".join(p.name for p in images.parts) + " " + images.metadata_name)
        for p in images.parts:
            say(f"{p.sha1}  {p.name}  ({p.type}, {p.size} bytes)")
        say(f"{images.metadata_sha1}  {images.metadata_name}")
        say(f"\n{metadata_url}:\n{metadata.decode().rstrip()}")

        if self.openstack:
            section("3. The cloud: a real Glance (no Keystone), and the config file")
            glance, cloud_url = start_glance(self.daemons, self.work)
            say(f"Glance's image API at {cloud_url}/v2; log {glance.log}")
            cloud = demo_glance.cloud_section(cloud_url)
            self.site = site = write_config(self.work, cloud, bucket=False)
            uploads = functools.partial(demo_glance.count_uploads, glance.log)
        else:
            section("3. The stand-in cloud (moto_server: S3 + EC2), keys and the config file")
            moto, cloud_url = start_moto(self.daemons, self.work)
            say(f"S3 and EC2 at {cloud_url}")
            cloud = euca_cloud_section(self.work, cloud_url)
            self.site = site = write_config(self.work, cloud)
            say(f"throw-away cloud and user certificates in {self.work / 'euca'}")
            uploads = functools.partial(count_uploads, moto.log)
        say(f"$ cat {site.config}\n{site.config.read_text().rstrip()}")

        section("4. imgstore: the lazy, verified image cache behind a FUSE mount")
        mount_imgstore(site)

        section("5. The registrar: ORCA's SOAP service")
        registrar, base = start_registrar(self.daemons, site, self.work)
        endpoint = base + SERVICE_PATH
        say(f"listening at {endpoint} (WSDL at {endpoint}?wsdl); log {registrar.log}")

        section("6. RegisterImage, exactly as ORCA's Axis2 stub sends it")
        host_port = base.removeprefix("http://")
        say(f"POST {SERVICE_PATH} HTTP/1.1")
        for name, value in axis2_headers(*host_port.rsplit(":", 1)):
            say(f"{name}: {value}")
        say("\n" + envelope(metadata_url, images.metadata_sha1).decode() + "\n")
        counts = [(origin.requests(), uploads())]
        first, first_s = register_image(endpoint, metadata_url, images.metadata_sha1, registrar.log)
        counts.append((origin.requests(), uploads()))
        ids = properties(first)
        say(f"answer after {first_s:.2f} s:")
        say(first.rstrip())
        expected = ("FILESYSTEM", "KERNEL", "RAMDISK") + (("QCOW2",) if self.openstack else ())
        missing = [k for k in expected if not ids.get(k)]
        if missing:
            raise DemoError(f"the answer has no {', '.join(missing)} id", registrar.log)

        if self.openstack:
            section("7. Glance now holds the images, each traced to its source")
            show_glance(cloud_url, {k: ids[k] for k in expected}, images, registrar.log)
        else:
            section("7. The cloud now holds the bundles and the registered images")
            show_cloud(cloud_url, [ids["FILESYSTEM"], ids["KERNEL"], ids["RAMDISK"]])

        section("8. The mount: every image by its SHA-1")
        say(f"$ cd {site.mountpoint}")
        show_command(["ls", "-l", "by-sha1"], cwd=site.mountpoint)
        say()
        names = sorted(f"by-sha1/{p.name}" for p in (site.mountpoint / "by-sha1").iterdir())
        show_command(["getfattr", "-d", *names], cwd=site.mountpoint)
        say()
        show_command([str(BIN / "imgstore"), "ls", "--config", str(site.config)])

        section("9. The same request again: answered from the registry")
        second, second_s = register_image(
            endpoint, metadata_url, images.metadata_sha1, registrar.log
        )
        counts.append((origin.requests(), uploads()))
        (origin_0, up_0), (origin_1, up_1), (origin_2, up_2) = counts
        say(f"answer after {second_s:.2f} s:")
        say(second.rstrip())
        if properties(second) != ids:
            raise DemoError("the second answer differs from the first", registrar.log)
        flagged = f"metadata {images.metadata_sha1}: answered from the registry"
        if flagged not in registrar.log.read_text(errors="replace"):
            raise DemoError("the registrar did not answer from its registry", registrar.log)
        say(f"identical ids, answered from the registry (registrar log: '{flagged}')")
        say("                 first call  second call")
        say(f"duration         {first_s:8.2f} s {second_s:9.2f} s")
        say(f"origin requests  {origin_1 - origin_0:10d} {origin_2 - origin_1:11d}")
        upload_label = "Glance uploads" if self.openstack else "S3 PUT requests"
        say(f"{upload_label:<17}{up_1 - up_0:10d} {up_2 - up_1:11d}")
        say()
        show_command([str(BIN / "registrar"), "list", "--config", str(site.config)])

        section("10. curl /metrics: the work done, as Prometheus sees it")
        work = show_metrics(base + "/metrics")
        say()
        cache = show_metrics(f"http://{site.metrics_listen}/metrics")
        if not (
            work["imageproxy_registrar_bundled_bytes_total"]
            and work["imageproxy_registrar_registry_hits_total"] == 1
            and cache["imgstore_origin_bytes_total"]
        ):
            raise DemoError("/metrics does not show the work done", registrar.log)

    def teardown(self) -> None:
        section("Cleaning up")
        registrar = [d for d in self.daemons if d.name == "registrar"]
        for daemon in registrar:
            daemon.stop()
        if self.site is not None:
            unmount_imgstore(self.site)
            if os.path.ismount(self.site.mountpoint):
                say(f"warning: {self.site.mountpoint} is still mounted")
                self.keep = True
        for daemon in reversed(self.daemons):
            daemon.stop()
        if self.keep:
            say(f"kept {self.work} (logs: *.log, cache/imgstore.log)")
        else:
            shutil.rmtree(self.work, ignore_errors=True)
            say(f"removed {self.work}")
        stopped = [d.name for d in self.daemons] + (["imgstore"] if self.site else [])
        say(f"stopped: {', '.join(stopped) or 'nothing was running'}")


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/demo",
        description="Run ImageProxy end to end on this machine: a local origin, a stand-in "
        "cloud, an imgstore mount and the registrar answering ORCA's SOAP call; then clean up.",
        epilog="Exit codes: 0 ok, 1 a step failed, 130 interrupted.",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the working directory and its logs"
    )
    parser.add_argument(
        "cloud",
        nargs="?",
        choices=("eucalyptus", "openstack"),
        default="eucalyptus",
        help="the cloud to register into: moto standing in for Eucalyptus (the default), or a "
        "real Glance without Keystone",
    )
    args = parser.parse_args(argv)
    # Everything the demo talks to is on loopback: an http_proxy set for this host must not
    # carry those requests (ours, imgstore's or boto3's) elsewhere.
    for name in ("no_proxy", "NO_PROXY"):
        os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1,localhost"]))
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)
    # Even when started with SIGINT ignored (a background job of a script), Ctrl-C cleans up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    demo = Demo(args.keep, openstack=args.cloud == "openstack")
    code = 0
    try:
        demo.run()
    except DemoError as exc:
        code = 1
        print(f"\nscripts/demo: FAILED: {exc}", file=sys.stderr, flush=True)
        if exc.log is not None:
            print(f"--- last lines of {exc.log} ---", file=sys.stderr)
            print(tail(exc.log), file=sys.stderr)
            print("---", file=sys.stderr, flush=True)
    except (KeyboardInterrupt, Interrupted) as exc:
        code = 130
        print(f"\nscripts/demo: interrupted ({str(exc) or 'SIGINT'})", file=sys.stderr, flush=True)
    except Exception as exc:  # a bug, or a tool misbehaving: still a clear last line
        code = 1
        traceback.print_exc()
        print(f"\nscripts/demo: FAILED: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave a mount behind.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        demo.teardown()
    if code == 0:
        section(f"Done in {time.monotonic() - _T0:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
