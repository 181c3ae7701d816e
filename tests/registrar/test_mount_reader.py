"""The registrar's reader of the imgstore mount: the mount's verdict is its SHA-1 check.

The mount answers the read that completes a file only once the blob's SHA-1 matched, so the
registrar asks for that verdict instead of hashing every byte again. These tests read through
a real mount from a real nginx origin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from registrar import decompress as zfs
from registrar.blobs import Blobs, MountReader
from registrar.errors import ImageChecksumMismatch
from registrar.source import HashingReader, probe_source, verify_source
from tests.imgstore.conftest import Store
from tests.imgstore.helpers import MiB

pytestmark = pytest.mark.timeout(120)


class _Settings:
    def __init__(self, store: Store) -> None:
        self.cache_dir = store.cache_dir
        self.mountpoint = store.mountpoint
        self.allowed_networks = ("127.0.0.0/8",)
        self.http_proxy = ""


@pytest.fixture
def mounted(tmp_path: Path, fuse_mount: Any) -> Store:
    store = Store(tmp_path / "cache", tmp_path / "mnt", fuse_mount)
    store.mount()
    return store


def test_a_blob_read_whole_through_the_mount_is_vouched_for_not_hashed_again(
    mounted: Store, origin: Any, image_factory: Any
) -> None:
    image = image_factory.ext4(64)
    sha1 = image_factory.sha1(image)
    url = origin.put("fs.img", image)
    blobs = Blobs(_Settings(mounted))
    blobs.add(sha1, url, "FILESYSTEM image", trusted=True)

    with blobs.open(sha1, url, "FILESYSTEM image") as source:
        assert isinstance(source, MountReader)
        found = probe_source(source, False, sha1)
        hashed = HashingReader(source, None)
        # Begun: the mount has no verdict yet (readahead has not reached the end of 64 MiB),
        # so the reader vouches for nothing.
        assert hashed.read(MiB)
        with pytest.raises(ImageChecksumMismatch, match=f"has not verified {sha1} .*partial"):
            hashed.hexdigest()
        hashed.drain()
        verify_source(hashed, found, sha1)  # the mount's verdict: verified
        assert hashed.count == image.stat().st_size
        assert hashed._sha1 is None  # nothing was hashed here


def test_a_stand_in_for_the_mount_without_imgstore_attributes_is_hashed(tmp_path: Path) -> None:
    """A plain directory in the mount's place (no xattrs) gets the registrar's own check."""
    data = b"not what was promised"
    folder = tmp_path / "by-sha1"
    folder.mkdir()
    claimed = "1" * 40
    (folder / claimed).write_bytes(data)
    settings = _Settings(Store(tmp_path / "cache", tmp_path, None))  # type: ignore[arg-type]
    with Blobs(settings).open(claimed, "http://x/", "KERNEL image") as source:
        assert not isinstance(source, MountReader)
        found = probe_source(source, False, claimed)
        hashed = HashingReader(source, None)
        zfs.open_image(hashed, found).read()  # type: ignore[arg-type]
        with pytest.raises(ImageChecksumMismatch, match="does not match the expected 1111"):
            verify_source(hashed, found, claimed)
