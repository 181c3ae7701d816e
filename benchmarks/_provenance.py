"""Which code a benchmark's figures came from, for its JSON result.

    commit()  # "90b43fa…" or "90b43fa…-dirty"; None outside a git checkout

`-dirty` marks uncommitted changes under the product's packages (imgstore/, registrar/): the
figures then belong to no commit. Changes elsewhere (notes, the benchmarks) do not count.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("imgstore", "registrar")


def commit() -> str | None:
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", *PRODUCT],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")
