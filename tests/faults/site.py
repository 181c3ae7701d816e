"""Helpers for the fault tests that run the whole site (tests/registrar/e2e_stack.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.registrar.e2e_stack import Stack


def set_keys(stack: Stack, section: str, **keys: Any) -> None:
    """Set keys of one section of the stack's config (before `stack.start()`; the mount,
    already running, keeps what it read at its start). Key names are unique in the file."""
    text = stack.config.read_text()
    for key in keys:  # drop the key where the stack's writer put it
        text = re.sub(rf"(?m)^{key} = .*\n", "", text)
    lines = "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())
    stack.config.write_text(text.replace(f"[{section}]\n", f"[{section}]\n" + lines, 1))


def set_registrar_keys(stack: Stack, **keys: Any) -> None:
    set_keys(stack, "registrar", **keys)


def tree_files(root: Path) -> set[str]:
    """Every path under `root`, relative, for before/after comparisons."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}
