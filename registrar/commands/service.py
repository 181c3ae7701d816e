"""The handlers of `registrar serve`, `register`, `list` and `import-registry`.

Each takes the parsed arguments (registrar/cli.py builds the parser) and returns the exit code;
errors are raised, and registrar/cli.py turns each into one line and an exit code. `serve` and
`register` build the service through registrar/daemon.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from imgstore.config import config_path
from registrar import config as registrar_config
from registrar import daemon
from registrar.errors import ConfigError
from registrar.progress import progress_bars
from registrar.properties import answer_text
from registrar.registry import Answer, Registry

if TYPE_CHECKING:
    from registrar.service import Service

EXIT_OK = 0


def serve(args: argparse.Namespace) -> int:
    daemon.serve(registrar_config.config_file(args.config))
    return EXIT_OK


def register(args: argparse.Namespace) -> int:
    service, _ = daemon.open_service(registrar_config.config_file(args.config))
    try:
        service.recover()
        if sys.stderr.isatty() and not args.no_progress:
            answer = _register_with_progress(service, args.url, args.signature)
        else:
            answer = service.register(args.url, args.signature, trusted=True)
    finally:
        service.close()
    sys.stdout.write(answer_text(answer.filesystem, answer.kernel, answer.ramdisk, answer.qcow2))
    return EXIT_OK


def _register_with_progress(service: Service, url: str, signature: str) -> Answer:
    with progress_bars(transient=False) as update:

        def progress(what: str, done: int, total: int) -> None:
            update(f"bundling {what}", done, total)

        return service.register(url, signature, trusted=True, progress=progress)


def list_registry(args: argparse.Namespace) -> int:
    state_dir = args.state_dir
    if state_dir is None:
        # No config file is no mistake here: the default place is where a registry would be.
        path = config_path(args.config)
        default = registrar_config.RegistrarConfig.state_dir
        state_dir = registrar_config.load(path).registrar.state_dir if path else default
    if not state_dir.is_dir():
        raise ConfigError(f"state directory {state_dir} does not exist")
    if not (state_dir / "registry.sqlite3").exists():
        # Not an error: a registrar that has not served yet (and `list` must not create it).
        print(f"nothing registered yet (no registry in {state_dir})")
        return EXIT_OK
    registry = Registry(state_dir)
    try:
        _print_tables(registry)
    finally:
        registry.close()
    return EXIT_OK


def import_registry(args: argparse.Namespace) -> int:
    # Imported here: the cloud SDKs cost start-up time the other commands do not need.
    from registrar.clouds.select import backend_for
    from registrar.migrate import import_registry as import_original

    path = registrar_config.config_file(args.config)
    config = registrar_config.load(path)
    backend = backend_for(config)
    registry = Registry(config.registrar.state_dir)
    try:
        report = import_original(args.path, registry, backend.states)
    finally:
        registry.close()
    print(report.summary(args.path))
    return EXIT_OK


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _tables(registry: Registry) -> list[tuple[str, list[str], list[list[str]]]]:
    """The registry as (title, header, rows) tables."""
    tables = [
        (
            "Answers (metadata SHA-1 → ids)",
            ["metadata sha1", "FILESYSTEM", "KERNEL", "RAMDISK", "QCOW2", "updated", "url"],
            [
                [
                    a.metadata_sha1,
                    a.filesystem or "-",
                    a.kernel or "-",
                    a.ramdisk or "-",
                    a.qcow2 or "-",
                    _when(a.updated),
                    a.url,
                ]
                for a in registry.answers()
            ],
        ),
        (
            "Images (part SHA-1 → id)",
            ["kind", "part sha1", "image id", "bundle", "registered"],
            [
                [i.kind, i.sha1, i.image_id, f"{i.bucket}/{i.prefix}", _when(i.created)]
                for i in registry.images()
            ],
        ),
    ]
    imported = registry.all_imported()
    if imported:
        tables.append(
            (
                "Imported from the original ImageProxy (part SHA-1 → id)",
                ["kind", "part sha1", "image id", "imported"],
                [[i.kind, i.sha1, i.image_id, _when(i.imported)] for i in imported],
            )
        )
    jobs = registry.jobs()
    if jobs:
        now = time.time()
        tables.append(
            (
                "In flight",
                ["key", "owner", "state", "bundle", "image id", "for"],
                [
                    [
                        j.key,
                        j.owner,
                        "running" if j.owner_alive() else "abandoned (cleaned up at next start)",
                        f"{j.bucket}/{j.prefix}" if j.prefix else "-",
                        j.image_id or "-",
                        f"{now - j.started:.0f} s",
                    ]
                    for j in jobs
                ],
            )
        )
    return tables


def _print_tables(registry: Registry) -> None:
    tables = _tables(registry)
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        console = Console()
        for title, header, rows in tables:
            table = Table(title=title, title_justify="left")
            for column in header:
                table.add_column(column, overflow="fold")
            for row in rows:
                table.add_row(*row)
            console.print(table)
        return
    # Not a terminal: plain aligned columns that never fold, for grep and scripts.
    for number, (title, header, rows) in enumerate(tables):
        print(("\n" if number else "") + title)
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
