"""Helpers for the image owners' commands: publish a set onto an origin, run the CLI in-process.

- ``publish_to(origin, out_dir, image, **files) -> Published`` -- `registrar.publish.publish`
  with URLs under ``origin``'s ``/<out_dir name>/``, then every file and the metadata put there.
- ``run(capsys, *argv) -> (exit code, stdout, stderr)`` -- ``registrar`` in this process.
- ``qcow2_image(path, size="64M") -> Path`` -- a real qcow2 from ``qemu-img create -f qcow2``.
- ``bars_on_a_terminal(*argv, workdir) -> shown`` -- the command through pipes and on a
  terminal: asserts both succeed, no bar goes to a pipe, and stdout is the same bytes either way;
  returns what the terminal showed.
- ``undrawn(shown, bars) -> list`` -- the bars ``{label: total}`` never drawn complete in ``shown``.
- ``run_measured(*argv, workdir) -> Measured`` -- the console script, with its own peak resident
  memory (read from its rusage by a small process in between, see `_MEASURE`).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

from registrar.cli import main
from registrar.publish import Published, publish
from tests.registrar.e2e_stack import REGISTRAR
from tests.registrar.script_runs import run_on_terminal, run_script
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


def bars_on_a_terminal(*argv: str, workdir: Path) -> str:
    piped = run_script(*argv)
    shown = run_on_terminal(*argv, stdout=workdir / "terminal-stdout.txt")
    assert (piped.returncode, piped.stderr) == (0, ""), piped.stdout  # no bar without a terminal
    # The same bytes on stdout either way: the bars went to the terminal only.
    assert (workdir / "terminal-stdout.txt").read_text() == piped.stdout
    return shown


def undrawn(shown: str, bars: dict[str, str]) -> list[str]:
    """Each bar is drawn one last time complete (rich's decimal units) before it goes."""
    lines = shown.splitlines()
    return [
        label
        for label, total in bars.items()
        if not any(line.startswith(label + " ") and total in line for line in lines)
    ]


@dataclasses.dataclass(frozen=True)
class Measured:
    code: int
    stdout: str
    stderr: str
    peak_rss: int  # bytes


# A child's peak RSS counts the memory of the process it was forked from, up to its exec (the
# kernel carries the old address space's high-water mark into the child's rusage). Forked from
# this test process, which can hold hundreds of MiB by then, the figure would say nothing about
# the command: a small Python process in between forks it and reports its rusage instead.
_MEASURE = """
import os, sys
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss * 1024))  # KiB on Linux
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(*argv: str, workdir: Path) -> Measured:
    out_path, err_path = workdir / "stdout.txt", workdir / "stderr.txt"
    rss_path = workdir / "peak-rss.txt"
    # Files, not pipes: nobody has to read them while the command runs.
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(rss_path), *REGISTRAR, *argv],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
    return Measured(
        done.returncode,
        out_path.read_text(),
        err_path.read_text(),
        int(rss_path.read_text()),
    )
