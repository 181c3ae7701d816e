"""The registrar's exceptions: one hierarchy, translated to SOAP faults or CLI errors at the edge."""

from __future__ import annotations


class RegistrarError(Exception):
    """Raised when a registration cannot be done; the message says what failed and why."""
