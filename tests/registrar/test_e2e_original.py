"""End to end: what a site moving from the original ImageProxy brings with it registers the
same way: its metadata shapes, imgcapture.sh's tars, QCOW2 entries, empty entries, its
registry (`imageproxy.db`), and filesystems mixed and matched with kernels and ramdisks.

Real registrar, real imgstore mount, nginx origin, moto cloud behind the recording proxy.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import tarfile
from pathlib import Path

import pytest
import zeep.exceptions

from tests.registrar import e2e_stack
from tests.registrar.e2e_bundles import unbundle
from tests.registrar.e2e_stack import REGISTRAR, Stack
from tests.registrar.soap_javaprops import loads
from tests.support.images import ImageFactory, metadata_xml
from tests.support.origin import Origin

stack, stack_factory = e2e_stack.stack, e2e_stack.stack_factory  # fixtures

FS_MIB = 8


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _wiki_metadata(fs: tuple[str, str], kernel: tuple[str, str], ramdisk: tuple[str, str]) -> bytes:
    """The shape of the original's wiki example: one <image> per file, values on their own lines
    (so with surrounding whitespace, which the original's users were bitten by)."""
    entries = "".join(
        f"""
  <image>
    <type>{kind}</type>
    <signature>
      {sha1}
    </signature>
    <url>
      {url}
    </url>
  </image>"""
        for kind, (sha1, url) in (("FILESYSTEM", fs), ("KERNEL", kernel), ("RAMDISK", ramdisk))
    )
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<images>{entries}\n</images>\n'.encode()


def _imgcapture_tgz(
    src: Path, out: Path, extra: dict[str, bytes] | None = None, member: str = "filesystem"
) -> Path:
    """What imgcapture.sh made: `tar -Sczvf name.tgz -C dir filesystem` (extra members first;
    `member="./filesystem"` for a tar made with `tar -C dir -Sczf x.tgz ./filesystem`)."""
    work = out.parent / (out.name + ".d")
    work.mkdir()
    names = []
    for name, data in (extra or {}).items():
        (work / name).write_bytes(data)
        names.append(name)
    shutil.copyfile(src, work / "filesystem")
    subprocess.run(["fallocate", "--dig-holes", str(work / "filesystem")], check=True)
    names.append(member)
    subprocess.run(
        ["tar", "-Sczvf", str(out), "-C", str(work), *names], check=True, capture_output=True
    )
    return out


def test_wiki_metadata_and_imgcapture_tar_register_the_filesystem(
    stack: Stack, origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    raw = image_factory.ext4(FS_MIB, seed=21)
    kernel = image_factory.blob(1 << 20, 21, "kernel")
    ramdisk = image_factory.blob(1 << 20, 21, "ramdisk")
    service = stack.zeep(stack.start())
    k_url, r_url = origin.put("vmlinuz", kernel), origin.put("initrd.img", ramdisk)
    k_sha1, r_sha1 = image_factory.sha1(kernel), image_factory.sha1(ramdisk)

    # The wiki's FILESYSTEM/KERNEL/RAMDISK file, the filesystem raw.
    fs_url = origin.put("filesystem.img", raw)
    wiki = _wiki_metadata((image_factory.sha1(raw), fs_url), (k_sha1, k_url), (r_sha1, r_url))
    answer = loads(service.RegisterImage(url=origin.put("wiki.xml", wiki), signature=_sha1(wiki)))
    assert unbundle(stack.cloud, answer["FILESYSTEM"]).sha1 == image_factory.sha1(raw)
    assert unbundle(stack.cloud, answer["KERNEL"]).sha1 == k_sha1

    # imgcapture.sh's ZFILESYSTEM, the same with a README before `filesystem`, and before
    # `./filesystem` (a tar made from inside the directory).
    readme = {"README": b"how this image was made\n"}
    for n, (extra, member) in enumerate(
        ((None, "filesystem"), (readme, "filesystem"), (readme, "./filesystem"))
    ):
        tgz = _imgcapture_tgz(raw, tmp_path / f"img-{n}.tgz", extra, member)
        with tarfile.open(tgz) as tar:
            assert tar.getnames() == [*(extra or {}), member]
        tgz_url = origin.put(tgz.name, tgz)
        xml = metadata_xml(
            [("ZFILESYSTEM", image_factory.sha1(tgz), tgz_url), ("KERNEL", k_sha1, k_url)]
        )
        answer = loads(
            service.RegisterImage(url=origin.put(f"{tgz.name}.xml", xml), signature=_sha1(xml))
        )
        machine = unbundle(stack.cloud, answer["FILESYSTEM"])
        assert machine.sha1 == image_factory.sha1(raw), "the member named filesystem, not README"


def test_a_tar_without_filesystem_uses_its_only_file_or_is_a_fault_naming_its_members(
    stack: Stack, origin: Origin, tmp_path: Path
) -> None:
    work = tmp_path / "t"
    work.mkdir()
    (work / "README").write_bytes(b"hello\n")
    (work / "disk.img").write_bytes(bytes(range(256)) * 4096)
    tgz = tmp_path / "bad.tgz"
    subprocess.run(["tar", "-czf", str(tgz), "-C", str(work), "README", "disk.img"], check=True)
    tgz_url = origin.put("bad.tgz", tgz)
    xml = metadata_xml([("ZFILESYSTEM", _sha1(tgz.read_bytes()), tgz_url)])
    registrar = stack.start()
    service = stack.zeep(registrar)
    with pytest.raises(zeep.exceptions.Fault) as caught:
        service.RegisterImage(url=origin.put("bad.xml", xml), signature=_sha1(xml))
    assert caught.value.message == (
        f"registering the ZFILESYSTEM image from {tgz_url} failed: the tar inside the image has "
        "no member named 'filesystem' and 2 regular files; members found: 'README', 'disk.img'"
    )
    assert stack.cloud.bucket_keys() == [] and stack.cloud.image_ids() == []

    # The same disk.img alone in the tar: it is the image, with a warning in the log.
    one = tmp_path / "one.tgz"
    subprocess.run(["tar", "-czf", str(one), "-C", str(work), "disk.img"], check=True)
    xml = metadata_xml([("ZFILESYSTEM", _sha1(one.read_bytes()), origin.put("one.tgz", one))])
    answer = loads(service.RegisterImage(url=origin.put("one.xml", xml), signature=_sha1(xml)))
    assert unbundle(stack.cloud, answer["FILESYSTEM"]).sha1 == _sha1(
        (work / "disk.img").read_bytes()
    )
    assert (
        "the tar holds no member named 'filesystem'; using its only file 'disk.img'"
        in registrar.log_text()
    )


def test_empty_entries_are_skipped_and_qcow2_on_eucalyptus(
    stack: Stack, origin: Origin, image_factory: ImageFactory
) -> None:
    raw = image_factory.ext4(FS_MIB, seed=22)
    fs_url, fs_sha1 = origin.put("fs.img", raw), image_factory.sha1(raw)
    qcow2 = b"QFI\xfb\x00\x00\x00\x03" + bytes(1016)
    q_url = origin.put("disk.qcow2", qcow2)
    registrar = stack.start()
    service = stack.zeep(registrar)

    # An empty ramdisk slot, an entry with an empty <type>, and a QCOW2 beside the
    # filesystem: the filesystem registers.
    untyped = image_factory.blob(1 << 20, 22)
    untyped_url = origin.put("untyped.img", untyped)
    xml = (
        b"<images>"
        b"<image><type>RAMDISK</type><signature></signature><url></url></image>"
        + f"<image><type></type><signature>{image_factory.sha1(untyped)}</signature>"
        f"<url>{untyped_url}</url></image>".encode()
        + f"<image><type>QCOW2</type><signature>{_sha1(qcow2)}</signature>"
        f"<url>{q_url}</url></image>".encode()
        + f"<image><type>FILESYSTEM</type><signature>{fs_sha1}</signature>"
        f"<url>{fs_url}</url></image>".encode()
        + b"</images>"
    )
    text = service.RegisterImage(url=origin.put("mixed.xml", xml), signature=_sha1(xml))
    answer = loads(text)
    assert answer == {"FILESYSTEM": answer["FILESYSTEM"], "KERNEL": "", "RAMDISK": ""}
    assert unbundle(stack.cloud, answer["FILESYSTEM"]).sha1 == fs_sha1
    assert origin.requests("disk.qcow2") == 0, "a skipped QCOW2 is not fetched"
    assert origin.requests("untyped.img") == 0, "nor an entry without a type"
    log = registrar.log_text()
    assert "skipping image entry 1, whose <url> and <signature> are empty" in log
    assert "skipping image entry 2, whose <type> is empty" in log
    assert f"QCOW2 image {q_url} skipped: Eucalyptus cannot register QCOW2 images" in log

    # A QCOW2 alone: a fault that says what is needed.
    alone = metadata_xml([("QCOW2", _sha1(qcow2), q_url)])
    alone_url = origin.put("alone.xml", alone)
    with pytest.raises(zeep.exceptions.Fault) as caught:
        service.RegisterImage(url=alone_url, signature=_sha1(alone))
    assert caught.value.message == (
        f"metadata at {alone_url} lists only a QCOW2 image; QCOW2 images need an OpenStack "
        "cloud, and this site registers images with Eucalyptus"
    )


def test_a_new_kernel_for_a_bundled_filesystem_costs_a_manifest_not_the_parts(
    stack: Stack, origin: Origin, image_factory: ImageFactory
) -> None:
    first = image_factory.publish(origin, size_mib=16, fs_format="raw", prefix="a/")
    fs = first.parts["FILESYSTEM"]
    service = stack.zeep(stack.start())
    one = loads(service.RegisterImage(url=first.metadata_url, signature=first.metadata_sha1))
    part_puts = [r for r in stack.cloud.s3_requests if r[0] == "PUT" and ".part." in r[1]]
    assert len(part_puts) >= 3  # 16 MiB of filesystem: at least two parts, and the kernel's

    # The same filesystem with another kernel (and the same ramdisk).
    kernel2 = image_factory.blob(3 << 20, 99, "kernel")
    k2_url = origin.put("b/vmlinuz", kernel2)
    ramdisk = first.parts["RAMDISK"]
    xml = metadata_xml(
        [
            ("FILESYSTEM", fs.sha1, fs.url),
            ("KERNEL", image_factory.sha1(kernel2), k2_url),
            ("RAMDISK", ramdisk.sha1, ramdisk.url),
        ]
    )
    before = len(stack.cloud.s3_requests)
    origin.reset_counts()
    two = loads(service.RegisterImage(url=origin.put("b/metadata.xml", xml), signature=_sha1(xml)))
    assert two["RAMDISK"] == one["RAMDISK"] and two["KERNEL"] != one["KERNEL"]
    assert two["FILESYSTEM"] != one["FILESYSTEM"]
    new_puts = [r[1] for r in stack.cloud.s3_requests[before:] if r[0] == "PUT"]
    fs_folder = unbundle(stack.cloud, one["FILESYSTEM"]).location.split("/")[1]
    fs_puts = [p for p in new_puts if f"/{fs_folder}/" in p]
    assert len(fs_puts) == 1 and fs_puts[0].endswith(".manifest.xml"), new_puts
    assert not any(".part." in p and f"/{fs_folder}/" in p for p in new_puts)
    assert origin.requests(fs.name) == 0, "the filesystem is not fetched again"
    # The new image holds the same filesystem and names the new kernel.
    machine = unbundle(stack.cloud, two["FILESYSTEM"])
    assert machine.sha1 == fs.sha1
    assert (machine.kernel_id, machine.ramdisk_id) == (two["KERNEL"], two["RAMDISK"])
    call = stack.cloud.calls_of("RegisterImage")[-1]
    assert (call.get("KernelId"), call.get("RamdiskId")) == (two["KERNEL"], two["RAMDISK"])
    assert call["ImageLocation"].split("/")[1] == fs_folder


def _original_db(path: Path, rows: list[tuple[str, str]]) -> Path:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE IMAGE (SIGNATURE STRING, IMAGE_ID STRING)")
    db.executemany("INSERT INTO IMAGE VALUES (?, ?)", rows)
    db.commit()
    db.close()
    return path


def test_import_registry_then_register_answers_the_originals_ids(
    stack: Stack, origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    images = image_factory.publish(origin, size_mib=8, fs_format="raw", seed=23)
    # Images "the original registered": any manifest will do for moto, which checks none.
    ids = {}
    for kind, name in (("FILESYSTEM", "orig-fs"), ("KERNEL", "orig-k"), ("RAMDISK", "orig-r")):
        ids[kind] = stack.cloud.ec2.register_image(
            Name=name, ImageLocation=f"old-bucket/{name}/{name}.manifest.xml"
        )["ImageId"]
    gone = stack.cloud.ec2.register_image(Name="orig-gone", ImageLocation="old/x.manifest.xml")
    stack.cloud.ec2.deregister_image(ImageId=gone["ImageId"])
    parts = images.parts
    db = _original_db(
        tmp_path / "imageproxy.db",
        [
            (parts["FILESYSTEM"].sha1, ids["FILESYSTEM"]),
            (parts["KERNEL"].sha1, ids["KERNEL"]),
            (parts["RAMDISK"].sha1, ids["RAMDISK"]),
            ("9a" * 20, gone["ImageId"]),
            ("8b" * 20, "INPROGRESS"),
        ],
    )
    command = [*REGISTRAR, "import-registry", "--config", str(stack.config), str(db)]
    describes = len(stack.cloud.calls_of("DescribeImages"))
    first = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert first.stdout == (
        f"imported 3 images from {db} (0 already imported, 1 no longer in the cloud, "
        "1 unfinished registrations skipped, 0 malformed rows skipped)\n"
    )
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.stdout.startswith(f"imported 0 images from {db} (3 already imported,")
    # One DescribeImages per import: the first asks about the four ids, the second only about
    # the one that was gone (it was not imported, so it is asked about again).
    asked = [
        sorted(v for k, v in call.items() if k.startswith("ImageId."))
        for call in stack.cloud.calls_of("DescribeImages")[describes:]
    ]
    assert asked == [sorted([*ids.values(), gone["ImageId"]]), [gone["ImageId"]]]

    keys_before = stack.cloud.bucket_keys()
    origin.reset_counts()
    service = stack.zeep(stack.start())
    answer = loads(service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1))
    assert answer == ids
    assert origin.requests() == origin.requests("metadata.xml") > 0, "only the metadata"
    assert stack.cloud.bucket_keys() == keys_before
    assert stack.cloud.calls_of("RegisterImage") == []

    bad = tmp_path / "not-a-db"
    bad.write_bytes(b"hello")
    failed = subprocess.run(
        [*REGISTRAR, "import-registry", "--config", str(stack.config), str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode == 2
    assert failed.stderr.startswith(f"registrar import-registry: {bad} is not the original")
    assert len(failed.stderr.splitlines()) == 1


def test_a_failed_new_combination_removes_only_its_manifest(
    stack: Stack, origin: Origin, image_factory: ImageFactory
) -> None:
    first = image_factory.publish(origin, size_mib=8, fs_format="raw", seed=24, ramdisk=False)
    fs = first.parts["FILESYSTEM"]
    service = stack.zeep(stack.start())
    one = loads(service.RegisterImage(url=first.metadata_url, signature=first.metadata_sha1))
    # A second kernel, registered beside another filesystem.
    kernel2 = image_factory.blob(1 << 20, 98, "kernel")
    k2 = ("KERNEL", image_factory.sha1(kernel2), origin.put("k2", kernel2))
    other = image_factory.blob(1 << 20, 97)
    xml = metadata_xml([("FILESYSTEM", image_factory.sha1(other), origin.put("o", other)), k2])
    service.RegisterImage(url=origin.put("o.xml", xml), signature=_sha1(xml))
    keys = stack.cloud.bucket_keys()
    images = stack.cloud.image_ids()

    # The first filesystem with the second kernel: the cloud refuses the registration.
    stack.cloud.refuse("RegisterImage", "InvalidManifest", "manifest refused")
    xml = metadata_xml([("FILESYSTEM", fs.sha1, fs.url), k2])
    with pytest.raises(zeep.exceptions.Fault) as caught:
        service.RegisterImage(url=origin.put("k2.xml", xml), signature=_sha1(xml))
    assert caught.value.message == (
        f"registering the FILESYSTEM image from {fs.url} failed: RegisterImage: "
        "InvalidManifest: manifest refused"
    )
    puts = [r[1] for r in stack.cloud.s3_requests if r[0] == "PUT"]
    assert puts[-1].endswith(".manifest.xml"), "the new manifest was uploaded …"
    assert stack.cloud.bucket_keys() == keys, "… and removed; the shared parts stay"
    assert stack.cloud.image_ids() == images
    stack.cloud.stop_refusing()
    assert unbundle(stack.cloud, one["FILESYSTEM"]).sha1 == fs.sha1
    two = loads(service.RegisterImage(url=origin.url("k2.xml"), signature=_sha1(xml)))
    assert unbundle(stack.cloud, two["FILESYSTEM"]).kernel_id == two["KERNEL"]
