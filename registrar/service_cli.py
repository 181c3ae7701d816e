"""The `registrar serve`, `registrar register` and `registrar list` commands.

Wiring (registrar/cli.py): `add_subcommands(subparsers)` adds the three subcommands, each with
its own `--config FILE`; for them `args.service_command` is set, and `run(args)` runs it and
returns the exit code. `main(argv)` here is the same as a standalone program
(`python -m registrar.service_cli …`). The config file is `--config`, else `$IMAGEPROXY_CONFIG`,
else /etc/imageproxy/imageproxy.toml.

Exit codes: 0 success; 1 the registration (or service) failed; 2 bad usage, config or input.
Errors print one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from imgstore.config import DEFAULT_CONFIG, StoreConfig, config_path
from imgstore.config import load as load_store_config
from imgstore.errors import ConfigError as StoreConfigError
from imgstore.errors import StoreError
from registrar import config as registrar_config
from registrar import server
from registrar.access import Guard
from registrar.errors import (
    ConfigError,
    InputError,
    RegistrarError,
    RequestError,
    SignatureMismatch,
)
from registrar.progress import progress_bars
from registrar.properties import answer_text
from registrar.registry import Registry

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_STATE_DIR = Path("/var/lib/imageproxy")
NO_CONFIG = f"no config file: give --config FILE, set $IMAGEPROXY_CONFIG or write {DEFAULT_CONFIG}"


def add_subcommands(subparsers: Any) -> None:
    """Add `serve`, `register`, `list` and `import-registry` to the `registrar` parser."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a --config given before the subcommand is not reset by the subparser's default.
    common.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="TOML config file (default: $IMAGEPROXY_CONFIG, else /etc/imageproxy/imageproxy.toml)",
    )
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log debugging detail and show tracebacks",
    )

    p = subparsers.add_parser(
        "serve",
        parents=[common],
        help="run the SOAP service",
        description="Serve ORCA's RegisterImage SOAP calls on [registrar] listen, one log line "
        "per request. Cleans up what a previous run left half done before listening.",
    )
    p.set_defaults(service_command=cmd_serve)

    p = subparsers.add_parser(
        "register",
        parents=[common],
        help="register one image from its metadata URL and SHA-1",
        description="Do what one SOAP RegisterImage call does and print the same answer "
        "(FILESYSTEM=…, KERNEL=…, RAMDISK=… in java.util.Properties format).",
    )
    p.add_argument("url", metavar="URL", help="the metadata file's URL")
    p.add_argument("signature", metavar="SIGNATURE", help="the metadata file's SHA-1")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")
    p.set_defaults(service_command=cmd_register)

    p = subparsers.add_parser(
        "list",
        parents=[common],
        help="show the registry",
        description="Show what is registered: answers per metadata SHA-1, the images behind "
        "them, and registrations in flight.",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        type=Path,
        help="registry directory (default: [registrar] state_dir)",
    )
    p.set_defaults(service_command=cmd_list)

    p = subparsers.add_parser(
        "import-registry",
        parents=[common],
        help="take over the images the original ImageProxy registered",
        description="Read the original ImageProxy's registry (imageproxy.db, table IMAGE) and "
        "record every image id the cloud still has, so RegisterImage answers with it instead "
        "of registering the part again. Unfinished registrations and ids the cloud no longer "
        "has are skipped. Running it twice changes nothing.",
    )
    p.add_argument("path", metavar="PATH", type=Path, help="the original's imageproxy.db")
    p.set_defaults(service_command=cmd_import_registry)


def run(args: argparse.Namespace) -> int:
    """Run the subcommand's handler with logging set up and errors turned into exit codes."""
    debug = getattr(args, "debug", False)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s registrar[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
    handler: Callable[[argparse.Namespace], int] = args.service_command
    try:
        return handler(args)
    except SignatureMismatch as exc:
        _fail(args, exc, debug)
        return EXIT_FAILED  # the bytes failed verification: not a usage mistake
    except (ConfigError, InputError, RequestError) as exc:
        _fail(args, exc, debug)
        return EXIT_USAGE
    except StoreError as exc:
        _fail(args, exc, debug)
        return EXIT_USAGE if isinstance(exc, StoreConfigError) else EXIT_FAILED
    except RegistrarError as exc:
        _fail(args, exc, debug)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _fail(args: argparse.Namespace, exc: BaseException, debug: bool) -> None:
    if debug:
        log.exception("failed")
    print(f"registrar {args.command}: {exc}", file=sys.stderr)


def _config_path(args: argparse.Namespace) -> Path | None:
    return config_path(getattr(args, "config", None))


def _load(args: argparse.Namespace) -> tuple[registrar_config.Config, StoreConfig]:
    """The registrar config, and the store's (with its mountpoint set)."""
    path = _config_path(args)
    if path is None:
        raise ConfigError(NO_CONFIG)
    config = registrar_config.load(path)
    try:
        store = load_store_config(path, {})
    except StoreError as exc:
        raise ConfigError(f"[store] in {path}: {exc}") from exc
    if store.mountpoint is None:
        raise ConfigError(
            f"[store] mountpoint is not set in {path}: the registrar reads images "
            "through the imgstore mount"
        )
    return config, store


def _service(args: argparse.Namespace) -> Any:
    # Imported here: boto3 and the bundler cost start-up time `registrar list` does not need.
    from registrar.service import Service

    config, store = _load(args)
    mountpoint = store.mountpoint
    assert mountpoint is not None  # _load checked
    if not (mountpoint / "by-sha1").is_dir():
        raise ConfigError(f"{mountpoint} is not an imgstore mount (no by-sha1/): start imgstore")
    return Service.from_config(config, store.cache_dir, mountpoint, store.http_proxy), config


# --- serve ---


def _notify_systemd(message: bytes) -> None:
    """Send `message` to $NOTIFY_SOCKET when systemd runs us as Type=notify."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message)


async def _serve(app: Guard, listen: str, tls: tuple[str, str] | None = None) -> None:
    stop = trio.Event()

    async def on_signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s: stopping", signal.Signals(signum).name)
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signals)
        serve = partial(server.serve, app, listen, shutdown_trigger=stop.wait, tls=tls)
        binds = await nursery.start(serve)
        log.info("SOAP service listening on %s%s", binds[0], server.SERVICE)
        _notify_systemd(b"READY=1")
        await stop.wait()
        _notify_systemd(b"STOPPING=1")
    # The server returned after its graceful shutdown; the signal task ended with the event.


def cmd_serve(args: argparse.Namespace) -> int:
    service, config = _service(args)
    try:
        cleaned = service.recover()
        if cleaned:
            log.info("cleaned up %d registrations a previous run left half done", cleaned)
        access = config.registrar.access
        # 403/401 before the app; the app's /metrics shows the service's counters.
        app = Guard(server.App(service.answer_text, metrics=service.metrics), access)
        trio.run(_serve, app, config.registrar.listen, access.tls)
    finally:
        service.close()
    return EXIT_OK


# --- register ---


def cmd_register(args: argparse.Namespace) -> int:
    service, _ = _service(args)
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


def _register_with_progress(service: Any, url: str, signature: str) -> Any:
    with progress_bars(transient=False) as update:

        def progress(what: str, done: int, total: int) -> None:
            update(f"bundling {what}", done, total)

        return service.register(url, signature, trusted=True, progress=progress)


# --- list ---


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_list(args: argparse.Namespace) -> int:
    state_dir = args.state_dir
    if state_dir is None:
        path = _config_path(args)
        state_dir = registrar_config.load(path).registrar.state_dir if path else DEFAULT_STATE_DIR
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


def cmd_import_registry(args: argparse.Namespace) -> int:
    # Imported here: the cloud SDKs cost start-up time the other commands do not need.
    from registrar.clouds.select import backend_for
    from registrar.migrate import import_registry

    path = _config_path(args)
    if path is None:
        raise ConfigError(NO_CONFIG)
    config = registrar_config.load(path)
    backend = backend_for(config)
    registry = Registry(config.registrar.state_dir)
    try:
        report = import_registry(args.path, registry, backend.states)
    finally:
        registry.close()
    print(report.summary(args.path))
    return EXIT_OK


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


def main(argv: list[str] | None = None) -> int:
    """`serve`, `register` and `list` as a program of their own."""
    parser = argparse.ArgumentParser(prog="registrar", description=__doc__.splitlines()[0])
    add_subcommands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
