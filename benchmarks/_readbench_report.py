"""The report of bench_read.py: medians over runs, ratios, the issue's targets, table and JSON."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

Samples = dict[str, dict[str, list[dict]]]
MiB = 1 << 20


@dataclass(frozen=True)
class Stat:
    """Median and range of one metric over the runs that produced it."""

    median: float
    lo: float
    hi: float
    n: int


def stat(samples: Samples, case: str, tool: str, key: str) -> Stat | None:
    values = [
        s[key] for s in samples.get(case, {}).get(tool, []) if isinstance(s.get(key), int | float)
    ]
    if not values:
        return None
    return Stat(statistics.median(values), min(values), max(values), len(values))


def ratio(a: Stat | None, b: Stat | None) -> float | None:
    if a is None or b is None or b.median == 0:
        return None
    return a.median / b.median


def targets(samples: Samples, size: int, chunk: int, reads: int) -> list[dict]:
    """Each target of issue 6 with its measured value; `met` is None when a part is missing."""
    cold = {
        t: stat(samples, "cold", t, "seconds") for t in ("imgstore", "curl", "rclone", "httpdirfs")
    }
    img = cold["imgstore"]

    def worst(case: str, tool: str, key: str) -> float | None:
        s = stat(samples, case, tool, key)
        return None if s is None else s.hi

    out = [
        ("cold read vs curl -o", ratio(img, cold["curl"]), 1.2, "x"),
        ("cold read vs rclone", ratio(img, cold["rclone"]), 0.8, "x"),
        ("cold read vs httpdirfs", ratio(img, cold["httpdirfs"]), 0.2, "x"),
        (
            "verified vs cold read",
            ratio(stat(samples, "cold", "imgstore", "verified_s"), img),
            1.1,
            "x",
        ),
        (
            "warm fresh mount vs cat (disk)",
            ratio(
                stat(samples, "warm_fresh", "imgstore", "seconds"),
                stat(samples, "warm_fresh", "cat", "seconds"),
            ),
            1.5,
            "x",
        ),
        (
            "warm hot page cache vs cat (hot)",
            ratio(
                stat(samples, "warm_hot", "imgstore", "seconds"),
                stat(samples, "warm_hot", "cat", "seconds"),
            ),
            1.2,
            "x",
        ),
        (
            "random reads: origin bytes (worst run), chunks",
            _div(worst("random", "imgstore", "origin_bytes"), chunk),
            float(reads),
            "chunks",
        ),
        (
            "random reads: median latency vs rclone",
            ratio(
                stat(samples, "random", "imgstore", "median_s"),
                stat(samples, "random", "rclone", "median_s"),
            ),
            1.0,
            "x",
        ),
        (
            "peak daemon RSS (worst run), MiB",
            _div(worst("cold", "imgstore", "rss_hwm_bytes"), MiB),
            150.0,
            "MiB",
        ),
        (
            "two sites: origin bytes / image size (worst run)",
            _div(worst("scaleout", "imgstore", "origin_bytes"), size),
            1.05,
            "x",
        ),
    ]
    return [
        {
            "target": name,
            "value": value,
            "limit": limit,
            "unit": unit,
            "met": None if value is None else value <= limit,
        }
        for name, value, limit, unit in out
    ]


def _div(a: float | None, b: float) -> float | None:
    return None if a is None else a / b


def table(samples: Samples, size: int, missing: dict[str, str]) -> list[list[str]]:
    """Rows of [case, tool, median, min–max, rate/extra, ratios]."""
    rows: list[list[str]] = []
    cold_img = stat(samples, "cold", "imgstore", "seconds")
    comps = {t: stat(samples, "cold", t, "seconds") for t in ("curl", "rclone", "httpdirfs")}

    def seconds_row(
        case: str,
        label: str,
        tool: str,
        key: str,
        nbytes: int,
        ratios: str = "",
        name: str | None = None,
    ) -> None:
        s = stat(samples, case, tool, key)
        if s is None:
            if tool in missing:
                rows.append([label, tool, "missing", "", missing[tool], ""])
            elif tool in samples.get(case, {}) or case in samples:
                rows.append([label, tool, "no data", "", "", ""])
            return
        origin = stat(samples, case, tool, "origin_bytes")
        extra = f"{nbytes / MiB / s.median:8.1f} MiB/s" if s.median else ""
        if origin is not None:
            extra += f"  origin {origin.median / MiB:.1f} MiB"
        reqs = stat(samples, case, tool, "origin_requests")
        flight = stat(samples, case, tool, "origin_in_flight")
        if reqs is not None and flight is not None and key == "seconds":
            extra += f" in {reqs.median:.0f} req, {flight.median:.1f} in flight"
        cpu = stat(samples, case, tool, "daemon_cpu_s")
        if cpu is not None and key == "seconds":
            extra += f", daemon CPU {cpu.median:.2f} s"
        rows.append(
            [label, name or tool, _sec(s.median), f"{_sec(s.lo)}–{_sec(s.hi)}", extra, ratios]
        )

    # imgstore makes every chunk durable before serving it; curl;sync is that same bar for curl.
    bars = {**comps, "curl;sync": stat(samples, "cold", "curl", "seconds_with_sync")}
    ratios = "  ".join(
        f"{r:.2f}× {t}"
        for t, r in ((t, ratio(cold_img, c)) for t, c in bars.items())
        if r is not None
    )
    seconds_row("cold", "cold read", "curl", "seconds", size, name="curl -o")
    seconds_row(
        "cold",
        "cold read",
        "curl",
        "seconds_with_sync",
        size,
        "until synced to disk",
        name="curl -o; sync",
    )
    seconds_row("cold", "cold read", "imgstore", "seconds", size, ratios)
    for t in ("rclone", "httpdirfs"):
        seconds_row(
            "cold", "cold read", t, "seconds", size, _ratio_text(comps[t], comps["curl"], "curl")
        )
    ver = stat(samples, "cold", "imgstore", "verified_s")
    if ver is not None:
        rows.append(
            [
                "verified",
                "imgstore",
                _sec(ver.median),
                f"{_sec(ver.lo)}–{_sec(ver.hi)}",
                "from read start",
                _ratio_text(ver, cold_img, "cold read"),
            ]
        )
    rss = stat(samples, "cold", "imgstore", "rss_hwm_bytes")
    if rss is not None:
        rows.append(
            [
                "peak RSS",
                "imgstore",
                f"{rss.median / MiB:.0f} MiB",
                f"{rss.lo / MiB:.0f}–{rss.hi / MiB:.0f} MiB",
                "VmHWM, cold read",
                "",
            ]
        )
    for case, label, base in (
        ("warm_fresh", "warm, fresh mount", "cat (disk)"),
        ("warm_hot", "warm, page cache hot", "cat (hot)"),
    ):
        seconds_row(
            case,
            label,
            "cat",
            "seconds",
            size,
            "ordinary file, same disk",
            name=f"cat ({'disk' if case == 'warm_fresh' else 'hot'})",
        )
        seconds_row(
            case,
            label,
            "imgstore",
            "seconds",
            size,
            _ratio_text(
                stat(samples, case, "imgstore", "seconds"),
                stat(samples, case, "cat", "seconds"),
                base,
            ),
        )
    rclone_med = stat(samples, "random", "rclone", "median_s")
    for tool in ("imgstore", "rclone"):
        med = stat(samples, "random", tool, "median_s")
        if med is None:
            if tool in missing and "random" in samples:
                rows.append(["random 4 KiB", tool, "missing", "", missing[tool], ""])
            continue
        p99 = stat(samples, "random", tool, "p99_s")
        origin = stat(samples, "random", tool, "origin_bytes")
        extra = f"p99 {_ms(p99.median if p99 else None)}  origin {_mib(origin)} MiB"
        rows.append(
            [
                "random 4 KiB",
                tool,
                _ms(med.median),
                f"{_ms(med.lo)}–{_ms(med.hi)}",
                extra,
                _ratio_text(med, rclone_med, "rclone") if tool == "imgstore" else "",
            ]
        )
    conc_curl = stat(samples, "concurrent", "curl", "seconds")
    for tool in ("curl", "imgstore", "rclone"):
        seconds_row(
            "concurrent",
            "4 readers, 4 blobs",
            tool,
            "seconds",
            size,
            ""
            if tool == "curl"
            else _ratio_text(stat(samples, "concurrent", tool, "seconds"), conc_curl, "curl"),
        )
    so = stat(samples, "scaleout", "imgstore", "origin_bytes")
    if so is not None:
        modes = {s.get("mode") for s in samples["scaleout"]["imgstore"]}
        secs = stat(samples, "scaleout", "imgstore", "seconds")
        rows.append(
            [
                "2 sites, 1 proxy",
                "imgstore",
                f"{so.median / MiB:.1f} MiB",
                f"{so.lo / MiB:.1f}–{so.hi / MiB:.1f} MiB",
                f"origin bytes; both read in {_sec(secs.median) if secs else '?'}; "
                f"via {'/'.join(sorted(str(m) for m in modes))}",
                f"{so.median / size:.3f}× image size",
            ]
        )
    return rows


def render(rows: list[list[str]], tgts: list[dict], header: str) -> str:
    head = ["case", "tool", "median", "min–max", "rate, origin bytes", "ratio"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [header, ""]
    for r in [head, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    lines += ["", "targets (issue 6):"]
    for t in tgts:
        mark = {True: "met", False: "NOT MET", None: "n/a"}[t["met"]]
        value = "—" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"  {mark:8} {t['target']}: {value} (limit {t['limit']:g} {t['unit']})")
    return "\n".join(lines)


def _ratio_text(a: Stat | None, b: Stat | None, name: str) -> str:
    r = ratio(a, b)
    return "" if r is None else f"{r:.2f}× {name}"


def _sec(x: float) -> str:
    return f"{x:.2f} s" if x >= 0.1 else f"{x * 1000:.1f} ms"


def _ms(x: float | None) -> str:
    return "?" if x is None else f"{x * 1000:.2f} ms"


def _mib(s: Stat | None) -> str:
    return "?" if s is None else f"{s.median / MiB:.1f}"
