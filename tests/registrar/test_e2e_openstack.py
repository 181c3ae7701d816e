"""End to end on OpenStack: ORCA's call → the real registrar → the real imgstore mount → a real
Glance (no Keystone; the password path is in test_openstack_backend.py).

Every image registered is downloaded back from Glance and compared byte for byte with its
source; the properties that trace it to its source are checked as an operator would see them.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zeep.exceptions

from tests.registrar.e2e_stack import IMGSTORE, REGISTRAR, Stack, register_in_background
from tests.registrar.owner_support import publish_to, qcow2_image
from tests.registrar.soap_javaprops import loads
from tests.support.fusemount import Mounted
from tests.support.glance_proxy import GlanceProxy
from tests.support.images import ImageFactory, metadata_xml
from tests.support.openstack import GlanceServer, download_image, make_qcow2
from tests.support.origin import Origin

FS_MIB = 16


@pytest.fixture
def os_stack_factory(
    tmp_path: Path, glance_noauth: GlanceServer, fuse_mount: Callable[..., Mounted]
) -> Iterator[Callable[[str], Stack]]:
    """A site whose cloud is the Glance at the given URL (the session's, or a proxy to it)."""
    stacks: list[Stack] = []

    def build(glance_url: str) -> Stack:
        root = tmp_path / f"site{len(stacks)}"
        root.mkdir()
        cache_dir, mountpoint, state_dir = root / "cache", root / "mnt", root / "state"
        prefix = f"t{secrets.token_hex(3)}/"  # this test's images, in the session's Glance
        config = root / "imageproxy.toml"
        config.write_text(
            f"""[registrar]
listen = "127.0.0.1:0"
allowed_networks = ["127.0.0.0/8"]
state_dir = "{state_dir}"

[cloud]
type = "openstack"
auth_type = "none"
glance_url = "{glance_url}"
name_prefix = "{prefix}"
register_timeout = 120
poll_interval = 0.2

[store]
cache_dir = "{cache_dir}"
mountpoint = "{mountpoint}"
"""
        )
        command = [*IMGSTORE, "mount", "--foreground", "--config", str(config), str(mountpoint)]
        mount = fuse_mount(command, mountpoint)
        stack = Stack(root, config, cache_dir, mountpoint, state_dir, None, mount)  # type: ignore[arg-type]
        stack.glance_url = glance_noauth.url  # type: ignore[attr-defined]
        stack.prefix = prefix  # type: ignore[attr-defined]
        stacks.append(stack)
        return stack

    yield build
    for stack in stacks:
        for registrar in stack.registrars:
            registrar.stop()


@pytest.fixture
def os_stack(os_stack_factory: Callable[[str], Stack], glance_noauth: GlanceServer) -> Stack:
    return os_stack_factory(glance_noauth.url)


def _glance(stack: Any, path: str, method: str = "GET") -> Any:
    request = urllib.request.Request(f"{stack.glance_url}/v2{path}", method=method)
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    return json.loads(body) if body else None


def _ours(stack: Any) -> dict[str, dict[str, Any]]:
    """Our test's images in Glance, by id."""
    images = _glance(stack, "/images?limit=1000")["images"]
    return {i["id"]: i for i in images if i["name"].startswith(stack.prefix)}


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def test_an_image_set_with_a_qcow2_registers_in_glance_byte_for_byte(
    os_stack: Stack, origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    images = image_factory.publish(origin, size_mib=FS_MIB, fs_format="tar.gz", seed=31)
    qcow2 = make_qcow2(tmp_path / "disk.qcow2", b"qcow2 guest bytes" * 1000)
    q_url, q_sha1 = origin.put("disk.qcow2", qcow2), image_factory.sha1(qcow2)
    parts = images.parts
    entries = [(p.type, p.sha1, p.url) for p in parts.values()] + [("QCOW2", q_sha1, q_url)]
    xml = metadata_xml(entries)
    meta_url, meta_sha1 = origin.put("with-qcow2.xml", xml), _sha1(xml)
    registrar = os_stack.start()
    service = os_stack.zeep(registrar)

    answer = loads(service.RegisterImage(url=meta_url, signature=meta_sha1))
    assert set(answer) == {"FILESYSTEM", "KERNEL", "RAMDISK", "QCOW2"}
    glance = _ours(os_stack)
    assert set(glance) == set(answer.values())
    fs, kernel, ramdisk, disk = (
        glance[answer[k]] for k in ("FILESYSTEM", "KERNEL", "RAMDISK", "QCOW2")
    )
    assert (fs["disk_format"], fs["container_format"]) == ("ami", "ami")
    assert (kernel["disk_format"], ramdisk["disk_format"], disk["disk_format"]) == (
        "aki",
        "ari",
        "qcow2",
    )
    assert disk["container_format"] == "bare"
    assert (fs["kernel_id"], fs["ramdisk_id"]) == (answer["KERNEL"], answer["RAMDISK"])
    for image, source_sha1, url in (
        (fs, parts["ZFILESYSTEM"].sha1, parts["ZFILESYSTEM"].url),
        (kernel, parts["KERNEL"].sha1, parts["KERNEL"].url),
        (disk, q_sha1, q_url),
    ):
        assert image["status"] == "active"
        assert image["imageproxy_sha1"] == source_sha1
        assert image["imageproxy_source_url"] == url
        assert image["imageproxy_metadata_sha1"] == meta_sha1
    # What Glance stores: the raw filesystem (untarred, ungzipped); the rest byte for byte.
    raw = image_factory.ext4(FS_MIB, seed=31)
    assert _sha1(download_image(os_stack.glance_url, answer["FILESYSTEM"])) == image_factory.sha1(
        raw
    )
    assert (
        download_image(os_stack.glance_url, answer["KERNEL"]) == parts["KERNEL"].path.read_bytes()
    )
    assert (
        download_image(os_stack.glance_url, answer["RAMDISK"]) == parts["RAMDISK"].path.read_bytes()
    )
    assert download_image(os_stack.glance_url, answer["QCOW2"]) == qcow2.read_bytes()

    # A repeat is answered from the registry after one look at Glance.
    origin.reset_counts()
    assert loads(service.RegisterImage(url=meta_url, signature=meta_sha1)) == answer
    assert origin.requests() == 0
    # An image deleted in Glance is registered again.
    _glance(os_stack, f"/images/{answer['QCOW2']}", "DELETE")
    again = loads(service.RegisterImage(url=meta_url, signature=meta_sha1))
    assert again["QCOW2"] != answer["QCOW2"] and again["FILESYSTEM"] == answer["FILESYSTEM"]
    assert download_image(os_stack.glance_url, again["QCOW2"]) == qcow2.read_bytes()

    listed = subprocess.run(
        [*REGISTRAR, "list", "--config", str(os_stack.config)], capture_output=True, text=True
    )
    assert listed.returncode == 0 and again["QCOW2"] in listed.stdout


def test_a_wrong_sha1_never_becomes_a_glance_image(
    os_stack: Stack, origin: Origin, image_factory: ImageFactory
) -> None:
    images = image_factory.publish(origin, size_mib=8, fs_format="gz", seed=32, kernel=False)
    fs = images.parts["FILESYSTEM"]
    wrong = "2" * 40
    xml = metadata_xml([("FILESYSTEM", wrong, fs.url)])
    service = os_stack.zeep(os_stack.start())
    with pytest.raises(zeep.exceptions.Fault) as caught:
        service.RegisterImage(url=origin.put("wrong.xml", xml), signature=_sha1(xml))
    assert caught.value.message.startswith(f"signature {wrong} does not match")
    assert _ours(os_stack) == {}


def test_install_image_on_openstack_prints_the_glance_id(
    os_stack: Stack, image_factory: ImageFactory
) -> None:
    kernel = image_factory.blob(1 << 20, 33, "kernel")
    done = subprocess.run(
        [
            *REGISTRAR,
            "install-image",
            "--config",
            str(os_stack.config),
            "--type",
            "kernel",
            str(kernel),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    image_id = done.stdout.strip()
    assert _ours(os_stack)[image_id]["disk_format"] == "aki"
    assert download_image(os_stack.glance_url, image_id) == kernel.read_bytes()


def test_a_registrar_killed_mid_registration_leaves_no_glance_image_after_restart(
    os_stack_factory: Callable[[str], Stack],
    glance_proxy: GlanceProxy,
    origin: Origin,
    image_factory: ImageFactory,
) -> None:
    stack = os_stack_factory(glance_proxy.url)
    images = image_factory.publish(
        origin, size_mib=4, fs_format="raw", seed=34, kernel=False, ramdisk=False
    )
    glance_proxy.report_status = "saving"  # the image never looks active to the registrar
    registrar = stack.start()
    caller, outcome = register_in_background(
        stack.zeep(registrar), images.metadata_url, images.metadata_sha1
    )
    deadline = time.monotonic() + 60
    while not any(i["status"] == "active" for i in _ours(stack).values()):
        assert time.monotonic() < deadline, "the upload never finished"
        time.sleep(0.1)
    (made,) = _ours(stack).values()
    assert made["imageproxy_sha1"] == images.parts["FILESYSTEM"].sha1
    registrar.stop(signal.SIGKILL)
    caller.join(60)
    assert outcome and not isinstance(outcome[0], str)

    glance_proxy.report_status = None
    restarted = stack.start()  # cleans up what the killed one left, before it listens
    assert _ours(stack) == {}
    assert "cleaned up" in restarted.log_text()
    answer = loads(
        stack.zeep(restarted).RegisterImage(url=images.metadata_url, signature=images.metadata_sha1)
    )
    assert list(_ours(stack)) == [answer["FILESYSTEM"]]


def test_a_published_qcow2_registers_in_glance_through_soap(
    capsys: pytest.CaptureFixture[str], os_stack: Stack, origin: Origin, tmp_path: Path
) -> None:
    """`registrar publish` of a QCOW2 alone, served by nginx, registered on OpenStack."""
    disk = qcow2_image(tmp_path / "disk.qcow2")
    published = publish_to(origin, tmp_path / "q", disk)
    assert [f.type for f in published.files] == ["QCOW2"]
    service = os_stack.zeep(os_stack.start())
    answer = loads(
        service.RegisterImage(url=published.metadata_url, signature=published.metadata_sha1)
    )
    assert answer["FILESYSTEM"] == answer["KERNEL"] == answer["RAMDISK"] == ""
    assert _ours(os_stack)[answer["QCOW2"]]["disk_format"] == "qcow2"
    assert download_image(os_stack.glance_url, answer["QCOW2"]) == disk.read_bytes()
