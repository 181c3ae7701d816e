"""`registrar check`: each publishing mistake is caught with its message; a good image passes.

Images are served by a real nginx (tests/support/origin.py); one started with `max_ranges 0`
plays a server that ignores Range. The command runs in this process (`registrar.cli.main`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.registrar.owner_support import publish_to, qcow2_image, run
from tests.support.images import ImageFactory, metadata_xml
from tests.support.nginxproc import free_port
from tests.support.origin import Origin, start_origin

FS_MIB = 8


def _kernel_ramdisk(image_factory: ImageFactory) -> dict[str, Path]:
    return {
        "kernel": image_factory.blob(1 << 20, 7, "kernel"),
        "ramdisk": image_factory.blob(1 << 19, 7, "ramdisk"),
    }


def _put_metadata(
    origin: Origin, name: str, entries: list[tuple[str, str, str]]
) -> tuple[str, str]:
    xml = metadata_xml(entries)
    return origin.put(name, xml), hashlib.sha1(xml).hexdigest()


def test_a_good_image_passes_with_every_file_downloaded_once(
    capsys: pytest.CaptureFixture[str], origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    image = image_factory.sparse_tar_gz(FS_MIB)
    published = publish_to(origin, tmp_path / "good", image, **_kernel_ramdisk(image_factory))
    origin.reset_counts()

    code, out, err = run(capsys, "check", published.metadata_url, published.metadata_sha1)

    assert (code, err) == (0, ""), out
    assert f"SHA-1 {published.metadata_sha1} (ok)" in out
    assert "verdict: OK - every site would register it (3 file(s) downloaded and verified)" in out
    for f in published.files:
        line = next(row for row in out.splitlines() if row.startswith(f"{f.type} "))
        assert line.split()[1] == "yes" and " ok " in line and line.endswith(f.url)
    assert "gzip tar (member 'filesystem', sparse), 8.0 MiB raw" in out
    # One ranged probe and one full download per file; the metadata once.
    for f in published.files:
        name = f"good/{f.path.name}"
        assert [e["range"] for e in origin.log(name)] == ["bytes=0-0", ""]
        assert origin.bytes_sent(name) == 1 + f.size
    assert origin.requests(f"good/{published.metadata_path.name}") == 1


def test_a_wrong_metadata_sha1_is_refused(
    capsys: pytest.CaptureFixture[str], origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    published = publish_to(origin, tmp_path / "img", image_factory.ext4(FS_MIB))
    wrong = "0" * 40

    code, out, _ = run(capsys, "check", published.metadata_url, wrong)

    assert code == 1
    assert (
        f"problem: the metadata's SHA-1 is {published.metadata_sha1}, not {wrong}: every site "
        "refuses it" in out
    )
    assert "verdict: NOT READY - 1 problem(s) above" in out


def test_a_part_whose_sha1_does_not_match_is_refused(
    capsys: pytest.CaptureFixture[str], origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    files = _kernel_ramdisk(image_factory)
    published = publish_to(origin, tmp_path / "img", image_factory.ext4(FS_MIB), **files)
    # The owner rebuilt the kernel after publishing, and uploaded only the kernel.
    other = image_factory.blob(1 << 20, 8, "kernel")
    origin.put(f"img/{files['kernel'].name}", other)

    code, out, _ = run(capsys, "check", published.metadata_url, published.metadata_sha1)

    assert code == 1
    declared = image_factory.sha1(files["kernel"])
    assert (
        f"problem: KERNEL: the file's SHA-1 is {image_factory.sha1(other)}, the metadata says "
        f"{declared}: every site refuses it" in out
    )
    assert out.count("problem:") == 1


@pytest.mark.parametrize("fmt", ["gz", "bz2", "xz"])
def test_a_compressed_image_declared_filesystem_is_refused(
    capsys: pytest.CaptureFixture[str], origin: Origin, image_factory: ImageFactory, fmt: str
) -> None:
    image = image_factory.compressed(fmt, FS_MIB)
    url = origin.put(f"fs.img.{fmt}", image)
    meta_url, meta_sha1 = _put_metadata(
        origin, "m.xml", [("FILESYSTEM", image_factory.sha1(image), url)]
    )

    code, out, _ = run(capsys, "check", meta_url, meta_sha1)

    assert code == 1
    name = {"gz": "gzip", "bz2": "bzip2", "xz": "xz"}[fmt]
    assert (
        f"problem: FILESYSTEM: declared FILESYSTEM, but the file is compressed ({name}, "
        f"8.0 MiB raw): declare it ZFILESYSTEM" in out
    )


def test_a_raw_image_declared_zfilesystem_is_refused_even_by_quick(
    capsys: pytest.CaptureFixture[str], origin: Origin, image_factory: ImageFactory
) -> None:
    image = image_factory.blob(32 << 20, 3)  # raw bytes, big beside what sockets buffer
    url = origin.put("fs.img", image)
    meta_url, meta_sha1 = _put_metadata(
        origin, "m.xml", [("ZFILESYSTEM", image_factory.sha1(image), url)]
    )
    origin.reset_counts()

    code, out, _ = run(capsys, "check", "--quick", meta_url, meta_sha1)

    assert code == 1
    assert (
        "problem: ZFILESYSTEM: declared ZFILESYSTEM, but the file is not compressed: declare it "
        "FILESYSTEM" in out
    )
    # --quick read the start only (nginx may have sent a little more before the hang-up).
    origin.wait_idle()
    assert origin.bytes_sent("fs.img") < image.stat().st_size // 2


def test_a_corrupt_zfilesystem_is_refused(
    capsys: pytest.CaptureFixture[str], origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    whole = image_factory.compressed("gz", FS_MIB).read_bytes()
    truncated = tmp_path / "cut.img.gz"
    truncated.write_bytes(whole[: len(whole) * 2 // 3])  # its SHA-1 is right: the file is not
    url = origin.put("cut.img.gz", truncated)
    meta_url, meta_sha1 = _put_metadata(
        origin, "m.xml", [("ZFILESYSTEM", image_factory.sha1(truncated), url)]
    )

    code, out, _ = run(capsys, "check", meta_url, meta_sha1)

    assert code == 1
    assert "problem: ZFILESYSTEM: gzip data is corrupt or truncated" in out


def test_a_server_ignoring_range_is_caught(
    capsys: pytest.CaptureFixture[str],
    image_factory: ImageFactory,
    tmp_path: Path,
) -> None:
    with start_origin(tmp_path / "norange", extra_http="max_ranges 0;") as origin:
        published = publish_to(origin, tmp_path / "img", image_factory.ext4(FS_MIB))

        code, out, _ = run(capsys, "check", published.metadata_url, published.metadata_sha1)

    assert code == 1
    assert (
        "problem: FILESYSTEM: the server ignores Range requests (it answered 200 to "
        "`Range: bytes=0-0`)" in out
    )
    assert "NO" in next(line for line in out.splitlines() if line.startswith("FILESYSTEM"))


@pytest.mark.parametrize("where", ["unresolvable host", "refused connection"])
def test_a_url_only_the_owner_can_reach_is_caught(
    capsys: pytest.CaptureFixture[str], origin: Origin, image_factory: ImageFactory, where: str
) -> None:
    image = image_factory.ext4(FS_MIB)
    if where == "unresolvable host":
        url = "http://images.internal.invalid/fs.img"  # .invalid never resolves (RFC 2606)
    else:
        url = f"http://127.0.0.1:{free_port()}/fs.img"  # nothing listens there
    meta_url, meta_sha1 = _put_metadata(
        origin, "m.xml", [("FILESYSTEM", image_factory.sha1(image), url)]
    )

    code, out, _ = run(capsys, "check", meta_url, meta_sha1)

    assert code == 1
    assert "problem: FILESYSTEM: unreachable from here (" in out
    assert "a URL must work from every site's head node, not only from your own network" in out
    assert next(line for line in out.splitlines() if line.startswith("FILESYSTEM")).split()[1] == (
        "NO"
    )


def test_metadata_the_service_would_refuse_is_refused_with_its_message(
    capsys: pytest.CaptureFixture[str], origin: Origin, image_factory: ImageFactory
) -> None:
    kernel = image_factory.blob(1 << 20, 7, "kernel")
    url = origin.put("vmlinuz", kernel)
    meta_url, meta_sha1 = _put_metadata(
        origin, "m.xml", [("KERNEL", image_factory.sha1(kernel), url)]
    )

    code, out, _ = run(capsys, "check", meta_url, meta_sha1)

    assert code == 1
    assert f"problem: metadata at {meta_url} lists no FILESYSTEM, ZFILESYSTEM or QCOW2 image" in out


@pytest.mark.parametrize(
    ("url", "signature", "message"),
    [
        ("http://example.org/m.xml", "not-a-sha1", "is not a SHA-1"),
        ("ftp://example.org/m.xml", "0" * 40, "only http and https are accepted"),
    ],
)
def test_bad_usage_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], url: str, signature: str, message: str
) -> None:
    code, out, err = run(capsys, "check", url, signature)

    assert (code, out) == (2, "")
    assert err.startswith("registrar check: ") and message in err
    assert err.count("\n") == 1


def test_a_qcow2_declared_filesystem_is_refused(
    capsys: pytest.CaptureFixture[str], origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    image = qcow2_image(tmp_path / "disk.qcow2")
    url = origin.put("disk.qcow2", image)
    meta_url, meta_sha1 = _put_metadata(
        origin, "m.xml", [("FILESYSTEM", image_factory.sha1(image), url)]
    )

    code, out, _ = run(capsys, "check", meta_url, meta_sha1)

    assert code == 1
    assert "problem: FILESYSTEM: declared FILESYSTEM, but the file is a qcow2 image" in out


def test_unreachable_metadata_is_caught(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}/centos7.xml"  # nothing listens there

    code, out, err = run(capsys, "check", url, "0" * 40)

    assert (code, err) == (1, "")
    assert f"problem: metadata at {url}: unreachable from here (" in out
    assert "verdict: NOT READY - 1 problem(s) above" in out


def test_a_file_not_uploaded_is_caught(
    capsys: pytest.CaptureFixture[str], origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    files = _kernel_ramdisk(image_factory)
    published = publish_to(origin, tmp_path / "img", image_factory.ext4(FS_MIB), **files)
    origin.remove(f"img/{files['ramdisk'].name}")

    code, out, _ = run(capsys, "check", published.metadata_url, published.metadata_sha1)

    assert code == 1
    assert "problem: RAMDISK: HTTP 404 Not Found (is the file uploaded under this name?)" in out
    assert out.count("problem:") == 1
