"""Builders of test images: real ext4 filesystems, their compressed forms, blobs, metadata XML.

Plain functions (each returns the path it wrote)
-----------------------------------------------
- ``make_ext4(path, size_mib, *, seed=0) -> Path`` -- a real ext4 filesystem image of
  ``size_mib`` MiB, made by ``mkfs.ext4 -q -F -d SRCDIR`` from a generated tree (config-like and
  log-like text, plus random "binaries"), about half full, so it compresses like a real image.
  The files' names and bytes are a function of ``seed``; the image bytes themselves are not
  reproducible across builds (mke2fs stamps inode ctimes), so always take ``sha1_file`` of the
  image you built. The image file is sparse (mke2fs leaves free space as holes).
- ``gzip_file(src, dst)``, ``bzip2_file(src, dst)``, ``xz_file(src, dst)``,
  ``compress_file(src, dst)`` -- the real ``gzip -n``, ``bzip2``, ``xz`` and ncompress
  ``compress`` tools (default levels, except ``xz -1`` to spare CPU).
- ``make_sparse_file(path, size, data_regions) -> Path`` -- a file of ``size`` bytes that is a
  hole except ``data_regions``, a list of ``(offset, bytes)``.
- ``make_sparse_tar_gz(src_sparse, dst) -> Path`` -- a gzipped GNU tar with one member,
  ``filesystem``, holding ``src_sparse`` stored sparse (``tar --sparse``); what a ZFILESYSTEM
  image is.
- ``make_blob(path, size, seed, kind="raw") -> Path`` -- deterministic pseudo-random bytes, of
  any size (written in pieces, so a large one never sits in memory whole).
  ``kind="kernel"`` puts the x86 boot signature and ``HdrS`` magic where a bzImage has them;
  ``kind="ramdisk"`` starts with the gzip magic. The bytes stay incompressible, like the real
  (already compressed) things.
- ``metadata_xml(entries) -> bytes`` -- ImageProxy metadata for ``[(type, sha1, url), ...]``:
  ``<images><image><type>T</type><signature>SHA1</signature><url>URL</url></image>...</images>``
  (types as in ORCA: ``FILESYSTEM``, ``ZFILESYSTEM``, ``KERNEL``, ``RAMDISK``).
- ``sha1_file(path) -> str`` -- lowercase hex SHA-1 of a file.

Fixture
-------
``image_factory`` (session scope) -> ``ImageFactory``, which builds each image once per test
session and hands back the same path afterwards. Treat returned files as read-only (hard-link
or copy them; ``origin.put`` does either safely).

- ``ext4(size_mib=16, seed=0) -> Path``
- ``compressed(fmt, size_mib=16, seed=0) -> Path`` -- the ``ext4`` image compressed; ``fmt`` is
  ``"gz"``, ``"bz2"``, ``"xz"`` or ``"Z"``.
- ``sparse_tar_gz(size_mib=16, seed=0) -> Path`` -- the ``ext4`` image as a ZFILESYSTEM tarball.
- ``blob(size, seed=0, kind="raw") -> Path``
- ``sha1(path) -> str`` -- cached ``sha1_file``.
- ``publish(origin, *, size_mib=16, seed=0, fs_format="gz", kernel=True, ramdisk=True,
  prefix="") -> ImageSet`` -- put a filesystem (``fs_format`` ``"gz"``/``"bz2"``/``"xz"``/``"Z"``/
  ``"raw"`` as FILESYSTEM, or ``"tar.gz"`` as ZFILESYSTEM), optional kernel and ramdisk blobs,
  and their metadata XML on an ``origin`` (anything with ``put(name, data) -> url``).

``ImageSet`` has ``metadata_url``, ``metadata_sha1``, ``metadata: bytes`` and ``parts: dict[type,
Part]``; ``Part`` has ``type``, ``name`` (on the origin), ``url``, ``sha1``, ``path`` (local file).
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest
from lxml import etree

# Fixed timestamps for the generated tree: the files look the same in every build.
_EPOCH = 1_600_000_000
_WORDS = (
    "kernel image cache fetch chunk origin mirror verify signature bundle manifest register "
    "network address interface daemon service config option value enabled disabled default "
    "root user group mount volume device block inode sector partition boot loader module "
    "error warning info debug started stopped listening connected timeout retry request reply"
).split()


def sha1_file(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _text(rng: random.Random, size: int, style: str) -> bytes:
    """Config- or log-like text: repetitive enough to compress a few times over, not trivially."""
    lines: list[str] = []
    n = 0
    while n < size:
        words = rng.choices(_WORDS, k=rng.randint(2, 9))
        if style == "log":
            line = f"Nov {rng.randint(1, 30):2d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
            line += f" host {words[0]}[{rng.randint(100, 9999)}]: {' '.join(words[1:])}"
        else:
            line = f"{words[0]}_{words[-1]} = {' '.join(words[1:-1]) or rng.randint(0, 65535)}"
        lines.append(line)
        n += len(line) + 1
    return ("\n".join(lines) + "\n").encode()[:size]


def _populate(src: Path, budget: int, rng: random.Random) -> None:
    """Write about ``budget`` bytes of files under ``src``: 70% text, 30% random binaries."""
    dirs = ["etc", "etc/default", "usr/bin", "usr/lib", "usr/share/doc", "var/log"]
    for d in dirs:
        (src / d).mkdir(parents=True, exist_ok=True)
    written = 0
    i = 0
    while written < budget:
        size = min(budget - written, rng.randint(4 << 10, 512 << 10))
        roll = rng.random()
        if roll < 0.3:
            path = src / rng.choice(["usr/bin", "usr/lib"]) / f"bin{i:04d}"
            data = rng.randbytes(size)
        elif roll < 0.65:
            path = src / "var/log" / f"svc{i:04d}.log"
            data = _text(rng, size, "log")
        else:
            path = src / rng.choice(["etc", "etc/default", "usr/share/doc"]) / f"f{i:04d}.conf"
            data = _text(rng, size, "conf")
        path.write_bytes(data)
        os.utime(path, (_EPOCH, _EPOCH))
        written += len(data)
        i += 1
    for d in sorted(dirs, reverse=True):
        os.utime(src / d, (_EPOCH, _EPOCH))


def make_ext4(path: Path, size_mib: int, *, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".ext4src-") as tmp:
        src = Path(tmp)
        _populate(src, (size_mib << 20) // 2, rng)
        fs_uuid = f"{rng.getrandbits(128):032x}"
        fs_uuid = "-".join(
            (fs_uuid[:8], fs_uuid[8:12], fs_uuid[12:16], fs_uuid[16:20], fs_uuid[20:])
        )
        _run(
            ["mkfs.ext4", "-q", "-F", "-U", fs_uuid, "-E", f"hash_seed={fs_uuid}", "-L", "img"]
            + ["-d", str(src), str(path), f"{size_mib}M"],
            env={**os.environ, "E2FSPROGS_FAKE_TIME": str(_EPOCH)},
        )
    return path


def _run(
    cmd: Sequence[str], *, stdout_to: Path | None = None, env: dict[str, str] | None = None
) -> None:
    with open(stdout_to or os.devnull, "wb") as out:
        res = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({res.returncode}): {res.stderr.decode().strip()}")


def _compress(tool: list[str], src: Path, dst: Path) -> Path:
    _run([*tool, "-c", str(src)], stdout_to=dst)
    return dst


def gzip_file(src: Path, dst: Path) -> Path:
    return _compress(["gzip", "-n"], src, dst)  # -n: no name or mtime in the header


def bzip2_file(src: Path, dst: Path) -> Path:
    return _compress(["bzip2"], src, dst)


def xz_file(src: Path, dst: Path) -> Path:
    # One thread and preset 1: the machine is shared, and preset 6 costs five times the CPU
    # for a format that is the same to every reader.
    return _compress(["xz", "-T1", "-1"], src, dst)


def compress_file(src: Path, dst: Path) -> Path:
    return _compress(["compress", "-f"], src, dst)  # -f: write even if it does not shrink


def make_sparse_file(path: Path, size: int, data_regions: Iterable[tuple[int, bytes]]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in data_regions:
            if offset + len(data) > size:
                raise ValueError(f"region at {offset} (+{len(data)}) beyond size {size}")
            os.pwrite(f.fileno(), data, offset)
    return path


def make_sparse_tar_gz(src_sparse: Path, dst: Path) -> Path:
    src = src_sparse.resolve()
    _run(
        ["tar", "--sparse", "--format=gnu", "--owner=0", "--group=0", "--numeric-owner"]
        + [f"--mtime=@{_EPOCH}", "--use-compress-program=gzip -n"]
        + ["--transform=s|.*|filesystem|", "-cf", str(dst), "-C", str(src.parent), src.name]
    )
    return dst


# `randbytes(n)` makes one integer of 8n bits, which must fit a C int: a larger blob is made
# in pieces, streamed to the file (every blob that fits in one piece has the same bytes as ever).
_MAX_RANDBYTES = (1 << 28) - 1
_BLOB_PIECE = 64 << 20


def make_blob(path: Path, size: int, seed: int, kind: str = "raw") -> Path:
    if kind not in ("raw", "kernel", "ramdisk"):
        raise ValueError(f"unknown blob kind {kind!r}")
    rng = random.Random(f"blob-{seed}-{size}")
    with open(path, "wb") as out:
        left, first = size, True
        while first or left:
            data = bytearray(rng.randbytes(left if left <= _MAX_RANDBYTES else _BLOB_PIECE))
            if first and kind == "kernel" and size >= 0x206:
                data[0x1FE:0x200] = b"\x55\xaa"
                data[0x202:0x206] = b"HdrS"
            elif first and kind == "ramdisk" and size >= 3:
                data[0:3] = b"\x1f\x8b\x08"
            out.write(data)
            left, first = left - len(data), False
    return path


def metadata_xml(entries: list[tuple[str, str, str]]) -> bytes:
    root = etree.Element("images")
    for image_type, sha1, url in entries:
        image = etree.SubElement(root, "image")
        etree.SubElement(image, "type").text = image_type
        etree.SubElement(image, "signature").text = sha1
        etree.SubElement(image, "url").text = url
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)


class _Putter(Protocol):
    def put(self, name: str, data: bytes | Path) -> str: ...


@dataclass(frozen=True)
class Part:
    type: str
    name: str
    url: str
    sha1: str
    path: Path


@dataclass(frozen=True)
class ImageSet:
    metadata_url: str
    metadata_sha1: str
    metadata: bytes
    parts: dict[str, Part] = field(default_factory=dict)


_COMPRESSORS = {"gz": gzip_file, "bz2": bzip2_file, "xz": xz_file, "Z": compress_file}


class ImageFactory:
    """Builds images on first request and caches them for the session."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._sha1: dict[Path, str] = {}

    def ext4(self, size_mib: int = 16, seed: int = 0) -> Path:
        path = self.cache_dir / f"fs-{size_mib}m-{seed}.ext4"
        if not path.exists():
            tmp = path.with_suffix(".building")
            make_ext4(tmp, size_mib, seed=seed)
            tmp.rename(path)
        return path

    def compressed(self, fmt: str, size_mib: int = 16, seed: int = 0) -> Path:
        if fmt not in _COMPRESSORS:
            raise ValueError(f"unknown format {fmt!r}; one of {sorted(_COMPRESSORS)}")
        src = self.ext4(size_mib, seed)
        path = src.with_name(f"{src.name}.{fmt}")
        if not path.exists():
            tmp = path.with_suffix(".building")
            _COMPRESSORS[fmt](src, tmp)
            tmp.rename(path)
        return path

    def sparse_tar_gz(self, size_mib: int = 16, seed: int = 0) -> Path:
        src = self.ext4(size_mib, seed)
        path = src.with_name(f"{src.name}.tar.gz")
        if not path.exists():
            tmp = path.with_suffix(".building")
            make_sparse_tar_gz(src, tmp)
            tmp.rename(path)
        return path

    def blob(self, size: int, seed: int = 0, kind: str = "raw") -> Path:
        path = self.cache_dir / f"blob-{kind}-{size}-{seed}"
        if not path.exists():
            make_blob(path.with_suffix(".building"), size, seed, kind).rename(path)
        return path

    def sha1(self, path: Path) -> str:
        if path not in self._sha1:
            self._sha1[path] = sha1_file(path)
        return self._sha1[path]

    def publish(
        self,
        origin: _Putter,
        *,
        size_mib: int = 16,
        seed: int = 0,
        fs_format: str = "gz",
        kernel: bool = True,
        ramdisk: bool = True,
        prefix: str = "",
    ) -> ImageSet:
        """Put an image set and its metadata on ``origin``; see the module docstring."""
        files: list[tuple[str, str, Path]] = []
        if fs_format == "tar.gz":
            files.append(("ZFILESYSTEM", "filesystem.tar.gz", self.sparse_tar_gz(size_mib, seed)))
        elif fs_format == "raw":
            files.append(("FILESYSTEM", "filesystem.img", self.ext4(size_mib, seed)))
        else:
            path = self.compressed(fs_format, size_mib, seed)
            files.append(("FILESYSTEM", f"filesystem.img.{fs_format}", path))
        if kernel:
            files.append(("KERNEL", "vmlinuz", self.blob(3 << 20, seed, "kernel")))
        if ramdisk:
            files.append(("RAMDISK", "initrd.img", self.blob(2 << 20, seed, "ramdisk")))
        parts = {}
        for image_type, name, path in files:
            url = origin.put(prefix + name, path)
            parts[image_type] = Part(image_type, prefix + name, url, self.sha1(path), path)
        xml = metadata_xml([(p.type, p.sha1, p.url) for p in parts.values()])
        url = origin.put(prefix + "metadata.xml", xml)
        return ImageSet(url, hashlib.sha1(xml).hexdigest(), xml, parts)


@pytest.fixture(scope="session")
def image_factory(tmp_path_factory: pytest.TempPathFactory) -> ImageFactory:
    return ImageFactory(tmp_path_factory.mktemp("images"))
