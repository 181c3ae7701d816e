"""Helpers for imgstore tests: run the CLI, mount a store, look at the cache on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
IMGSTORE = [sys.executable, "-m", "imgstore"]


def run(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `imgstore ARGS` and return the finished process (text output)."""
    res = subprocess.run([*IMGSTORE, *map(str, args)], capture_output=True, text=True, timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"imgstore {args} exited {res.returncode}: {res.stderr}")
    return res


def ls_json(cache_dir: Path) -> dict[str, dict[str, Any]]:
    out = run("ls", "--json", "--cache-dir", cache_dir).stdout
    return {b["sha1"]: b for b in json.loads(out)}


def write_config(path: Path, cache_dir: Path, **store: Any) -> Path:
    lines = ["[store]", f'cache_dir = "{cache_dir}"']
    for key, value in store.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def mount_cmd(cache_dir: Path, mountpoint: Path, *extra: str) -> list[str]:
    return [
        *IMGSTORE,
        "mount",
        "--foreground",
        "--cache-dir",
        str(cache_dir),
        *extra,
        str(mountpoint),
    ]


def allocated(cache_dir: Path) -> int:
    """What the cache's data files hold on disk (st_blocks), the number the budget limits."""
    return sum(allocated_by_file(cache_dir).values())


def allocated_by_file(cache_dir: Path) -> dict[str, int]:
    """Each data file's allocated bytes, read one file after another (not one instant)."""
    blobs = cache_dir / "blobs"
    if not blobs.exists():
        return {}
    figures = {}
    for p in blobs.iterdir():
        try:
            figures[p.name] = p.stat().st_blocks * 512
        except FileNotFoundError:
            pass
    return figures


def wait_for(cond: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    """Poll `cond` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def read_all(path: Path, bufsize: int = 1 << 20) -> bytes:
    with open(path, "rb") as f:
        return f.read()
