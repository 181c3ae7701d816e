"""Progress bars on stderr for the registrar's commands (stdout carries their results).

with progress_bars(transient=True) as update:
    update("centos7.img", done_bytes, total_bytes)   # one bar per name, made on first use
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

Update = Callable[[str, int, "int | None"], None]


@contextlib.contextmanager
def progress_bars(*, transient: bool) -> Iterator[Update]:
    """Rich download-style bars, one per name; `transient` ones vanish when done."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=transient,
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(what: str, done: int, total: int | None) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done)

        yield update
