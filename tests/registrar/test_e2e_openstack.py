"""End to end on OpenStack: ORCA's call → the real registrar → the real imgstore mount → a real
Glance (no Keystone; the password path is in test_openstack_backend.py).

Every image registered is downloaded back from Glance and compared byte for byte with its
source; the properties that trace it to its source are checked as an operator would see them.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zeep.exceptions

from tests.imgstore.helpers import wait_for
from tests.registrar.e2e_stack import (
    IMGSTORE,
    REGISTRAR,
    Registrar,
    Stack,
    register_in_background,
)
from tests.registrar.owner_support import publish_to, qcow2_image
from tests.registrar.soap_javaprops import loads
from tests.support.fusemount import Mounted
from tests.support.glance_proxy import GlanceProxy
from tests.support.images import ImageFactory, ImageSet, Part, metadata_xml
from tests.support.openstack import GlanceServer, download_image, make_qcow2
from tests.support.origin import Origin

FS_MIB = 16
SMALL_FS_MIB = 8  # where the filesystem's size does not matter
CALLERS = 6


@pytest.fixture
def os_stack_factory(
    tmp_path: Path, glance_noauth: GlanceServer, fuse_mount: Callable[..., Mounted]
) -> Iterator[Callable[..., Stack]]:
    """A site whose cloud is the Glance at the given URL (the session's, or a proxy to it);
    `register_timeout` is the config's seconds to wait for `active`."""
    stacks: list[Stack] = []

    def build(glance_url: str, register_timeout: float = 120) -> Stack:
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
register_timeout = {register_timeout}
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
def os_stack(os_stack_factory: Callable[..., Stack], glance_noauth: GlanceServer) -> Stack:
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
    os_stack_factory: Callable[..., Stack],
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


# --- guarantees ORCA relies on, seen through the SOAP service on Glance ---

_CREATED = re.compile(r"created Glance image ([0-9a-f-]{36}) \(\S+, (\w+)\)")


def _created(registrar: Registrar) -> dict[str, list[str]]:
    """The Glance images the registrar says it created, by disk format, oldest first."""
    made: dict[str, list[str]] = {}
    for image_id, disk_format in _CREATED.findall(registrar.log_text()):
        made.setdefault(disk_format, []).append(image_id)
    return made


def _stored(glance: GlanceServer) -> set[str]:
    """The image files in Glance's own store: what a deleted image must not leave behind."""
    return {path.name for path in glance.images_dir.iterdir()}


def _check_set(
    stack: Any, image_factory: ImageFactory, images: ImageSet, answer: dict[str, str], seed: int
) -> None:
    """Glance holds one active image per part, nothing else of ours, each with the source's
    bytes (the filesystem decompressed); the machine image names its kernel and ramdisk."""
    assert set(answer) == {"FILESYSTEM", "KERNEL", "RAMDISK"}
    glance = _ours(stack)
    assert set(glance) == set(answer.values())
    assert all(image["status"] == "active" for image in glance.values())
    fs = glance[answer["FILESYSTEM"]]
    assert (fs["kernel_id"], fs["ramdisk_id"]) == (answer["KERNEL"], answer["RAMDISK"])
    raw = image_factory.ext4(SMALL_FS_MIB, seed=seed)
    fs_bytes = download_image(stack.glance_url, answer["FILESYSTEM"])
    assert _sha1(fs_bytes) == image_factory.sha1(raw)
    for kind in ("KERNEL", "RAMDISK"):
        assert (
            download_image(stack.glance_url, answer[kind]) == images.parts[kind].path.read_bytes()
        )


def test_concurrent_identical_calls_register_each_part_in_glance_once(
    os_stack_factory: Callable[..., Stack],
    glance_proxy: GlanceProxy,
    origin: Origin,
    image_factory: ImageFactory,
) -> None:
    stack = os_stack_factory(glance_proxy.url)  # the proxy counts the uploads
    images = image_factory.publish(origin, size_mib=SMALL_FS_MIB, fs_format="gz", seed=35)
    registrar = stack.start()
    answers: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(CALLERS, timeout=60)

    def call() -> None:
        try:
            service = stack.zeep(registrar)
            start.wait()
            answers.append(
                service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1)
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(170)
    assert errors == []
    assert len(answers) == CALLERS and len(set(answers)) == 1
    _check_set(stack, image_factory, images, loads(answers[0]), seed=35)
    assert glance_proxy.uploads == 3
    # Every part was fetched once (plus imgstore's size probe), nothing more.
    for part in images.parts.values():
        size = part.path.stat().st_size
        assert size <= origin.bytes_sent(part.name) < size + 64 * 1024


def _flip_fault(fs: Part, raw: Path, at: int, image_id: str) -> str:
    """The fault for a filesystem whose byte `at` Glance received changed: both sha512s."""
    data = bytearray(raw.read_bytes())  # what the registrar sends: the filesystem unpacked
    sent = hashlib.sha512(data).hexdigest()
    data[at] ^= 0xFF
    return (
        f"registering the FILESYSTEM image from {fs.url} failed: verify: Glance's sha512 of "
        f"image {image_id} is {hashlib.sha512(data).hexdigest()}, the bytes sent have {sent}"
    )


@pytest.mark.parametrize("failure", ["wrong SHA-1", "changed byte"])
def test_a_filesystem_failing_after_its_kernel_and_ramdisk_leaves_only_them_for_the_retry(
    failure: str,
    os_stack_factory: Callable[..., Stack],
    glance_proxy: GlanceProxy,
    glance_noauth: GlanceServer,
    origin: Origin,
    image_factory: ImageFactory,
) -> None:
    """The kernel and ramdisk are registered (active) before the machine image that names them.
    When the filesystem then fails, its own image goes, in whatever state, and they stay, in
    Glance and in the registry, for the corrected call to reuse (service.py: a registered part
    is kept for the next call)."""
    stack = os_stack_factory(glance_proxy.url)
    images = image_factory.publish(origin, size_mib=SMALL_FS_MIB, fs_format="gz", seed=36)
    fs, kernel, ramdisk = (images.parts[t] for t in ("FILESYSTEM", "KERNEL", "RAMDISK"))
    url, signature = images.metadata_url, images.metadata_sha1
    wrong = "3" * 40
    if failure == "wrong SHA-1":  # found by imgstore when the whole filesystem has been read
        entries = [
            (kernel.type, kernel.sha1, kernel.url),
            (ramdisk.type, ramdisk.sha1, ramdisk.url),
        ]
        xml = metadata_xml([*entries, (fs.type, wrong, fs.url)])
        url, signature = origin.put("wrong-fs.xml", xml), _sha1(xml)
    else:  # found once Glance has the whole image, active: only its upload is this long
        glance_proxy.flip_upload_byte = kernel.path.stat().st_size
    registrar = stack.start()
    service = stack.zeep(registrar)
    stored_before = _stored(glance_noauth)

    with pytest.raises(zeep.exceptions.Fault) as caught:
        service.RegisterImage(url=url, signature=signature)
    created = _created(registrar)
    (kernel_id,), (ramdisk_id,) = created["aki"], created["ari"]
    if failure == "wrong SHA-1":
        assert caught.value.message == (
            f"signature {wrong} does not match computed signature {fs.sha1} "
            f"for FILESYSTEM image at {fs.url}"
        )
    else:
        (fs_id,) = created["ami"]
        raw = image_factory.ext4(SMALL_FS_MIB, seed=36)
        assert caught.value.message == _flip_fault(fs, raw, kernel.path.stat().st_size, fs_id)
    glance = _ours(stack)  # any status: not even a `queued` or `killed` filesystem is left
    assert {(i["id"], i["status"], i["imageproxy_sha1"]) for i in glance.values()} == {
        (kernel_id, "active", kernel.sha1),
        (ramdisk_id, "active", ramdisk.sha1),
    }
    assert _stored(glance_noauth) - stored_before == {kernel_id, ramdisk_id}
    listed = subprocess.run(
        [*REGISTRAR, "list", "--config", str(stack.config)], capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    assert kernel_id in listed.stdout and ramdisk_id in listed.stdout
    assert "In flight" not in listed.stdout

    glance_proxy.flip_upload_byte = None
    origin.reset_counts()
    answer = loads(service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1))
    assert (answer["KERNEL"], answer["RAMDISK"]) == (kernel_id, ramdisk_id)
    assert origin.requests(kernel.name) == origin.requests(ramdisk.name) == 0
    _check_set(stack, image_factory, images, answer, seed=36)


FLIPPED = 1000  # any byte: Glance stores, and hashes, other bytes than were sent


def test_a_byte_changed_on_the_way_to_glance_is_a_soap_fault_and_leaves_no_image(
    os_stack_factory: Callable[..., Stack],
    glance_proxy: GlanceProxy,
    glance_noauth: GlanceServer,
    origin: Origin,
    image_factory: ImageFactory,
) -> None:
    stack = os_stack_factory(glance_proxy.url)
    images = image_factory.publish(
        origin, size_mib=SMALL_FS_MIB, fs_format="gz", seed=37, kernel=False, ramdisk=False
    )
    glance_proxy.flip_upload_byte = FLIPPED
    registrar = stack.start()
    stored_before = _stored(glance_noauth)

    with pytest.raises(zeep.exceptions.Fault) as caught:
        stack.zeep(registrar).RegisterImage(url=images.metadata_url, signature=images.metadata_sha1)
    (image_id,) = _created(registrar)["ami"]
    raw = image_factory.ext4(SMALL_FS_MIB, seed=37)
    message = _flip_fault(images.parts["FILESYSTEM"], raw, FLIPPED, image_id)
    assert (caught.value.code, caught.value.message) == ("soapenv:Server", message)
    assert glance_proxy.uploads == 1
    assert _ours(stack) == {}
    assert _stored(glance_noauth) == stored_before
    # The server logs the request after it has answered it.
    wait_for(lambda: f": fault: {message} (" in registrar.log_text(), what="the logged fault")


def test_an_image_never_active_is_a_fault_naming_the_wait_and_deletes_every_image_made(
    os_stack_factory: Callable[..., Stack],
    glance_proxy: GlanceProxy,
    glance_noauth: GlanceServer,
    origin: Origin,
    image_factory: ImageFactory,
) -> None:
    stack = os_stack_factory(glance_proxy.url, register_timeout=1)
    images = image_factory.publish(origin, size_mib=SMALL_FS_MIB, fs_format="gz", seed=38)
    kernel = images.parts["KERNEL"]
    glance_proxy.report_status = "saving"  # no image ever looks active to the registrar
    registrar = stack.start()
    service = stack.zeep(registrar)
    stored_before = _stored(glance_noauth)

    with pytest.raises(zeep.exceptions.Fault) as caught:
        service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1)
    created = _created(registrar)
    (kernel_id,), (ramdisk_id,) = created["aki"], created["ari"]
    # Both waits ran out; the answer names the first part's. The machine image, which names
    # the kernel and ramdisk, was never begun.
    assert caught.value.message == (
        f"registering the KERNEL image from {kernel.url} failed: waiting for active: "
        f"Glance image {kernel_id} still saving after 1 s"
    )
    assert "ami" not in created and glance_proxy.uploads == 2
    assert _ours(stack) == {}
    assert _stored(glance_noauth) == stored_before
    log = registrar.log_text()
    for image_id in (kernel_id, ramdisk_id):
        assert f"deleted failed Glance image {image_id}" in log

    # Nothing the failed call left (a claim, a pin) stands in the way of the next one.
    glance_proxy.report_status = None
    answer = loads(service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1))
    _check_set(stack, image_factory, images, answer, seed=38)
