"""Helpers for the image owners' commands: publish a set onto an origin, run the CLI in-process.

- ``publish_to(origin, out_dir, image, **files) -> Published`` -- `registrar.publish.publish`
  with URLs under ``origin``'s ``/<out_dir name>/``, then every file and the metadata put there.
- ``run(capsys, *argv) -> (exit code, stdout, stderr)`` -- ``registrar`` in this process.
- ``qcow2_image(path, size="64M") -> Path`` -- a real qcow2 from ``qemu-img create -f qcow2``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from registrar.cli import main
from registrar.publish import Published, publish
from tests.support.origin import Origin


def publish_to(origin: Origin, out_dir: Path, image: Path | None, **files: Any) -> Published:
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = out_dir.name
    result = publish(origin.url(folder), image=image, out_dir=out_dir, **files)
    for f in result.files:
        origin.put(f"{folder}/{f.path.name}", f.path)
    origin.put(f"{folder}/{result.metadata_path.name}", result.metadata_path)
    return result


def run(capsys: Any, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def qcow2_image(path: Path, size: str = "64M") -> Path:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), size],
        check=True,
        capture_output=True,
    )
    return path
