"""Smoke test of benchmarks/bench_read.py: every case runs at a tiny size and the bytes add up.

Nothing here is about speed: a 16 MiB image with the page cache kept says nothing about it. What
it catches is a harness that no longer runs, or a tool whose origin traffic is off (a warm read
that fetches, a two-site read that bypasses the proxy cache). Tools that are not installed are
reported by the harness as missing; the test checks that the installed ones ran.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench_read.py"
SIZE = 16 << 20
CHUNK = 4 << 20
READS = 200

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/usr/sbin/nginx").exists(), reason="needs nginx (nginx-light)"),
]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "read.json"
    r = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--size",
            "16M",
            "--runs",
            "1",
            "--no-drop-caches",
            "--random-reads",
            str(READS),
            "--workdir",
            str(tmp / "work"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert r.returncode == 0, f"bench_read failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    data = json.loads(out.read_text())
    assert data["errors"] == []
    return data


def _installed(tool: str, data: dict) -> bool:
    if tool == "imgstore":
        return "imgstore" not in data["missing"]
    return shutil.which(tool) is not None


def _sample(data: dict, case: str, tool: str) -> dict:
    runs = data["samples"][case][tool]
    assert len(runs) == 1
    return runs[0]


def test_every_installed_tool_ran_every_case(report: dict) -> None:
    expected = {
        "cold": ["curl", "imgstore", "rclone", "httpdirfs"],
        "warm_fresh": ["cat", "imgstore"],
        "warm_hot": ["cat", "imgstore"],
        "random": ["imgstore", "rclone"],
        "concurrent": ["curl", "imgstore", "rclone"],
        "scaleout": ["imgstore"],
    }
    for case, tools in expected.items():
        for tool in tools:
            if tool == "cat" or _installed(tool, report):
                assert tool in report["samples"].get(case, {}), f"{case}/{tool} did not run"
            else:
                assert tool in report["missing"]
    assert "targets" in report and "cold read vs curl -o" in report["table"]


def test_cold_reads_fetch_the_image_once(report: dict) -> None:
    assert _sample(report, "cold", "curl")["origin_bytes"] == SIZE
    for tool in ("rclone", "httpdirfs"):
        if _installed(tool, report):
            assert _sample(report, "cold", tool)["origin_bytes"] >= SIZE
    if _installed("imgstore", report):
        cold = _sample(report, "cold", "imgstore")
        assert SIZE <= cold["origin_bytes"] <= SIZE + CHUNK
        assert cold["final_state"] == "verified"
        assert cold["rss_hwm_bytes"] > 0


def test_imgstore_warm_reads_fetch_nothing(report: dict) -> None:
    if not _installed("imgstore", report):
        pytest.skip("imgstore mount not available")
    assert _sample(report, "warm_fresh", "imgstore")["origin_bytes"] == 0


def test_random_reads_fetch_at_most_one_chunk_each(report: dict) -> None:
    for tool in ("imgstore", "rclone"):
        if _installed(tool, report):
            sample = _sample(report, "random", tool)
            assert sample["reads"] == READS
            if tool == "imgstore":
                assert 0 < sample["origin_bytes"] <= READS * CHUNK


def test_concurrent_readers_get_every_blob(report: dict) -> None:
    for tool in ("curl", "imgstore", "rclone"):
        if _installed(tool, report):
            assert _sample(report, "concurrent", tool)["origin_bytes"] >= SIZE


def test_two_sites_behind_the_proxy_cost_the_origin_one_image(report: dict) -> None:
    if not _installed("imgstore", report):
        pytest.skip("imgstore mount not available")
    sample = _sample(report, "scaleout", "imgstore")
    assert sample["proxy_bytes_to_sites"] >= 2 * SIZE
    assert SIZE <= sample["origin_bytes"] <= 1.05 * SIZE
    assert sample["states"] == "verified,verified"
