"""Summaries of a py-spy raw profile (`--format raw`): where the imgstore daemon spends CPU.

Each raw line is `frame;frame;…;leaf count`, the first frame naming the thread when py-spy ran
with `--threads`. Without `--idle`, py-spy mostly samples threads that are running (CPU time);
with it, blocked threads too (wall time). Either way, samples whose leaf is trio's epoll wait or
an idle worker thread are counted as idle and left out of the hot lists.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

MAIN = "trio thread"  # pyfuse3 and trio run on the main thread
# Leaves where a thread waits for work: trio's epoll wait, an idle thread-cache worker.
_IDLE_LEAVES = ("EpollIOManager.get_events", "WorkerThread._work")


def summarize(raw: Path, top: int = 12) -> dict:
    """Samples per thread, and the functions with the most self and inclusive samples."""
    self_time: Counter[str] = Counter()
    main_self: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    idle: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = "?"
        if frames[0].startswith("thread ("):
            thread = _thread_name(frames[0])
            threads[thread] += n
            frames = frames[1:]
        if not frames:
            continue
        total += n
        if frames[-1].startswith(_IDLE_LEAVES):
            idle[thread] += n
            continue
        self_time[frames[-1]] += n
        if thread == MAIN:
            main_self[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    return {
        "samples": total,
        "threads": dict(threads.most_common()),
        "idle": dict(idle.most_common()),
        "self": [[f, n] for f, n in self_time.most_common(top)],
        "trio_thread_self": [[f, n] for f, n in main_self.most_common(top)],
        "inclusive": [[f, n] for f, n in inclusive.most_common(3 * top) if not _is_plumbing(f)][
            :top
        ],
    }


def render(summary: dict) -> str:
    total = summary["samples"] or 1
    lines = [f"py-spy: {summary['samples']} samples; idle = waiting in epoll or for a job"]
    lines += [
        f"  {t}: {n / total:.0%} of samples, {summary['idle'].get(t, 0) / total:.0%} idle"
        for t, n in summary["threads"].items()
    ]
    lines.append("  hottest (self):")
    lines += [f"    {n / total:5.1%}  {f}" for f, n in summary["self"]]
    lines.append(f"  hottest on the {MAIN} (self):")
    lines += [f"    {n / total:5.1%}  {f}" for f, n in summary["trio_thread_self"]]
    lines.append("  hottest (inclusive, trio/startup plumbing left out):")
    lines += [f"    {n / total:5.1%}  {f}" for f, n in summary["inclusive"]]
    return "\n".join(lines)


def _thread_name(frame: str) -> str:
    # "thread (1234): MainThread"; trio names its worker threads "Trio thread N", or after the
    # function they run ("None from imgstore.store.Store._flight").
    name = frame.split(":", 1)[-1].strip()
    return MAIN if name == "MainThread" else "worker threads"


def _is_plumbing(frame: str) -> bool:
    return frame.startswith(
        (
            "<module>",
            "main ",
            "run ",
            "unrolled_run",
            "cmd_mount",
            "run_mount",
            "_bootstrap",
            "_work ",
            "run_sync",
            "worker_thread_fn",
            "capture ",
            "Thread.run",
        )
    )
