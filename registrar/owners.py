"""Who holds a job claim or a pin: owner strings, and whether their process still runs.

    prefix = process_prefix()          # "registrar:<pid>:<start>:" for this process
    owner = f"{prefix}{n}"             # one owner per job
    owner_process(owner) == prefix     # for unpinning all of a process's pins at once
    dead_processes(cache_dir)          # prefixes of registrars whose pins outlived them

The process's start time is part of the string, so a reused pid never passes for the dead
registrar that had it.
"""

from __future__ import annotations

import os
from pathlib import Path

from imgstore import client as imgstore
from registrar.registry import process_start

OWNER_PREFIX = "registrar:"


def process_prefix() -> str:
    """The owner prefix of this process's jobs and pins."""
    pid = os.getpid()
    return f"{OWNER_PREFIX}{pid}:{process_start(pid)}:"


def owner_process(owner: str) -> str:
    """The per-process prefix of an owner ("registrar:<pid>:<start>:"), for bulk unpinning."""
    return owner.rsplit(":", 1)[0] + ":"


def owner_alive(owner: str) -> bool:
    """Whether the registrar process named in an owner string still runs."""
    parts = owner.split(":")
    if len(parts) < 4 or not parts[1].isdigit():
        return True  # not ours to judge
    return process_start(int(parts[1])) == parts[2]


def dead_processes(cache_dir: Path) -> set[str]:
    """The prefixes of dead registrar processes that still hold pins in the store."""
    return {
        owner_process(pin)
        for blob in imgstore.list_blobs(cache_dir)
        for pin in blob.pins
        if pin.startswith(OWNER_PREFIX) and not owner_alive(pin)
    }
