"""Test images for bench_read.py: a real ext4 filesystem, half random, half compressible text.

The main image is what a user publishes: `file(1)` calls it an ext4 filesystem, half of its bytes
are one incompressible file (think packages, compressed logs) and a quarter is text. Four smaller
random blobs feed the concurrent-readers case. Images are kept between runs in an image directory
(keyed by size) because building 1 GiB costs more than some of the cases it feeds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Bump when the recipe changes, so stale image directories get rebuilt.
RECIPE = 2
MAIN = "image.img"
CONCURRENT = tuple(f"blob{i}.img" for i in range(4))
_BLOCK = 4 << 20
_WORDS = (
    "kernel module initrd grub boot sbin usr lib share doc locale zoneinfo systemd unit "
    "service target mount socket python3 site-packages dist-info RECORD METADATA license "
    "copyright changelog gz debian control md5sums conffiles postinst prerm libc6 amd64"
).split()


@dataclass(frozen=True)
class Blob:
    """One file served by the origin: its name, size and SHA-1."""

    name: str
    size: int
    sha1: str


@dataclass(frozen=True)
class ImageSet:
    """The files bench_read.py serves, all in `root`."""

    root: Path
    main: Blob
    concurrent: tuple[Blob, ...]

    def path(self, blob: Blob) -> Path:
        return self.root / blob.name


def ensure_images(root: Path, size: int) -> ImageSet:
    """Return the image set in `root` for `size`, building it first if absent or stale."""
    manifest = root / "manifest.json"
    if manifest.exists():
        data = json.loads(manifest.read_text())
        if data.get("recipe") == RECIPE and data.get("size") == size:
            blobs = {name: Blob(name, **fields) for name, fields in data["blobs"].items()}
            if all((root / name).stat().st_size == b.size for name, b in blobs.items()):
                return ImageSet(root, blobs[MAIN], tuple(blobs[n] for n in CONCURRENT))
    log.info("building a %d MiB image set in %s", size >> 20, root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    # The origin's worker reads these files; keep them world-readable whatever the umask.
    root.chmod(0o755)
    main = _build_ext4(root / MAIN, size, seed=1)
    others = tuple(_build_random(root / n, size // 4) for n in CONCURRENT)
    blobs = {b.name: {"size": b.size, "sha1": b.sha1} for b in (main, *others)}
    manifest.write_text(json.dumps({"recipe": RECIPE, "size": size, "blobs": blobs}, indent=1))
    return ImageSet(root, main, others)


def _build_ext4(path: Path, size: int, seed: int) -> Blob:
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src = Path(tmp) / "root"
        src.mkdir()
        _fill_tree(src, size, random.Random(seed))
        sparse = Path(tmp) / "sparse.img"
        with sparse.open("wb") as f:
            f.truncate(size)
        cmd = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-m", "0", "-d", str(src), str(sparse)]
        if size < 256 << 20:
            # The smallest ext4 journal is 4 MiB: it would not leave room in a test-sized image.
            cmd[1:1] = ["-O", "^has_journal"]
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
        # Free space is a hole in mkfs's output; publish every byte, as a downloaded image has.
        subprocess.run(["cp", "--sparse=never", str(sparse), str(path)], check=True)
    path.chmod(0o644)
    return Blob(path.name, size, _sha1(path))


def _fill_tree(src: Path, size: int, rng: random.Random) -> None:
    """Half the filesystem size as one random file, a quarter as text files, the rest free."""
    _write_random(src / "payload.bin", size // 2)
    block = _text_block(rng)
    text_left = size // 4
    for i in range(10_000):
        if text_left <= 0:
            break
        d = src / f"dir{i % 16:02d}"
        d.mkdir(exist_ok=True)
        n = min(text_left, rng.randrange(64 << 10, 4 << 20))
        header = f"# file {i} seed {rng.random()}\n".encode()
        reps = n // len(block) + 1
        (d / f"file{i:05d}.txt").write_bytes((header + block * reps)[:n])
        text_left -= n


def _text_block(rng: random.Random) -> bytes:
    lines = []
    for i in range(4096):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(4, 14)))
        lines.append(f"{i:06d} {words} {rng.randrange(1 << 20):x}\n")
    return "".join(lines).encode()


def _build_random(path: Path, size: int) -> Blob:
    _write_random(path, size)
    path.chmod(0o644)
    return Blob(path.name, size, _sha1(path))


def _write_random(path: Path, size: int) -> None:
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, _BLOCK)
            f.write(os.urandom(n))
            left -= n


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with path.open("rb") as f:
        while chunk := f.read(_BLOCK):
            h.update(chunk)
    return h.hexdigest()
