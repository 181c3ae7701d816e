#!/usr/bin/env python3
"""Soak: many SOAP RegisterImage calls against the real registrar and imgstore, with faults.

The site (benchmarks/_soak_site.py): image sets (gzipped ext4 filesystem, kernel, ramdisk,
metadata) on a fault-injecting origin of ours, moto behind the recording proxy as the cloud,
a real `imgstore mount` whose cache budget holds only a few of the image sets, and a real
`registrar serve`. A share of origin responses is faulted (resets, 503s, stalls) and a share of
cloud requests is answered 500 InternalError or 503 SlowDown, both seeded.

    .venv/bin/python benchmarks/bench_soak.py          # 200 calls, 20 images, 8 at a time
    .venv/bin/python benchmarks/bench_soak.py --calls 16 --images 4 --concurrency 4

The calls come in a seeded order in which each image's calls are spread over a window of the
run, so new images keep arriving (fetched, bundled, evicted) until the end. Each call has a
client timeout. Afterwards the answers, the registry, the bucket and the cloud are compared
(benchmarks/_soak_audit.py), and each registered image's bundle is unbundled and compared with
its source.

Passes when: every call ended with the right ids or a SOAP fault that says what failed (no
timeout, no internal error); no orphan in the bucket or the cloud, nothing missing, no job
left in flight, no RegisterImage Eucalyptus would refuse; and neither daemon's RSS grew by
more than --rss-growth between the --rss-at-th call and the last one.

Prints the figures and writes them as JSON under benchmarks/results/ (or --json). Exit codes:
0 passed; 1 a criterion failed (see "failed" in the JSON); 2 the site could not be set up.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import platform
import random
import re
import signal
import statistics
import sys
import threading
import time
import traceback
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import requests  # noqa: E402
import zeep.exceptions  # noqa: E402
from _soak_audit import audit  # noqa: E402
from _soak_site import ROOT, Site, SiteSettings, open_site  # noqa: E402

log = logging.getLogger("bench_soak")

RESULTS = ROOT / "benchmarks" / "results"
INTERNAL = "internal error in the registrar"
RSS_EVERY = 25


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--calls", type=int, default=200, help="RegisterImage calls (200)")
    p.add_argument("--images", type=int, default=20, help="distinct image sets (20)")
    p.add_argument("--concurrency", type=int, default=8, help="calls in flight at once (8)")
    p.add_argument("--fs-mib", type=int, default=16, help="each ext4 filesystem's size (16)")
    p.add_argument("--cached-images", type=int, default=3, help="image sets the cache holds (3)")
    p.add_argument("--origin-faults", type=float, default=0.05, help="origin fault rate (0.05)")
    p.add_argument("--cloud-faults", type=float, default=0.05, help="cloud fault rate (0.05)")
    p.add_argument("--seed", type=int, default=16, help="seeds the order and the faults (16)")
    p.add_argument("--call-timeout", type=float, default=240, help="client timeout, s (240)")
    p.add_argument("--read-deadline", type=float, default=10, help="[store] read_deadline (10)")
    p.add_argument("--stall", type=float, default=12, help="long origin stalls, s (12)")
    p.add_argument("--rss-at", type=int, default=50, help="call after which RSS is taken (50)")
    p.add_argument("--rss-growth", type=float, default=0.20, help="allowed RSS growth (0.20)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp/imageproxy-soak"),
        help="images (kept, per size and seed) and scratch data (removed)",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch data and logs")
    p.add_argument("--json", type=Path, help="result file (default benchmarks/results/soak-*.json)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def call_order(calls: int, images: int, seed: int) -> list[int]:
    """Image index of each call: every image gets its share, spread over a window of the run.

    Sorting by index plus a random offset of up to three images' worth keeps about three images
    in play at any time, so first registrations (and evictions) go on to the end of the run.
    """
    rng = random.Random(seed)
    picks = [i % images for i in range(calls)]
    return sorted(picks, key=lambda i: i + rng.uniform(0, 3))


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, from /proc/PID/status (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def parse_ids(text: str) -> dict[str, str]:
    """The Properties text of an answer as a dict of FILESYSTEM, KERNEL and RAMDISK."""
    ids = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {key: ids.get(key, "") for key in ("FILESYSTEM", "KERNEL", "RAMDISK")}


def fault_group(text: str) -> str:
    """A fault text with its particulars (hashes, ids, URLs, numbers) replaced, for grouping."""
    text = re.sub(r"https?://\S+", "<url>", text)
    text = re.sub(r"\b[0-9a-f]{40}\b", "<sha1>", text)
    text = re.sub(r"\b(ami|aki|ari|emi|eki|eri)-[0-9a-f]+\b", "<id>", text)
    text = re.sub(r"soak\d\d-[\w.-]+", "<name>", text)
    text = re.sub(r"\d+(\.\d+)?", "<n>", text)
    return text


class Runner:
    """Makes the calls, 'concurrency' at a time, and samples both daemons' RSS."""

    def __init__(self, site: Site, order: list[int], concurrency: int, rss_at: int) -> None:
        self.site = site
        self.order = order
        self.concurrency = concurrency
        self.rss_at = min(rss_at, len(order))
        self.outcomes: list[dict[str, Any]] = []
        self.rss: dict[str, dict[str, int]] = {}
        self.series: dict[str, dict[str, int]] = {}  # every RSS_EVERY calls, for the trend
        self.peak: dict[str, int] = collections.defaultdict(int)
        self._lock = threading.Lock()
        self._done = threading.Event()

    def _sample(self) -> dict[str, int]:
        return {name: rss_bytes(pid) for name, pid in self.site.pids().items()}

    def _monitor(self) -> None:
        while not self._done.wait(1.0):
            for name, value in self._sample().items():
                self.peak[name] = max(self.peak[name], value)

    def _call(self, seq: int, index: int) -> None:
        image = self.site.images[index]
        outcome: dict[str, Any] = {"seq": seq, "image": index}
        start = time.monotonic()
        try:
            text = self.site.service().RegisterImage(
                url=image.metadata_url, signature=image.metadata_sha1
            )
            outcome.update(kind="ok", ids=parse_ids(text or ""))
        except zeep.exceptions.Fault as exc:
            message = str(exc.message or "")
            clear = bool(message.strip()) and INTERNAL not in message and "Traceback" not in message
            outcome.update(kind="fault" if clear else "unclear", text=message)
        except requests.exceptions.Timeout as exc:
            outcome.update(kind="timeout", text=f"no answer within the client timeout: {exc}")
        except Exception as exc:  # the soak reports any other failure, it does not stop
            outcome.update(kind="error", text=f"{type(exc).__name__}: {exc}")
            log.debug("call %d", seq, exc_info=True)
        outcome["seconds"] = time.monotonic() - start
        with self._lock:
            self.outcomes.append(outcome)
            done = len(self.outcomes)
            if done in (self.rss_at, len(self.order)):
                self.rss[str(done)] = self._sample()
            if done % RSS_EVERY == 0 or done in (self.rss_at, len(self.order)):
                self.series[str(done)] = self.rss.get(str(done)) or self._sample()
        log.info(
            "call %3d (%d done) image %2d: %s in %.1f s%s",
            seq,
            done,
            index,
            outcome["kind"],
            outcome["seconds"],
            "" if outcome["kind"] == "ok" else f": {outcome.get('text', '')[:160]}",
        )

    def run(self) -> float:
        monitor = threading.Thread(target=self._monitor, daemon=True)
        monitor.start()
        start = time.monotonic()
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="call")
        try:
            futures.wait([pool.submit(self._call, s, i) for s, i in enumerate(self.order, 1)])
        except BaseException:
            # Interrupted: no new calls; those in flight end when the site is torn down.
            pool.shutdown(wait=False, cancel_futures=True)
            self._done.set()
            raise
        pool.shutdown()
        seconds = time.monotonic() - start
        self._done.set()
        monitor.join()
        return seconds


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(
    args: argparse.Namespace,
    site: Site,
    runner: Runner,
    seconds: float,
    found: dict[str, list[str]],
    checked: int,
) -> dict[str, Any]:
    outcomes = sorted(runner.outcomes, key=lambda o: o["seq"])
    kinds = collections.Counter(o["kind"] for o in outcomes)
    groups = collections.Counter(fault_group(o["text"]) for o in outcomes if o["kind"] != "ok")
    times = [o["seconds"] for o in outcomes]
    first, last = str(runner.rss_at), str(len(outcomes))
    growth = {
        name: (runner.rss[last][name] / runner.rss[first][name] - 1)
        if runner.rss.get(first, {}).get(name)
        else None
        for name in ("registrar", "imgstore")
    }
    origin_log = site.origin.log()
    drawn = collections.Counter(_fault_name(e["faults"]) for e in origin_log if e["random"])
    cloud_faults = collections.Counter(
        f"{what} {status} {code}" for what, status, code in site.cloud.injected_faults
    )
    failed = []
    for kind in ("timeout", "unclear", "error"):
        if kinds[kind]:
            failed.append(f"{kinds[kind]} calls ended in {kind}")
    for key, problems in found.items():
        if problems:
            failed.append(f"{key}: {len(problems)}")
    for name, value in growth.items():
        if value is None or value > args.rss_growth:
            failed.append(f"{name} RSS grew {value} between call {first} and {last}")
    return {
        "benchmark": "soak",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("workdir", "json", "verbose")},
            "cache_size": site.cache_size,
            "image_set_bytes": max(i.cached_bytes for i in site.images),
        },
        "calls": len(outcomes),
        "ok": kinds["ok"],
        "faulted": kinds["fault"],
        "timeouts": kinds["timeout"],
        "unclear": kinds["unclear"],
        "errors": kinds["error"],
        "fault_texts": dict(groups.most_common()),
        "duration_s": round(seconds, 1),
        "call_s": {
            "p50": round(percentile(times, 0.5), 2),
            "p95": round(percentile(times, 0.95), 2),
            "max": round(max(times, default=0), 2),
            "mean": round(statistics.fmean(times), 2) if times else 0,
        },
        "rss_bytes": {"at": runner.rss, "peak": dict(runner.peak), "by_call": runner.series},
        "rss_growth": growth,
        "origin": {
            "requests": len(origin_log),
            "faulted": sum(drawn.values()),
            "faults": dict(drawn.most_common()),
            "bytes_sent": site.origin.bytes_sent(),
            "faulted_requests": [
                {k: e[k] for k in ("seq", "name", "method", "range", "status", "state")}
                | {"fault": _fault_name(e["faults"])}
                for e in origin_log
                if e["random"]
            ],
        },
        "cloud": {
            "requests": len(site.cloud.ec2_calls) + len(site.cloud.s3_requests),
            "faulted": sum(cloud_faults.values()),
            "faults": dict(cloud_faults.most_common()),
            "registered_images": len(site.cloud.image_ids()),
        },
        "audit": found,
        "bundles_checked": checked,
        "orphans": sum(
            len(found.get(k, [])) for k in ("orphan_folders", "orphan_manifests", "orphan_images")
        ),
        "outcomes": outcomes,
        "failed": failed,
    }


def _fault_name(faults: Any) -> str:
    if faults.status:
        return f"{faults.status}" + (" Retry-After" if faults.retry_after else "")
    if faults.reset_after is not None:
        return f"reset after {faults.reset_after} B"
    if faults.stall_headers:
        return f"stall {faults.stall_headers:g} s before headers"
    return f"stall {faults.stall:g} s at {faults.stall_at} B"


def render(report: dict[str, Any]) -> str:
    mib = 1 << 20
    rss = report["rss_bytes"]["at"]
    lines = [
        f"soak: {report['calls']} calls over {report['settings']['images']} images, "
        f"{report['settings']['concurrency']} at a time, cache "
        f"{report['settings']['cache_size'] / mib:.1f} MiB "
        f"(image set {report['settings']['image_set_bytes'] / mib:.1f} MiB)",
        f"  ok {report['ok']}, faulted {report['faulted']}, timeouts {report['timeouts']}, "
        f"unclear {report['unclear']}, errors {report['errors']}",
        f"  duration {report['duration_s']} s; call p50 {report['call_s']['p50']} s, "
        f"p95 {report['call_s']['p95']} s, max {report['call_s']['max']} s",
        f"  origin: {report['origin']['requests']} requests, {report['origin']['faulted']} "
        f"faulted {report['origin']['faults']}",
        f"  cloud: {report['cloud']['requests']} requests, {report['cloud']['faulted']} "
        f"answered 500/503 ({report['cloud']['faults']})",
    ]
    for at, sample in rss.items():
        lines.append(
            f"  RSS after call {at}: registrar {sample['registrar'] / mib:.1f} MiB, "
            f"imgstore {sample['imgstore'] / mib:.1f} MiB"
        )
    growth = ", ".join(
        f"{k} {v * 100:+.1f} %" if v is not None else f"{k} -"
        for k, v in report["rss_growth"].items()
    )
    lines.append(f"  RSS growth: {growth}")
    trend = ", ".join(
        f"{at}: {v['registrar'] / mib:.0f}/{v['imgstore'] / mib:.0f}"
        for at, v in report["rss_bytes"]["by_call"].items()
    )
    lines.append(f"  RSS MiB by call (registrar/imgstore): {trend}")
    lines.append(
        f"  orphans: {report['orphans']}; bundles unbundled and compared with their sources: "
        f"{report['bundles_checked']}"
    )
    for key, problems in report["audit"].items():
        for problem in problems[:5]:
            lines.append(f"  {key}: {problem}")
    for text, count in report["fault_texts"].items():
        lines.append(f"  fault x{count}: {text[:300]}")
    lines.append("  PASSED" if not report["failed"] else "  FAILED: " + "; ".join(report["failed"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    settings = SiteSettings(
        workdir=args.workdir,
        images=args.images,
        fs_mib=args.fs_mib,
        cached_images=args.cached_images,
        origin_fault_rate=args.origin_faults,
        cloud_fault_rate=args.cloud_faults,
        seed=args.seed,
        read_deadline=args.read_deadline,
        stall=args.stall,
    )
    # Both end the run through KeyboardInterrupt, so the mount and every server are cleaned up.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    order = call_order(args.calls, args.images, args.seed)
    try:
        with open_site(settings, keep=args.keep) as site:
            site.call_timeout = args.call_timeout
            log.info(
                "site up: %d images, cache %d bytes, registrar pid %d, imgstore pid %d",
                len(site.images),
                site.cache_size,
                *site.pids().values(),
            )
            runner = Runner(site, order, args.concurrency, args.rss_at)
            seconds = runner.run()
            found, checked = audit(site, runner.outcomes)
            report = summarize(args, site, runner, seconds, found, checked)
            if args.keep:
                log.info("scratch data kept in %s", site.stack.root.parent)
    except KeyboardInterrupt:
        return 130
    except BaseException:
        # pytest.fail() from the support code is a BaseException; so is a failed set-up.
        traceback.print_exc()
        return 2
    out = args.json or RESULTS / f"soak-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    print(f"results: {out}")
    return 0 if not report["failed"] else 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
