#!/usr/bin/env python3
"""Read benchmark: imgstore against curl -o, rclone mount and httpdirfs, in one run.

Builds an image set (a 1 GiB ext4 image, half random, by default), serves it with a real nginx on
127.0.0.1, and measures each case several times, printing one table of medians, ranges and
ratios, and the targets of issue 6. Run as root: cold cases drop the page cache.

    .venv/bin/python benchmarks/bench_read.py                       # 1 GiB, 3 runs, all cases
    .venv/bin/python benchmarks/bench_read.py --size 64M --runs 1 --cases cold,random

Cases: cold (curl, imgstore, rclone, httpdirfs; imgstore also reports the time to `verified`
and its peak RSS), warm (imgstore through a fresh mount and with the page cache hot, vs cat of
the origin's file), random (1,000 random 4 KiB reads, imgstore vs rclone), concurrent (4
readers of 4 cold blobs), scaleout (two imgstore sites behind one nginx slice cache).

A tool that is not installed is reported as missing. Exit codes: 0 every selected case ran;
1 some case failed (see the table and JSON "errors"); 2 bad arguments or environment (not root,
no nginx); 3 with --check-targets, a target was not met; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import commit  # noqa: E402
from _readbench_cases import Bench, CaseError, Settings  # noqa: E402
from _readbench_image import ensure_images  # noqa: E402
from _readbench_mounts import MountError, tool_missing  # noqa: E402
from _readbench_profile import render as profile_render  # noqa: E402
from _readbench_profile import summarize as profile_summary  # noqa: E402
from _readbench_report import render, table, targets  # noqa: E402
from _readbench_servers import NGINX, ServerError, origin_server  # noqa: E402

log = logging.getLogger("bench_read")

HERE = Path(__file__).resolve().parent
CASE_TOOLS = {
    "cold": ["curl", "imgstore", "rclone", "httpdirfs"],
    "warm": ["cat", "imgstore"],
    "random": ["imgstore", "rclone"],
    "concurrent": ["curl", "imgstore", "rclone"],
    "scaleout": ["imgstore"],
}
ALL_TOOLS = ["curl", "imgstore", "rclone", "httpdirfs"]


class UsageError(Exception):
    """Raised when the arguments or the machine do not allow a run (exit code 2)."""


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1G, 64M)") from None


def size_arg(n: int) -> str:
    """A size as imgstore's CLI takes it."""
    return f"{n >> 20}M" if n % (1 << 20) == 0 else str(n)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--size", type=parse_size, default=1 << 30, help="main image size (1G)")
    p.add_argument("--runs", type=int, default=3, help="repetitions of each case (3)")
    p.add_argument(
        "--cases",
        default=",".join(CASE_TOOLS),
        help=f"comma-separated subset of {','.join(CASE_TOOLS)}",
    )
    p.add_argument(
        "--tools",
        default=",".join(ALL_TOOLS),
        help="comma-separated subset of curl,imgstore,rclone,httpdirfs",
    )
    p.add_argument(
        "--chunk-size",
        type=parse_size,
        default=4 << 20,
        help="imgstore chunk size, also the proxy's slice size (4M)",
    )
    p.add_argument("--random-reads", type=int, default=1000, help="reads in the random case")
    p.add_argument(
        "--no-drop-caches",
        action="store_true",
        help="do not drop the page cache (figures then mean little; for smoke tests)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp/imageproxy-bench"),
        help="where images (kept, per size) and scratch caches (removed) live; put it "
        "on the disk you mean to measure",
    )
    p.add_argument("--json", type=Path, help="result file (default benchmarks/results/read-*.json)")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="also run two cold imgstore reads under py-spy (CPU, then wall clock with --idle); "
        "raw stacks go to FILE.cpu.txt and FILE.wall.txt, a summary into the table and JSON",
    )
    p.add_argument(
        "--keep-logs",
        type=Path,
        metavar="DIR",
        help="copy every tool's log here (they are deleted with the scratch data)",
    )
    p.add_argument(
        "--check-targets", action="store_true", help="exit 3 if a target of issue 6 is not met"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Both end the run through KeyboardInterrupt, so every mount and server is cleaned up; SIGINT
    # explicitly too, since a shell starts background jobs with it ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run(args)
    except UsageError as exc:
        print(f"bench_read: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench_read: interrupted; mounts and servers cleaned up", file=sys.stderr)
        return 130


def _interrupt(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    cases = _subset(args.cases, list(CASE_TOOLS), "case")
    tools = _subset(args.tools, ALL_TOOLS, "tool")
    if args.runs < 1 or args.size < (1 << 20) or args.chunk_size < 4096:
        raise UsageError("need --runs >= 1, --size >= 1M and --chunk-size >= 4K")
    if not args.no_drop_caches and os.geteuid() != 0:
        raise UsageError("dropping the page cache needs root (or pass --no-drop-caches)")
    if not Path(NGINX).exists():
        raise UsageError(f"{NGINX} not found: install nginx-light")
    missing = {t: why for t in tools if (why := tool_missing(t)) is not None}
    for tool, why in missing.items():
        log.warning("%s: %s; its cases are reported as missing", tool, why)
    pyspy = None
    if args.profile is not None:
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(pyspy).exists():
            raise UsageError("--profile needs py-spy: .venv/bin/pip install py-spy")
    if args.keep_logs is not None:
        args.keep_logs.mkdir(parents=True, exist_ok=True)

    samples: dict[str, dict[str, list[dict]]] = {}
    errors: list[dict] = []
    profile = None
    started = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    images = ensure_images(args.workdir / f"images-{args.size}", args.size)
    with ExitStack() as stack:
        scratch = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        origin = origin_server(scratch / "origin", images.root)
        origin.start()
        stack.callback(origin.stop)
        settings = Settings(
            args.chunk_size, args.random_reads, not args.no_drop_caches, args.keep_logs
        )
        bench = Bench(images, origin, scratch / "cases", settings, cases)
        for run_no in range(args.runs):
            for case in cases:
                case_tools = [t for t in CASE_TOOLS[case] if t == "cat" or t in tools]
                # Rotate the order each run so no tool always goes first after a cold start.
                k = run_no % len(case_tools) if case_tools else 0
                for tool in case_tools[k:] + case_tools[:k]:
                    if tool in missing:
                        continue
                    if case == "warm" and tool == "imgstore" and "cold" in cases:
                        continue  # measured right after its cold read, on the same cache
                    _one(bench, case, tool, run_no, samples, errors)
        if pyspy is not None and "imgstore" not in missing:
            profile = {}
            for mode in ("cpu", "wall"):
                log.info("profiling one cold imgstore read with py-spy (%s)", mode)
                raw = args.profile.resolve().with_suffix(f".{mode}.txt")
                try:
                    prof = bench.profile(raw, pyspy, wall=mode == "wall")
                except (CaseError, MountError, ServerError, OSError) as exc:
                    errors.append({"case": "profile", "tool": "imgstore", "error": str(exc)})
                    continue
                profile[mode] = {**prof, "summary": profile_summary(raw)}
    elapsed = time.perf_counter() - started

    tgts = targets(samples, args.size, args.chunk_size, args.random_reads)
    header = (
        f"bench_read: {args.size / (1 << 20):.0f} MiB image, {args.runs} run(s), "
        f"chunk {size_arg(args.chunk_size)}, "
        f"page cache {'kept' if args.no_drop_caches else 'dropped'}, {elapsed:.0f} s"
    )
    text = render(table(samples, args.size, missing), tgts, header)
    if errors:
        text += "\n\nerrors:\n" + "\n".join(
            f"  {e['case']}/{e['tool']} run {e.get('run', '-')}: {e['error']}" for e in errors
        )
    for mode, prof in (profile or {}).items():
        text += f"\n\nprofile ({mode}, one cold read, {prof['seconds']:.2f} s):\n"
        text += profile_render(prof["summary"])
    print(text)
    out = args.json or HERE / "results" / f"read-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "meta": {
                    "size": args.size,
                    "runs": args.runs,
                    "chunk_size": args.chunk_size,
                    "random_reads": args.random_reads,
                    "cases": cases,
                    "tools": tools,
                    "page_cache_dropped": not args.no_drop_caches,
                    "elapsed_s": elapsed,
                    "date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "host": platform.node(),
                    "commit": commit(),
                    "cpus": os.cpu_count(),
                    "workdir": str(args.workdir),
                    "images": {
                        b.name: {"size": b.size, "sha1": b.sha1}
                        for b in (images.main, *images.concurrent)
                    },
                },
                "missing": missing,
                "errors": errors,
                "samples": samples,
                "targets": tgts,
                "profile": profile,
                "table": text,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"\nresults: {out}")
    if errors:
        return 1
    if args.check_targets and any(t["met"] is False for t in tgts):
        return 3
    return 0


def _one(
    bench: Bench,
    case: str,
    tool: str,
    run_no: int,
    samples: dict[str, dict[str, list[dict]]],
    errors: list[dict],
) -> None:
    log.info("run %d: %s / %s", run_no + 1, case, tool)
    method = {
        "cold": bench.cold,
        "warm": bench.warm_only,
        "random": bench.random,
        "concurrent": bench.concurrent,
        "scaleout": bench.scaleout,
    }[case]
    try:
        result = method(tool, run_no)
    except (CaseError, MountError, ServerError, OSError) as exc:
        log.error("%s / %s failed: %s", case, tool, exc)
        log.debug("%s", traceback.format_exc())
        errors.append({"case": case, "tool": tool, "run": run_no + 1, "error": str(exc)})
        return
    for sub, sample in result.items():
        samples.setdefault(sub, {}).setdefault(tool, []).append({"run": run_no + 1, **sample})


def _subset(text: str, allowed: list[str], what: str) -> list[str]:
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in chosen if t not in allowed]
    if bad or not chosen:
        raise UsageError(
            f"unknown {what} {','.join(bad) or '(none)'}; choose from {','.join(allowed)}"
        )
    return [t for t in allowed if t in chosen]


if __name__ == "__main__":
    sys.exit(main())
