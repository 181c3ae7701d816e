"""The site bench_register.py measures: nginx origin, moto, Glance, imgstore mount, registrar.

Built from the tests' own support code (tests/support: the origin nginx, moto, Glance, the
images), so the benchmark runs what the end-to-end tests run. Every process is ours, started
in its own session and stopped (or killed) by the `Site` that started it.

- `build_images(dir, size_mib)`: the image set, built once per size and kept: a real ext4
  filesystem of `size_mib` MiB gzipped (FILESYSTEM), a kernel and a ramdisk blob, and a QCOW2
  of the same filesystem (`qemu-img convert`).
- `Site`: the origin serving those files and a metadata XML listing all four; moto; a Glance
  with `web-download` enabled and loopback allowed; `run_registrar(config)` starts an imgstore
  mount and `registrar serve` on a fresh cache for one timed call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from _readbench_mounts import FuseMount  # noqa: E402

from tests.support.cloud import MotoProcess, make_key_and_cert  # noqa: E402
from tests.support.images import gzip_file, make_blob, make_ext4, metadata_xml  # noqa: E402
from tests.support.openstack import (  # noqa: E402
    GLANCE_VENV,
    GlanceServer,
    _clean_env,
    _gunicorn,
    _run,
    _venv_bin,
)
from tests.support.origin import Origin, start_origin  # noqa: E402

REGISTRAR = str(Path(sys.executable).parent / "registrar")
IMGSTORE = str(Path(sys.executable).parent / "imgstore")
WSDL = ROOT / "registrar" / "imageproxy.wsdl"
SOAP11_BINDING = "{http://imageproxy.orca}IMAGEPROXYSoap11Binding"
_CONTEXT_MODULE = """\
import glance.context
from glance.api.middleware.context import UnauthenticatedContextMiddleware


class ProjectContext(UnauthenticatedContextMiddleware):
    def process_request(self, req):
        req.context = glance.context.RequestContext(
            user_id="bench", project_id="bench", roles=["admin"], is_admin=True
        )
"""
_LISTENING = re.compile(r"SOAP service listening on (http://[^\s/]+)")
START_DEADLINE_S = 60.0


class SiteError(Exception):
    """Raised when a server of the site does not come up or a step of a run fails."""


@dataclasses.dataclass(frozen=True)
class ImageFile:
    type: str  # FILESYSTEM, KERNEL, RAMDISK, QCOW2
    name: str  # on the origin
    path: Path
    sha1: str


def sha1_of(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def build_images(directory: Path, size_mib: int) -> list[ImageFile]:
    """The image set of `size_mib`, built once in `directory` and reused (SHA-1s kept beside)."""
    directory.mkdir(parents=True, exist_ok=True)
    fs = directory / f"fs-{size_mib}m.img"
    files = [
        ("FILESYSTEM", "filesystem.img.gz", directory / f"fs-{size_mib}m.img.gz"),
        ("KERNEL", "vmlinuz", directory / "vmlinuz"),
        ("RAMDISK", "initrd.img", directory / "initrd.img"),
        ("QCOW2", "disk.qcow2", directory / f"disk-{size_mib}m.qcow2"),
    ]
    stamp = directory / f"sha1s-{size_mib}m.json"
    if stamp.exists():
        sums = json.loads(stamp.read_text())
        if all(path.exists() for _, _, path in files):
            return [ImageFile(t, n, p, sums[t]) for t, n, p in files]
    print(f"building a {size_mib} MiB image set in {directory} …", file=sys.stderr)
    if not fs.exists():
        make_ext4(fs.with_suffix(".building"), size_mib, seed=1).rename(fs)
    gzip_file(fs, files[0][2])
    make_blob(files[1][2], 3 << 20, 1, "kernel")
    make_blob(files[2][2], 2 << 20, 1, "ramdisk")
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(fs), str(files[3][2])],
        check=True,
        capture_output=True,
    )
    sums = {t: sha1_of(p) for t, _, p in files}
    stamp.write_text(json.dumps(sums))
    return [ImageFile(t, n, p, sums[t]) for t, n, p in files]


class ImportGlance(GlanceServer):
    """Glance with `web-download` enabled and the origin (on loopback) allowed to import from.

    As in the tests, it serves one request at a time (sqlite refuses concurrent writers with
    "database is locked"), so ours, which uploads the filesystem and the QCOW2 at once, has
    them queued; a production Glance (MySQL, several workers) would take both.
    """

    def __init__(self, directory: Path, origin_port: int) -> None:
        super().__init__(directory)
        self.origin_port = origin_port

    def write_config(self) -> None:
        super().write_config()
        conf = self.dir / "glance-api.conf"
        text = conf.read_text().replace(
            "[DEFAULT]\n",
            "[DEFAULT]\nenabled_import_methods = [glance-direct,web-download]\n",
            1,
        )
        text += (
            "\n[import_filtering_opts]\n"
            "allowed_hosts = [127.0.0.1]\n"
            f"allowed_ports = [{self.origin_port}]\n"
        )
        conf.write_text(text)
        # An import is a task, and Glance refuses a task without an owner: the anonymous admin
        # of no project that Glance without Keystone makes gets a project (still no Keystone).
        (self.dir / "bench_context.py").write_text(_CONTEXT_MODULE)
        paste = self.dir / "glance-api-paste.ini"
        paste.write_text(
            paste.read_text().replace(
                "glance.api.middleware.context:UnauthenticatedContextMiddleware.factory",
                "bench_context:ProjectContext.factory",
            )
        )

    def spawn(self, template: Path | None = None) -> None:
        """As the tests' Glance (one request at a time), with this directory on its path."""
        self.write_config()
        env = _clean_env(OS_GLANCE_CONFIG_DIR=str(self.dir))
        conf = self.dir / "glance-api.conf"
        _run([_venv_bin(GLANCE_VENV, "glance-manage"), "--config-file", conf, "db_sync"],
             log=self.log, env=env)  # fmt: skip
        app = "glance.wsgi.api:application"
        command = _gunicorn(GLANCE_VENV, self.port, app, "--pythonpath", str(self.dir), threads=1)
        self.process.spawn(command, env)

    def call(self, method: str, path: str, body: Any = None, content_type: str = "") -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": content_type or "application/json"} if data else {}
        request = urllib.request.Request(
            f"{self.url}/v2{path}", data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip().replace("\n", " ")[-300:]
            raise SiteError(f"Glance {method} {path}: HTTP {exc.code}: {detail}") from exc
        except OSError as exc:
            raise SiteError(f"Glance {method} {path}: {exc}") from exc
        return json.loads(text) if text else None

    def delete_all(self) -> None:
        """Delete every image: each run starts from an empty Glance (and disk)."""
        for image in self.call("GET", "/images?limit=1000")["images"]:
            self.call("DELETE", f"/images/{image['id']}")


@dataclasses.dataclass
class Registrar:
    """One `registrar serve` and the imgstore mount it reads through, on a fresh cache."""

    mount: FuseMount
    proc: subprocess.Popen[bytes]
    log_path: Path
    endpoint: str = ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self.mount.stop()

    def log_tail(self) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-8:])
        except OSError:
            return "(no log)"


class Site:
    """The servers of one benchmark run; a context manager that stops all it started."""

    def __init__(self, workdir: Path, images: list[ImageFile], clouds: list[str]) -> None:
        self.workdir = workdir
        self.images = images
        self.clouds = clouds
        self._stack = contextlib.ExitStack()
        self.origin: Origin | None = None
        self.moto: MotoProcess | None = None
        self.glance: ImportGlance | None = None
        self.urls: dict[str, str] = {}
        self.metadata_url = ""
        self.metadata_sha1 = ""
        self.cloud_cert = self.user_cert = self.user_key = Path()
        fs = next(i for i in images if i.type == "FILESYSTEM").path
        self.raw_fs = fs.with_suffix("")  # the image before gzip
        self.raw_fs_size = self.raw_fs.stat().st_size
        self.raw_fs_url = ""  # the origin's decompressed copy, for web-download-raw

    def __enter__(self) -> Site:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.origin = start_origin(self.workdir / "origin")
        self._stack.callback(self.origin.stop)
        for image in self.images:
            self.urls[image.type] = self.origin.put(image.name, image.path)
        xml = metadata_xml([(i.type, i.sha1, self.urls[i.type]) for i in self.images])
        self.metadata_url = self.origin.put("metadata.xml", xml)
        self.metadata_sha1 = hashlib.sha1(xml).hexdigest()
        if "eucalyptus" in self.clouds:
            keys = self.workdir / "keys"
            keys.mkdir(exist_ok=True)
            self.cloud_cert = make_key_and_cert(keys, "cloud", "bench cloud")[1]
            self.user_key, self.user_cert = make_key_and_cert(keys, "user", "bench user")
            self.moto = MotoProcess(self.workdir / "moto.log")
            self.moto.start()
            self._stack.callback(self.moto.stop)
            self.reset_moto()
        if "openstack" in self.clouds:
            glance_dir = self.workdir / "glance"
            shutil.rmtree(glance_dir, ignore_errors=True)
            glance_dir.mkdir()
            self.raw_fs_url = self.origin.put("filesystem-raw.img", self.raw_fs)
            self.glance = ImportGlance(glance_dir, self.origin.port)
            self._stack.callback(self.glance.stop)
            try:
                self.glance.start()
            except RuntimeError as exc:
                raise SiteError(str(exc)) from exc

    def reset_moto(self) -> None:
        """Forget every bucket and image, then wake moto's EC2 and S3 again.

        moto builds its EC2 backend on the first call after a start or reset (about a second
        here): without this, whichever case comes first would pay for it.
        """
        import boto3

        assert self.moto is not None
        self.moto.reset()
        keys = {
            "endpoint_url": self.moto.url,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "region_name": "us-east-1",
        }
        boto3.client("ec2", **keys).describe_images(Owners=["self"])
        boto3.client("s3", **keys).list_buckets()

    def warm_origin(self) -> None:
        """Drop the page cache, then read the origin's files back into it.

        The origin stands for a fast web server elsewhere: a cold run measures the site
        fetching, checking and registering, not nginx reading its own disk.
        """
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        for image in self.images:
            self.warm(image.path)

    @staticmethod
    def warm(path: Path) -> None:
        """Read `path` into the page cache."""
        with open(path, "rb") as f:
            while f.read(8 << 20):
                pass

    def run_registrar(self, run_dir: Path, cloud: str, bucket: str) -> Registrar:
        """A mount on a fresh cache and `registrar serve` for `cloud`; waits until it answers."""
        cache, mnt, state = run_dir / "cache", run_dir / "mnt", run_dir / "state"
        config = run_dir / "imageproxy.toml"
        config.write_text(self._config(cloud, cache, mnt, state, bucket))
        mount = FuseMount(
            "imgstore",
            [IMGSTORE, "mount", "--foreground", "--config", str(config), str(mnt)],
            mnt,
            run_dir / "imgstore.log",
            ready=mnt / "by-sha1",
        )
        mount.start()
        log_path = run_dir / "registrar.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [REGISTRAR, "serve", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        registrar = Registrar(mount, proc, log_path)
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                registrar.stop()
                raise SiteError(f"registrar exited with {proc.returncode}: {registrar.log_tail()}")
            match = _LISTENING.search(log_path.read_text(errors="replace"))
            if match and _healthy(match.group(1)):
                registrar.endpoint = match.group(1) + "/axis2/services/IMAGEPROXY"
                return registrar
            time.sleep(0.05)
        registrar.stop()
        raise SiteError(f"registrar not ready in {START_DEADLINE_S:.0f} s: {registrar.log_tail()}")

    def _config(self, cloud: str, cache: Path, mnt: Path, state: Path, bucket: str) -> str:
        head = f"""[store]
cache_dir = "{cache}"
mountpoint = "{mnt}"

[registrar]
listen = "127.0.0.1:0"
allowed_networks = ["127.0.0.0/8"]
state_dir = "{state}"
"""
        if cloud == "eucalyptus":
            assert self.moto is not None
            return (
                head
                + f"""bucket = "{bucket}"

[cloud]
ec2_url = "{self.moto.url}"
s3_url = "{self.moto.url}"
access_key = "testing"
secret_key = "testing"
account_id = "123456789012"
region = "us-east-1"
cloud_cert = "{self.cloud_cert}"
user_cert = "{self.user_cert}"
user_key = "{self.user_key}"
poll_interval = 0.05
register_timeout = 1800
"""
            )
        assert self.glance is not None
        return (
            head
            + f"""
[cloud]
type = "openstack"
auth_type = "none"
glance_url = "{self.glance.url}"
name_prefix = "{bucket}/"
register_timeout = 1800
poll_interval = 0.1
"""
        )


def _healthy(base_url: str) -> bool:
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def scratch(directory: Path, keep_as: Path | None = None) -> Iterator[Path]:
    """A fresh directory, removed afterwards (or renamed to `keep_as`, logs and all)."""
    _remove(directory)
    directory.mkdir(parents=True)
    try:
        yield directory
    finally:
        if keep_as is not None:
            _remove(keep_as)
            _detach(directory / "mnt")
            shutil.rmtree(directory / "cache", ignore_errors=True)  # the image bytes
            directory.rename(keep_as)
        else:
            _remove(directory)


def _remove(directory: Path) -> None:
    _detach(directory / "mnt")  # never descend into a mount left behind
    shutil.rmtree(directory, ignore_errors=True)


def _detach(mountpoint: Path) -> None:
    if os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
