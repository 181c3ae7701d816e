"""Placeholder: filled in by the fixtures work."""
