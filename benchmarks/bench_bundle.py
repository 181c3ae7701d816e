#!/usr/bin/env python3
"""Bundle benchmark: our streaming bundler against the euca2ools pipeline, on one image.

The pipeline is what `euca-bundle-image` runs: `tar -c | gzip -6 | openssl enc -aes-128-cbc
-K … -iv … | split -b 10M`. Ours is `registrar.bundle.bundle_image` in a fresh process writing
its parts to files the same way (SHA-1 verification, tar digest, part digests and the manifest
included — the pipeline does less work). Runs alternate between the two; each is timed from
process start to exit. The image is a real ext4 filesystem (tests/support/images.make_ext4:
about half full of text and random "binaries"), kept between runs in benchmarks/results/.

    .venv/bin/python benchmarks/bench_bundle.py                 # 1 GiB, 3 runs each
    .venv/bin/python benchmarks/bench_bundle.py --size-mib 128 --runs 1

Prints a table (median and min–max seconds, bundled bytes, peak RSS of our process) and the
ratios against the targets of issue 4 (time ≤ 0.4×, size ≤ 1.15×, RSS < 300 MiB), and writes
the figures as JSON under benchmarks/results/. Exit codes: 0 done (targets met or not, see the
table; with --check-targets, 3 if one was missed); 2 a tool is missing or a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _provenance import commit  # noqa: E402

TARGET_TIME, TARGET_SIZE, TARGET_RSS_MIB = 0.4, 1.15, 300


def build_image(size_mib: int) -> tuple[Path, str]:
    """The benchmark image and its SHA-1, built once per size and kept."""
    from tests.support.images import make_ext4, sha1_file

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bundle-bench-{size_mib}m.img"
    stamp = path.with_suffix(".sha1")
    if not (path.exists() and stamp.exists()):
        print(f"building a {size_mib} MiB ext4 image in {path} …", file=sys.stderr)
        path.unlink(missing_ok=True)
        make_ext4(path, size_mib, seed=1)
        stamp.write_text(sha1_file(path))
    return path, stamp.read_text().strip()


def make_cert(directory: Path) -> Path:
    """A throw-away cloud certificate (the bundle key is encrypted for it)."""
    from tests.support.cloud import make_key_and_cert

    return make_key_and_cert(directory, "cloud", "bench cloud")[1]


def timed(argv: list[str], **kwargs: object) -> tuple[float, int]:
    """Run a command; return its wall seconds and peak RSS in bytes (of the largest process)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, **kwargs)  # type: ignore[call-overload]
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} … exited with {proc.returncode}")
    return seconds, usage.ru_maxrss * 1024


def run_pipeline(image: Path, out: Path) -> tuple[float, int]:
    key, iv = os.urandom(16).hex(), os.urandom(16).hex()
    script = (
        'tar -c -C "$1" "$2" | gzip -6 | openssl enc -e -aes-128-cbc -K "$3" -iv "$4" '
        '| split -b 10M - "$5/bench.part."'
    )
    seconds, _ = timed(
        [
            "bash",
            "-o",
            "pipefail",
            "-c",
            script,
            "bash",
            str(image.parent),
            image.name,
            key,
            iv,
            str(out),
        ]
    )
    return seconds, sum(p.stat().st_size for p in out.iterdir())


def run_ours(image: Path, sha1: str, cert: Path, out: Path, level: int) -> tuple[float, int, int]:
    argv = [sys.executable, __file__, "--worker", str(image), sha1, str(cert), str(out), str(level)]
    seconds, rss = timed(argv)
    return seconds, sum(p.stat().st_size for p in out.glob("*.part.*")), rss


def worker(image: Path, sha1: str, cert: Path, out: Path, level: int) -> None:
    """One bundling run: parts written to `out` like `split` does, manifest too."""
    from registrar.bundle import bundle_image
    from registrar.manifest import BundleKeys

    def sink(part: object) -> None:
        (out / part.filename).write_bytes(part.data)  # type: ignore[attr-defined]

    with open(image, "rb") as stream:
        manifest = bundle_image(
            stream,
            name="bench",
            image_type="machine",
            arch="x86_64",
            expected_sha1=sha1,
            keys=BundleKeys.load(cert),
            account_id="123456789012",
            part_sink=sink,
            compression_level=level,
        )
    (out / manifest.filename).write_bytes(manifest.xml)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--size-mib", type=int, default=1024, help="image size (default 1024)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each (default 3)")
    parser.add_argument("--level", type=int, default=3, help="our ISA-L level 0–3 (default 3)")
    parser.add_argument("--check-targets", action="store_true", help="exit 3 if a target is missed")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        image, sha1, cert, out, level = args.worker
        worker(Path(image), sha1, Path(cert), Path(out), int(level))
        return 0
    for tool in ("tar", "gzip", "openssl", "split"):
        if not shutil.which(tool):
            print(f"bench_bundle: {tool} is not installed", file=sys.stderr)
            return 2

    image, sha1 = build_image(args.size_mib)
    pipe_times: list[float] = []
    our_times: list[float] = []
    pipe_sizes: list[int] = []
    our_sizes: list[int] = []
    rss: list[int] = []
    with tempfile.TemporaryDirectory(dir=RESULTS) as tmp:
        cert = make_cert(Path(tmp))
        for run in range(args.runs):
            for who in ("pipeline", "ours"):
                out = Path(tmp) / f"{who}-{run}"
                out.mkdir()
                try:
                    if who == "pipeline":
                        seconds, size = run_pipeline(image, out)
                        pipe_times.append(seconds)
                        pipe_sizes.append(size)
                    else:
                        seconds, size, peak = run_ours(image, sha1, cert, out, args.level)
                        our_times.append(seconds)
                        our_sizes.append(size)
                        rss.append(peak)
                except RuntimeError as exc:
                    print(f"bench_bundle: {who} run {run + 1} failed: {exc}", file=sys.stderr)
                    return 2
                print(
                    f"run {run + 1} {who:8}: {seconds:7.2f} s  {size:>13,} bytes", file=sys.stderr
                )
                shutil.rmtree(out)

    pipe, ours = summary(pipe_times), summary(our_times)
    time_ratio = ours["median"] / pipe["median"]
    size_ratio = statistics.median(our_sizes) / statistics.median(pipe_sizes)
    rss_mib = max(rss) / 2**20
    rows = [
        ("tar|gzip -6|openssl|split", pipe, statistics.median(pipe_sizes), "—"),
        (
            f"registrar bundle (isal {args.level})",
            ours,
            statistics.median(our_sizes),
            f"{rss_mib:.0f} MiB",
        ),
    ]
    print(
        f"\nbundling a {args.size_mib} MiB ext4 image, {args.runs} runs each, "
        f"{os.cpu_count()} CPUs\n"
    )
    print(f"{'':30} {'median s':>9} {'min–max s':>15} {'bundled bytes':>15} {'peak RSS':>10}")
    for label, times, size, peak in rows:
        span = f"{times['min']:.2f}–{times['max']:.2f}"
        print(f"{label:30} {times['median']:9.2f} {span:>15} {int(size):>15,} {peak:>10}")
    checks = [
        ("time ratio", time_ratio, f"≤ {TARGET_TIME}", time_ratio <= TARGET_TIME),
        ("bundled size ratio", size_ratio, f"≤ {TARGET_SIZE}", size_ratio <= TARGET_SIZE),
        ("peak RSS MiB", rss_mib, f"< {TARGET_RSS_MIB}", rss_mib < TARGET_RSS_MIB),
    ]
    print()
    for label, value, target, ok in checks:
        print(f"{label:20} {value:8.3f}  target {target:8}  {'met' if ok else 'MISSED'}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    result = {
        "benchmark": "bundle",
        "when": stamp,
        "commit": commit(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "image": {"size_mib": args.size_mib, "sha1": sha1},
        "runs": args.runs,
        "level": args.level,
        "pipeline": {"seconds": pipe_times, "bundled_bytes": pipe_sizes, **pipe},
        "ours": {"seconds": our_times, "bundled_bytes": our_sizes, "peak_rss_bytes": rss, **ours},
        "ratios": {"time": time_ratio, "bundled_size": size_ratio},
        "targets": {label: ok for label, _, _, ok in checks},
    }
    path = RESULTS / f"bench_bundle-{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")
    if args.check_targets and not all(ok for *_, ok in checks):
        return 3
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
