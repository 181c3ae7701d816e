"""ZFILESYSTEM detection by magic bytes and streaming decompression to the raw image."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from registrar import decompress
from registrar.decompress import Format
from registrar.errors import DecompressError
from tests.support.images import ImageFactory, make_sparse_file

FORMATS = {"gz": Format.GZIP, "bz2": Format.BZIP2, "xz": Format.XZ, "Z": Format.COMPRESS}


def read_image(path: Path) -> tuple[decompress.Probe, bytes]:
    with open(path, "rb") as source:
        found = decompress.probe(source)
        assert source.tell() == 0
        if found.size is None:
            found = found.with_size(decompress.measure(source, found.format))
            source.seek(0)
        stream = decompress.open_image(source, found)
        try:
            data = b"".join(iter(lambda: stream.read(1 << 20), b""))
        finally:
            stream.close()
    return found, data


@pytest.mark.parametrize("suffix", sorted(FORMATS))
def test_each_format_is_detected_by_magic_and_streamed(
    suffix: str, image_factory: ImageFactory, tmp_path: Path
) -> None:
    raw = image_factory.ext4(size_mib=8, seed=3)
    packed = image_factory.compressed(suffix, size_mib=8, seed=3)
    misleading = tmp_path / "image.img"  # the name says nothing; the bytes do
    shutil.copyfile(packed, misleading)
    found, data = read_image(misleading)
    assert found.format is FORMATS[suffix]
    assert found.tar_member is None
    assert found.size == raw.stat().st_size
    assert hashlib.sha1(data).hexdigest() == image_factory.sha1(raw)


def test_legacy_lzma_is_detected(image_factory: ImageFactory, tmp_path: Path) -> None:
    raw = image_factory.ext4(size_mib=8, seed=3)
    packed = tmp_path / "fs"
    with packed.open("wb") as out:
        subprocess.run(["xz", "--format=lzma", "-1", "-c", str(raw)], check=True, stdout=out)
    found, data = read_image(packed)
    assert found.format is Format.LZMA
    assert hashlib.sha1(data).hexdigest() == image_factory.sha1(raw)


def test_a_raw_image_passes_through(image_factory: ImageFactory) -> None:
    raw = image_factory.ext4(size_mib=8, seed=3)
    found, data = read_image(raw)
    assert (found.format, found.size, found.sparse) == (Format.RAW, raw.stat().st_size, False)
    assert hashlib.sha1(data).hexdigest() == image_factory.sha1(raw)


def test_sparse_tar_member_comes_out_whole_with_its_size(
    image_factory: ImageFactory,
) -> None:
    raw = image_factory.ext4(size_mib=16, seed=3)
    tarball = image_factory.sparse_tar_gz(size_mib=16, seed=3)
    found, data = read_image(tarball)
    assert found.format is Format.GZIP
    assert found.tar_member == "filesystem"
    assert found.sparse and found.size == raw.stat().st_size
    assert sum(n for _, n in found.data_regions) < found.size
    assert hashlib.sha1(data).hexdigest() == image_factory.sha1(raw)


@pytest.mark.parametrize("tar_format", ["gnu", "posix"])
@pytest.mark.parametrize("compressor", [["gzip", "-n"], ["bzip2"], ["xz", "-1"]])
def test_sparse_tar_in_any_compression_and_tar_format(
    tar_format: str, compressor: list[str], tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    payload = os.urandom(70_000)
    make_sparse_file(
        src / "filesystem", 12 * 1024 * 1024, [(4096, payload), (9 * 1024 * 1024, payload)]
    )
    tar_path = tmp_path / "fs.tar"
    subprocess.run(
        [
            "tar",
            f"--format={tar_format}",
            "--sparse",
            "-cf",
            str(tar_path),
            "-C",
            str(src),
            "filesystem",
        ],
        check=True,
    )
    packed = tmp_path / "packed"
    with packed.open("wb") as out:
        subprocess.run([*compressor, "-c", str(tar_path)], check=True, stdout=out)
    found, data = read_image(packed)
    assert found.sparse and found.size == 12 * 1024 * 1024
    assert data == (src / "filesystem").read_bytes()


def test_an_uncompressed_tar_is_unpacked_too(tmp_path: Path) -> None:
    member = tmp_path / "disk.img"
    member.write_bytes(os.urandom(100_000))
    tar_path = tmp_path / "t"
    with tarfile.open(tar_path, "w") as archive:
        archive.add(member, arcname="disk.img")  # not named filesystem: still the image
    found, data = read_image(tar_path)
    assert (found.format, found.tar_member) == (Format.RAW, "disk.img")
    assert data == member.read_bytes()


def test_corrupt_gzip_raises_decompress_error(tmp_path: Path) -> None:
    data = gzip.compress(os.urandom(300_000))
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2] ^= 0xFF
    path = tmp_path / "corrupt"
    path.write_bytes(bytes(corrupt))
    with pytest.raises(DecompressError, match="gzip"):
        read_image(path)


# `compress` has no end marker nor length: a cut .Z is just a shorter image, which only the
# SHA-1 of the file as downloaded can tell (and does, in the bundler).
@pytest.mark.parametrize("suffix", ["bz2", "gz", "xz"])
def test_truncated_input_raises_decompress_error(
    suffix: str, image_factory: ImageFactory, tmp_path: Path
) -> None:
    packed = image_factory.compressed(suffix, size_mib=8, seed=3)
    cut = tmp_path / "cut"
    cut.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    with pytest.raises(DecompressError):
        read_image(cut)


def test_open_image_refuses_a_stream_shorter_than_promised(tmp_path: Path) -> None:
    data = gzip.compress(b"x" * 1000)
    found = decompress.Probe(Format.GZIP, size=2000)
    stream = decompress.open_image(io.BytesIO(data), found)
    with pytest.raises(DecompressError, match="before its announced size"):
        while stream.read(300):
            pass
    stream.close()


def test_magic_bytes() -> None:
    assert decompress.detect(b"\x1f\x8b\x08\x00\x00\x00") is Format.GZIP
    assert decompress.detect(b"BZh91AY") is Format.BZIP2
    assert decompress.detect(b"BZh0") is Format.RAW
    assert decompress.detect(b"\xfd7zXZ\x00") is Format.XZ
    assert decompress.detect(b"\x1f\x9d\x90") is Format.COMPRESS
    assert decompress.detect(b"\x5d\x00\x00\x80\x00" + b"\xff" * 8) is Format.LZMA
    assert decompress.detect(b"\x5d\x00\x00\x10\x00" + (2**30).to_bytes(8, "little")) is (
        Format.LZMA
    )
    assert decompress.detect(b"\x5d\x00\x00\x80\x00") is Format.RAW  # too short to tell
    assert decompress.detect(b"\x5d\x01\x02\x03\x04" + b"\xff" * 8) is Format.RAW
    assert decompress.detect(bytes(6)) is Format.RAW
    assert decompress.detect(b"\x53\xef") is Format.RAW


def _gnu_tar(tmp_path: Path, members: dict[str, bytes | Path], name: str = "t.tgz") -> Path:
    """A gzip tar made by GNU tar -S, members in the given order (a Path is added sparse)."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for arcname, content in members.items():
        target = src / arcname
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
            subprocess.run(["fallocate", "--dig-holes", str(target)], check=True)
        else:
            target.write_bytes(content)
    out = tmp_path / name
    subprocess.run(
        ["tar", "-Sczf", str(out), "-C", str(src), *members], check=True, capture_output=True
    )
    return out


@pytest.mark.parametrize("arcname", ["filesystem", "./filesystem"])
def test_the_member_named_filesystem_is_the_image_wherever_it_stands(
    arcname: str, tmp_path: Path
) -> None:
    image = make_sparse_file(tmp_path / "img", 8 << 20, [(0, b"boot" * 1000), (6 << 20, b"z" * 9)])
    members: dict[str, bytes | Path] = {"README": b"read me first\n", "notes/x.txt": b"x" * 5000}
    members[arcname] = image
    members["filesystem.md5"] = b"0" * 32
    found, data = read_image(_gnu_tar(tmp_path, members))
    assert found.tar_member == arcname
    assert found.sparse, "a sparse member stays sparse"
    assert data == image.read_bytes()


def test_imgcapture_shaped_tar_registers_its_filesystem(
    image_factory: ImageFactory, tmp_path: Path
) -> None:
    """imgcapture.sh ran `tar -Sczvf name.tgz -C dir filesystem`."""
    raw = image_factory.ext4(size_mib=8, seed=5)
    found, data = read_image(_gnu_tar(tmp_path, {"filesystem": raw}))
    assert (found.format, found.tar_member, found.sparse) == (Format.GZIP, "filesystem", True)
    assert hashlib.sha1(data).hexdigest() == image_factory.sha1(raw)


def test_a_tar_with_one_other_file_uses_it_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    payload = os.urandom(50_000)
    found, data = read_image(_gnu_tar(tmp_path, {"disk.img": payload}))
    assert (found.tar_member, data) == ("disk.img", payload)
    assert "holds no member named 'filesystem'; using its only file 'disk.img'" in caplog.text


def test_a_tar_with_several_files_and_no_filesystem_names_them(tmp_path: Path) -> None:
    tarball = _gnu_tar(tmp_path, {"README": b"hello", "disk.img": os.urandom(9000)})
    with pytest.raises(DecompressError) as caught:
        read_image(tarball)
    assert str(caught.value) == (
        "the tar inside the image has no member named 'filesystem' and 2 regular files; "
        "members found: 'README', 'disk.img'"
    )
