"""Issue 7: faults, hostile input and access (see docs/failure-modes.md)."""
