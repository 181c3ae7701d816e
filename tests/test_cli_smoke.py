"""The console scripts are installed and explain themselves."""

import subprocess

import pytest


@pytest.mark.parametrize("command", ["imgstore", "registrar"])
def test_help(command: str) -> None:
    out = subprocess.run([command, "--help"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith(f"usage: {command}")
