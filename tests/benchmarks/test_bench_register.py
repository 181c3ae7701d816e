"""Smoke test of benchmarks/bench_register.py: every case runs at a tiny size and ends in ids.

Nothing here is about speed: an 8 MiB image with the page cache kept says nothing about it.
What it catches is a harness that no longer runs: the registrar's config or SOAP call changed,
the original's pipeline broken, Glance's web-download import refused. The benchmark itself
checks each id it timed (an available image in moto; an active image of the right size in
Glance), so a case that "finished" without registering anything fails the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench_register.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),  # the fixture runs all seven cases, Glance's start included
    pytest.mark.skipif(not Path("/usr/sbin/nginx").exists(), reason="needs nginx (nginx-light)"),
]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    tmp = tmp_path_factory.mktemp("bench-register")
    out = tmp / "register.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(BENCH),
            "--size-mib",
            "8",
            "--runs",
            "1",
            "--no-drop-caches",
            "--workdir",
            str(tmp / "work"),
            "--json",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.terminate()  # it stops the servers and mounts it started, then exits
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"bench_register did not finish in 240 s:\n{stderr}")
    assert proc.returncode == 0, f"bench_register failed ({proc.returncode}):\n{stderr}"
    return json.loads(out.read_text()), stdout


def test_every_case_ran_once_on_both_clouds(report: tuple[dict, str]) -> None:
    data, _ = report
    assert data["seconds"].keys() == {"eucalyptus", "openstack"}
    assert set(data["seconds"]["eucalyptus"]) == {"ours", "original"}
    assert set(data["seconds"]["openstack"]) == {
        "ours",
        "original",
        "web-download",
        "web-download-raw",
        "floor",
    }
    for cases in data["seconds"].values():
        for runs in cases.values():
            assert len(runs) == 1 and runs[0] > 0
    assert set(data["image"]["files"]) == {"FILESYSTEM", "KERNEL", "RAMDISK", "QCOW2"}


def test_the_table_names_each_ratio_and_its_target(report: tuple[dict, str]) -> None:
    data, stdout = report
    pairs = [(r["cloud"], r["vs"], r["target"]) for r in data["ratios"]]
    assert pairs == [
        ("eucalyptus", "original", 0.2),
        ("openstack", "original", 0.6),
        ("openstack", "web-download", 1.0),
    ]
    for ratio in data["ratios"]:
        expected = (
            data["stats"][ratio["cloud"]]["ours"]["median"]
            / data["stats"][ratio["cloud"]][ratio["vs"]]["median"]
        )
        assert ratio["ratio"] == pytest.approx(expected)
        assert ratio["met"] == (ratio["ratio"] <= ratio["target"])
        ours = data["seconds"][ratio["cloud"]]["ours"]
        base = data["seconds"][ratio["cloud"]][ratio["vs"]]
        assert ratio["rounds"] == 1
        assert ratio["ours_faster_rounds"] == int(ours[0] < base[0])
    assert "ours / web-download" in stdout and data["table"] in stdout
    assert stdout.count(" of 1 round)") == 3
    medians = {case: s["median"] for case, s in data["stats"]["openstack"].items()}
    assert [(r["case"], r["vs"]) for r in data["references"]] == [
        ("ours", "floor"),
        ("web-download", "floor"),
        ("ours", "web-download-raw"),
    ]
    for ref in data["references"]:
        assert ref["ratio"] == pytest.approx(medians[ref["case"]] / medians[ref["vs"]])
    assert "web-download / floor" in stdout and "ours / web-download-raw" in stdout


def test_a_bad_cloud_name_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--clouds", "azure", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "bench_register: unknown cloud(s): azure"
    assert not any(tmp_path.iterdir())
