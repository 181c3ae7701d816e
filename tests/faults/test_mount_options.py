"""The mount's access: read-only always, `allow_other` only when configured.

(The default mount's `ro` option, EROFS on writes and the absence of `allow_other` are in
tests/imgstore/test_mount_read.py; this is the other half.)
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tests.imgstore.helpers import IMGSTORE, write_config


def _options(mountpoint: Path) -> list[str]:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(mountpoint):
            return fields[3].split(",")
    raise AssertionError(f"{mountpoint} is not mounted")


def test_allow_other_only_when_configured_and_always_read_only(tmp_path: Path, fuse_mount) -> None:
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    config = write_config(tmp_path / "s.toml", cache, allow_other=True)
    fuse_mount([*IMGSTORE, "mount", "--foreground", "--config", str(config), str(mnt)], mnt)
    options = _options(mnt)
    assert "allow_other" in options and "ro" in options
    with pytest.raises(OSError) as exc:
        (mnt / "by-sha1" / ("0" * 40)).write_bytes(b"x")
    assert exc.value.errno in (errno.EROFS, errno.EACCES)
