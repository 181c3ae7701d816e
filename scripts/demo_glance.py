"""The Glance half of `scripts/demo openstack`: a throw-away Glance, and a look at its images.

Glance 33 (from `.venv-glance`, made by `scripts/demo openstack` through `ensure_server_venv`)
runs without Keystone under gunicorn, on sqlite and the file store, in one directory. What this
module knows about starting it, learnt the hard way (the tests' `tests/support/openstack.py`
relies on the same facts):

- the app `glance.wsgi.api:application` reads `$OS_GLANCE_CONFIG_DIR/glance-api.conf` and
  `glance-api-paste.ini` (copied from the venv's etc/glance/); `glance-manage db_sync` first;
- gunicorn 27 wants `--no-control-socket`;
- without Keystone, `[oslo_policy] enforce_new_defaults = false`, or every call is refused;
- one request at a time: Glance on sqlite is not safe for concurrent writers.

The rest reads Glance's v2 API the way `openstack image show` does, with plain HTTP: this is
the operator's view, so it does not go through the registrar's own client. Nothing here starts
a daemon: `demo.py` does, so that its teardown stops Glance like every other one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GLANCE_VENV = ROOT / ".venv-glance"
APP = "glance.wsgi.api:application"
NAME_PREFIX = "imageproxy-demo/"

# What `openstack image show` prints first, in its order; then the properties (ours, and the
# kernel and ramdisk a machine image boots with).
FIELDS = (
    "id",
    "name",
    "disk_format",
    "container_format",
    "status",
    "size",
    "virtual_size",
    "checksum",
    "os_hash_algo",
    "os_hash_value",
    "visibility",
)
LINKS = ("kernel_id", "ramdisk_id")
# What each part of the answer becomes in Glance: (disk_format, container_format).
FORMATS = {
    "FILESYSTEM": ("ami", "ami"),
    "KERNEL": ("aki", "aki"),
    "RAMDISK": ("ari", "ari"),
    "QCOW2": ("qcow2", "bare"),
}


class GlanceSetupError(Exception):
    """Raised when the Glance virtualenv is missing, `glance-manage db_sync` fails, or
    `qemu-img` cannot make the QCOW2."""


def _bin(name: str) -> Path:
    path = GLANCE_VENV / "bin" / name
    if not path.exists():
        raise GlanceSetupError(f"{path} is missing: `scripts/demo openstack` creates it")
    return path


def prepare(directory: Path, port: int, log: Path) -> tuple[list[str], dict[str, str]]:
    """Write Glance's configuration into `directory` and make its database; return the command
    and the environment that serve it on 127.0.0.1:`port`."""
    manage, gunicorn = _bin("glance-manage"), _bin("gunicorn")  # first: a clear error if missing
    for sub in ("images", "staging", "tasks"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(GLANCE_VENV / "etc" / "glance" / "glance-api-paste.ini", directory)
    conf = directory / "glance-api.conf"
    conf.write_text(
        f"""[DEFAULT]
enabled_backends = fs:file
[database]
connection = sqlite:///{directory}/glance.sqlite
[glance_store]
default_backend = fs
[fs]
filesystem_store_datadir = {directory}/images
[os_glance_staging_store]
filesystem_store_datadir = {directory}/staging
[os_glance_tasks_store]
filesystem_store_datadir = {directory}/tasks
[oslo_policy]
enforce_new_defaults = false
"""
    )
    # Their deprecation warnings would bury the one line that matters in the log.
    env = {"OS_GLANCE_CONFIG_DIR": str(directory), "PYTHONWARNINGS": "ignore"}
    db_sync = [str(manage), "--config-file", str(conf), "db_sync"]
    with open(log, "ab") as out:
        res = subprocess.run(
            db_sync, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=120, check=False
        )
    if res.returncode != 0:
        raise GlanceSetupError(f"glance-manage db_sync failed with exit code {res.returncode}")
    cmd = [
        str(gunicorn),
        "--no-control-socket",
        "--workers", "1",
        "--threads", "1",
        "--timeout", "600",
        "--graceful-timeout", "5",  # teardown need not wait for the default 30 s
        "--access-logfile", "-",  # one line per request: the demo counts the uploads
        "--bind", f"127.0.0.1:{port}",
        APP,
    ]  # fmt: skip
    return cmd, env


def cloud_section(glance_url: str) -> str:
    """The config file's `[cloud]` section for this Glance."""
    return f"""[cloud]                 # a real Glance, without Keystone (so no credentials)
type = "openstack"
auth_type = "none"
glance_url = "{glance_url}"
name_prefix = "{NAME_PREFIX}"
poll_interval = 0.2
register_timeout = 60
"""


def count_uploads(log: Path) -> int:
    """Image uploads (`PUT /v2/images/ID/file`) in gunicorn's access log."""
    text = log.read_text(errors="replace")
    return sum(1 for line in text.splitlines() if '"PUT /v2/images/' in line and "/file " in line)


def get_image(glance_url: str, image_id: str) -> dict[str, Any]:
    """`GET /v2/images/ID`: every field and property of one image."""
    with urllib.request.urlopen(f"{glance_url}/v2/images/{image_id}", timeout=30) as response:
        image: dict[str, Any] = json.loads(response.read())
    return image


def list_images(glance_url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{glance_url}/v2/images", timeout=30) as response:
        images: list[dict[str, Any]] = json.loads(response.read())["images"]
    return images


def show_table(image: dict[str, Any]) -> str:
    """The image as `openstack image show` draws it, one row per property."""
    rows = [(name, image.get(name)) for name in FIELDS]
    rows += sorted((k, v) for k, v in image.items() if k.startswith("imageproxy_"))
    rows += [(name, image[name]) for name in LINKS if name in image]
    cells = [(name, "" if value is None else str(value)) for name, value in rows]
    left = max(len(name) for name, _ in cells)
    right = max(len(value) for _, value in cells)
    rule = f"+{'-' * (left + 2)}+{'-' * (right + 2)}+"
    lines = [rule, f"| {'Field':<{left}} | {'Value':<{right}} |", rule]
    lines += [f"| {name:<{left}} | {value:<{right}} |" for name, value in cells]
    return "\n".join([*lines, rule])


def check(image: dict[str, Any], kind: str, ids: dict[str, str]) -> str | None:
    """What is wrong with the `kind` image of an answer (`ids`), if anything: not active, the
    wrong formats, or (a machine image) not linked to the answer's kernel and ramdisk."""
    if image.get("status") != "active":
        return f"status {image.get('status')}, not active"
    formats = (image.get("disk_format"), image.get("container_format"))
    if formats != FORMATS[kind]:
        return f"formats {'/'.join(map(str, formats))}, not {'/'.join(FORMATS[kind])}"
    if kind == "FILESYSTEM":
        links = {name: image.get(name) for name in LINKS}
        if links != {"kernel_id": ids.get("KERNEL"), "ramdisk_id": ids.get("RAMDISK")}:
            return f"kernel_id and ramdisk_id {links} are not the answer's KERNEL and RAMDISK"
    return None


def download_sha1(glance_url: str, image_id: str) -> tuple[int, str]:
    """Size and SHA-1 of the bytes Glance stored for an image, read back in a stream."""
    digest = hashlib.sha1()
    size = 0
    url = f"{glance_url}/v2/images/{image_id}/file"
    with urllib.request.urlopen(url, timeout=60) as response:
        while block := response.read(1 << 20):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def make_qcow2(raw: Path, qcow2: Path) -> None:
    """Convert a raw disk to a real QCOW2 (Glance checks that `qcow2` bytes are one)."""
    res = subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        raise GlanceSetupError(f"qemu-img convert failed: {res.stderr.strip()}")
