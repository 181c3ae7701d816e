"""The systemd units in systemd/ are valid and say what an operator expects of them."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
INSTALLED_BIN = "/usr/local/bin/"


def _installed_copy(tmp_path: Path, name: str, extra: str = "") -> Path:
    """Copy a unit, pointing ExecStart at this venv's scripts (systemd checks they exist)."""
    venv_bin = str(Path(shutil.which("imgstore")).parent) + "/"
    text = (UNITS / name).read_text().replace(INSTALLED_BIN, venv_bin)
    dst = tmp_path / name
    dst.write_text(text + extra)
    return dst


def _verify(*units: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        cwd=units[0].parent,
    )


def _load(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


def test_units_verify_cleanly(tmp_path: Path) -> None:
    units = [_installed_copy(tmp_path, n) for n in ("imgstore.service", "registrar.service")]
    result = _verify(*units)
    assert result.returncode == 0, result.stderr
    # systemd-analyze exits 0 on unknown keys and bad values: any complaint is a failure.
    assert result.stderr.strip() == "" and result.stdout.strip() == ""


def test_verify_notices_a_broken_unit(tmp_path: Path) -> None:
    """The check above is real: a bad value in our unit is reported."""
    bad = _installed_copy(tmp_path, "imgstore.service")
    bad.write_text(bad.read_text().replace("Type=notify", "Type=notifyy"))
    assert "notifyy" in _verify(bad).stderr


def test_imgstore_unit_contract() -> None:
    service = _load("imgstore.service")["Service"]
    assert service["Type"] == "notify"
    assert service["ExecStart"].split()[1:] == ["mount", "--foreground"]
    assert service["ExecStop"].split()[1:] == ["umount"]
    assert service["Restart"] == "on-failure"
    # A FUSE mount made in a private mount namespace would be invisible to the host.
    for key in ("PrivateTmp", "ProtectSystem", "ProtectHome", "ReadWritePaths"):
        assert key not in service


@pytest.mark.parametrize("key", ["Requires", "After"])
def test_registrar_needs_the_store(key: str) -> None:
    unit = _load("registrar.service")["Unit"]
    assert "imgstore.service" in unit[key].split()


def test_registrar_is_hardened() -> None:
    service = _load("registrar.service")["Service"]
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"
    assert service["PrivateTmp"] == "yes"
