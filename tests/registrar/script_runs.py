"""The installed `registrar` console script run as an operator runs it, on pipes or a terminal.

- ``run_script(*argv, cwd=None, env=None) -> CompletedProcess`` -- stdout and stderr on pipes
  (so neither is a terminal).
- ``run_on_terminal(*argv, stdout: Path) -> str`` -- under script(1), which gives it a terminal
  on stderr; stdout goes to the file ``stdout``. Asserts exit 0 and returns what the terminal
  showed, ANSI control sequences removed, one line per redraw (``\r`` and ``\n`` both end one).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from tests.registrar.e2e_stack import REGISTRAR

TIMEOUT = 170  # below pytest's per-test timeout, so a hung command fails with its output
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_script(
    *argv: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*REGISTRAR, *argv],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env=env,
    )


def run_on_terminal(*argv: str, stdout: Path) -> str:
    command = " ".join(shlex.quote(a) for a in [*REGISTRAR, *argv])
    # script(1) runs the command on a new pseudo-terminal and copies what it shows to its own
    # stdout; the redirection inside the command keeps the command's stdout off it.
    done = subprocess.run(
        ["script", "-qec", f"{command} > {shlex.quote(str(stdout))}", "/dev/null"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout
    return "\n".join(
        line for line in re.split(r"[\r\n]+", _ANSI.sub("", done.stdout)) if line.strip()
    )
