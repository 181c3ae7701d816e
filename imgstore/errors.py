"""imgstore's exceptions: one hierarchy, translated to errno in fs.py and to CLI errors in cli.py."""

from __future__ import annotations


class StoreError(Exception):
    """Raised when the store cannot do what was asked; the message says what and why."""
