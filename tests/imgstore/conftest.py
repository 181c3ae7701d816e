"""Fixtures for imgstore tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.imgstore.helpers import mount_cmd, run
from tests.support.fusemount import Mounted


@dataclasses.dataclass
class Store:
    """A cache dir, a mountpoint, and a way to mount them."""

    cache_dir: Path
    mountpoint: Path
    _mount: Callable[..., Mounted]

    def mount(self, *extra: str) -> Mounted:
        return self._mount(mount_cmd(self.cache_dir, self.mountpoint, *extra), self.mountpoint)

    def add(self, sha1: str, *urls: str) -> None:
        run("add", "--cache-dir", self.cache_dir, sha1, *urls)

    def file(self, sha1: str) -> Path:
        return self.mountpoint / "by-sha1" / sha1


@pytest.fixture
def store(tmp_path: Path, fuse_mount: Callable[..., Mounted]) -> Store:
    return Store(tmp_path / "cache", tmp_path / "mnt", fuse_mount)
