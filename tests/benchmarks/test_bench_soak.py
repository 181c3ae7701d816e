"""Smoke test of benchmarks/bench_soak.py: the soak's whole code path, at a tiny scale.

16 calls over 4 image sets, 4 at a time, a cache budget of 2 sets, and higher fault rates than
the soak's (so a few faults are drawn in so few requests), with short stalls. Nothing here is
about memory or speed: the RSS bound is lifted, since 16 calls say nothing about a leak. What
it catches is a soak that no longer runs, or a site that no longer ends every call with the
right ids or a clear fault and leaves the bucket and the cloud as the registry says.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench_soak.py"
CALLS = 16

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("soak")
    out = tmp / "soak.json"
    argv = [
        sys.executable,
        str(BENCH),
        *("--calls", str(CALLS), "--images", "4", "--concurrency", "4", "--fs-mib", "8"),
        *("--cached-images", "2", "--origin-faults", "0.1", "--cloud-faults", "0.1"),
        *("--stall", "4", "--read-deadline", "3", "--call-timeout", "40", "--rss-at", "8"),
        *("--rss-growth", "100", "--workdir", str(tmp / "work"), "--json", str(out)),
    ]
    # Its own session: at a deadline, SIGTERM lets it tear the site down before the kill.
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=70)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        pytest.fail(f"bench_soak did not finish within 70 s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"bench_soak failed ({proc.returncode}):\n{output[-6000:]}"
    assert "PASSED" in output
    return json.loads(out.read_text())


def test_every_call_ends_with_ids_or_a_clear_fault(report: dict) -> None:
    assert report["calls"] == len(report["outcomes"]) == CALLS
    assert report["ok"] + report["faulted"] == CALLS
    assert report["timeouts"] == report["unclear"] == report["errors"] == 0
    assert report["ok"] >= 1
    assert sum(report["fault_texts"].values()) == report["faulted"]
    for outcome in report["outcomes"]:
        if outcome["kind"] == "ok":
            assert all(outcome["ids"].values()), outcome  # machine, kernel and ramdisk ids
        else:
            assert outcome["text"].strip() and "\n" not in outcome["text"].strip(), outcome


def test_bucket_and_cloud_hold_exactly_the_registered_images(report: dict) -> None:
    assert report["orphans"] == 0
    assert all(problems == [] for problems in report["audit"].values()), report["audit"]
    assert report["failed"] == []
    assert report["cloud"]["registered_images"] >= 3  # at least one whole set
    assert report["bundles_checked"] >= 3  # each unbundled and compared with its source


def test_faults_were_injected_and_rss_taken(report: dict) -> None:
    assert report["origin"]["requests"] > 0 and report["cloud"]["requests"] > 0
    assert report["origin"]["faulted"] + report["cloud"]["faulted"] > 0
    assert set(report["rss_bytes"]["at"]) == {"8", str(CALLS)}
    for sample in report["rss_bytes"]["at"].values():
        assert sample["registrar"] > 0 and sample["imgstore"] > 0
