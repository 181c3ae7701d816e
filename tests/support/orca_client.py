"""ORCA's RegisterImage client, in Java, to show the exact line ORCA logs for each answer.

The Java sources under `tests/support/orca/` apply the rule of the stub Axis2 1.1.1 generated
for ORCA (see OrcaRegister.java); the fixture ``orca_client`` compiles them once per session with
the JDK from Debian and runs them against a real registrar.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

SOURCES = Path(__file__).parent / "orca"
MAIN = "orca.handlers.ec2.tasks.imgproxy.OrcaRegister"
LOG_PREFIX = "ImageProxy unable to retrieve image: "


@dataclasses.dataclass(frozen=True)
class OrcaClient:
    """Runs the compiled client: `register` returns (exit code, the lines it printed)."""

    classes: Path

    def register(
        self, endpoint: str, url: str, signature: str, *, soap12: bool = False
    ) -> tuple[int, list[str]]:
        done = subprocess.run(
            ["java", "-cp", str(self.classes), MAIN, endpoint, url, signature]
            + (["soap12"] if soap12 else []),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert not done.stderr, done.stderr
        return done.returncode, done.stdout.splitlines()


@pytest.fixture(scope="session")
def orca_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrcaClient]:
    javac = shutil.which("javac")
    assert javac, "javac not found: scripts/test installs openjdk-17-jdk-headless"
    out = tmp_path_factory.mktemp("orca-classes")
    sources = sorted(str(p) for p in SOURCES.rglob("*.java"))
    subprocess.run([javac, "-d", str(out), *sources], check=True, timeout=120)
    yield OrcaClient(out)
