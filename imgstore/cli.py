"""The `imgstore` command line.

Exit codes: 0 success; 1 the store could not do it (unreachable origin, unknown blob,
verification failed, mount failed); 2 bad usage or input (bad SHA-1, URL, size, config).
Errors print one line on stderr, no traceback (`--debug` shows it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import trio

from imgstore import client
from imgstore.config import StoreConfig, config_path, human_size, load
from imgstore.errors import BadSha1, BadUrl, BlobCorrupt, ConfigError, StoreError

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _common_options(default: object) -> argparse.ArgumentParser:
    """--config, --cache-dir and --debug, accepted before and after the subcommand.

    The subcommands' copy defaults to SUPPRESS, so an option given before the subcommand name
    is not reset by the subcommand's own default.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        default=default,
        help="TOML file with a [store] section (default: $IMAGEPROXY_CONFIG, else "
        "/etc/imageproxy/imageproxy.toml if it exists)",
    )
    common.add_argument(
        "--cache-dir",
        metavar="DIR",
        type=Path,
        default=default,
        help="cache directory (default: [store] cache_dir, else $IMAGEPROXY_HOME)",
    )
    common.add_argument(
        "--debug",
        action="store_true",
        default=False if default is None else default,
        help="log debugging detail",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="imgstore",
        description="A lazy, verified, content-addressed image store behind a FUSE mount.",
        epilog="Exit codes: 0 ok, 1 the store could not do it, 2 bad usage or input.",
        parents=[_common_options(None)],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "mount",
        parents=[common],
        help="mount the store",
        description="Mount the store read-only: MOUNTPOINT/by-sha1/<sha1> for every blob. "
        "Daemonizes unless --foreground; returns once the mount is usable. Stop it with "
        "SIGTERM, `imgstore umount` or `fusermount3 -u`.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, nargs="?")
    p.add_argument("--cache-size", metavar="SIZE", help="hard budget of cached bytes, e.g. 50G")
    p.add_argument("--chunk-size", metavar="SIZE", help="fetch unit, e.g. 4MiB (default)")
    p.add_argument("--foreground", action="store_true", help="do not daemonize")
    p.add_argument("--allow-other", action="store_true", default=None, help="let other users read")

    p = sub.add_parser(
        "add",
        parents=[common],
        help="declare a blob by SHA-1 and URL(s)",
        description="Declare a blob. Probes the URL for the size; downloads nothing. Extra URLs "
        "are mirrors. Re-adding a corrupt blob makes it fetchable again.",
    )
    p.add_argument("sha1", metavar="SHA1")
    p.add_argument("urls", metavar="URL", nargs="+")

    p = sub.add_parser(
        "ls",
        parents=[common],
        help="list blobs",
        description="List every blob: sha1, size, bytes cached, state, url.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser(
        "fetch",
        parents=[common],
        help="fetch and verify whole blobs",
        description="Fetch whole blobs into the cache and verify their SHA-1, without a mount. "
        "Shows a progress bar on a terminal.",
    )
    p.add_argument("sha1s", metavar="SHA1", nargs="+")
    p.add_argument("--cache-size", metavar="SIZE", help="hard budget of cached bytes")

    p = sub.add_parser(
        "verify",
        parents=[common],
        help="re-hash fully cached blobs",
        description="Hash the cached bytes of fully cached blobs again; mismatches become corrupt.",
    )
    p.add_argument("sha1s", metavar="SHA1", nargs="*", help="default: every complete blob")

    p = sub.add_parser(
        "evict",
        parents=[common],
        help="drop cached data",
        description="Drop the cached bytes of blobs (they stay declared and fetchable). Refuses "
        "blobs that are open or pinned.",
    )
    p.add_argument("sha1s", metavar="SHA1", nargs="*")
    p.add_argument("--all", action="store_true", help="every blob that is not open or pinned")

    p = sub.add_parser("umount", parents=[common], help="unmount", description="Unmount a mount.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, nargs="?")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The mount daemon logs what it does (INFO). A one-shot command says how it went in its
    # own lines, so it shows only warnings (a dead mirror beside a live one), and not the
    # store's own errors, which its one error line repeats.
    daemon = args.command == "mount"
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO if daemon else logging.WARNING,
        format="%(asctime)s imgstore[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.debug:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpcore").setLevel(logging.WARNING)
        if not daemon:
            logging.getLogger("imgstore.store").setLevel(logging.CRITICAL)
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, BadSha1, BadUrl) as exc:
        print(f"imgstore {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as exc:
        if args.debug:
            log.exception("failed")
        print(f"imgstore {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _config(args: argparse.Namespace, **extra: Any) -> StoreConfig:
    return load(config_path(args.config), {"cache_dir": args.cache_dir, **extra})


def cmd_mount(args: argparse.Namespace) -> int:
    from imgstore.mount import run_mount  # pyfuse3 only where it is needed

    cfg = _config(
        args,
        cache_size=args.cache_size,
        chunk_size=args.chunk_size,
        mountpoint=args.mountpoint,
        allow_other=args.allow_other,
    )
    if cfg.mountpoint is None:
        raise ConfigError("no mountpoint: give MOUNTPOINT or [store] mountpoint")
    run_mount(cfg, cfg.mountpoint, args.foreground)
    return EXIT_OK


def cmd_umount(args: argparse.Namespace) -> int:
    from imgstore.mount import unmount

    mountpoint = args.mountpoint
    if mountpoint is None:
        mountpoint = _config(args).mountpoint
    if mountpoint is None:
        raise ConfigError("no mountpoint: give MOUNTPOINT or [store] mountpoint")
    unmount(mountpoint)
    return EXIT_OK


def cmd_add(args: argparse.Namespace) -> int:
    cfg = _config(args)
    blob = client.add(
        cfg.cache_dir,
        args.sha1,
        args.urls,
        chunk_size=cfg.chunk_size,
        http_proxy=cfg.http_proxy,
    )
    print(f"{blob.sha1} {blob.size} {blob.state}")
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    blobs = client.list_blobs(_config(args).cache_dir)
    if args.json:
        json.dump([dataclasses.asdict(b) for b in blobs], sys.stdout, indent=2)
        print()
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("SHA1", "SIZE", "CACHED", "STATE", "PINS", "URL"):
        table.add_column(column, justify="right" if column in ("SIZE", "CACHED") else "left")
    for b in blobs:
        cached = human_size(b.cached_bytes)
        if b.state == "partial" and b.size:
            cached += f" ({100 * b.cached_bytes / b.size:.0f}%)"
        url = b.urls[0] if b.urls else ""
        if len(b.urls) > 1:
            url += f" (+{len(b.urls) - 1})"
        table.add_row(b.sha1, human_size(b.size), cached, b.state, str(len(b.pins)), url)
    Console(width=200 if not sys.stdout.isatty() else None).print(table)
    return EXIT_OK


def cmd_fetch(args: argparse.Namespace) -> int:
    from imgstore.verify import normalize_sha1

    cfg = _config(args, cache_size=args.cache_size)
    sha1s = [normalize_sha1(s) for s in args.sha1s]
    for sha1 in sha1s:
        client.info(cfg.cache_dir, sha1)  # UnknownBlob before any work
    return trio.run(_fetch, cfg, sha1s, sys.stderr.isatty())


async def _fetch(cfg: StoreConfig, sha1s: list[str], show_progress: bool) -> int:
    from imgstore.store import open_store

    failed = 0
    async with open_store(cfg) as store:
        for sha1 in sha1s:
            error = await _fetch_one(store, sha1, show_progress)
            if error is None:
                print(f"{sha1} verified")
                continue
            if isinstance(error, BlobCorrupt):
                # The reason (the SHA-1 the bytes have) is in the catalog, as readers see it.
                error = BlobCorrupt.of(sha1, (await store.blob_record(sha1)).error)
            print(f"imgstore fetch: {error}", file=sys.stderr)
            failed += 1
    return EXIT_FAILED if failed else EXIT_OK


async def _fetch_one(store: Any, sha1: str, show_progress: bool) -> StoreError | None:
    """Fetch and verify one blob; the error, if any, for the caller to report and go on."""
    try:
        handle = await store.open(sha1)
    except StoreError as exc:
        return exc
    error = None
    try:
        async with trio.open_nursery() as nursery:
            if show_progress:
                nursery.start_soon(_progress, handle.blob)
            try:
                await store.fetch_all(handle)
            except StoreError as exc:
                # Caught here, not around the nursery: it would wrap it in an ExceptionGroup.
                error = exc
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await store.release(handle)
    return error


async def _progress(blob: Any) -> None:
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    with Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn()) as bar:
        task = bar.add_task(blob.sha1[:12], total=blob.size)
        try:
            while True:
                bar.update(task, completed=blob.cached_bytes)
                await trio.sleep(0.2)
        finally:
            bar.update(task, completed=blob.cached_bytes)  # the final state, not the last tick


def cmd_verify(args: argparse.Namespace) -> int:
    from imgstore.verify import normalize_sha1

    cfg = _config(args)
    if args.sha1s:
        sha1s = [normalize_sha1(s) for s in args.sha1s]
        for sha1 in sha1s:
            client.info(cfg.cache_dir, sha1)
    else:
        sha1s = [b.sha1 for b in client.list_blobs(cfg.cache_dir) if b.cached_bytes == b.size]
    return trio.run(_verify, cfg, sha1s)


async def _verify(cfg: StoreConfig, sha1s: list[str]) -> int:
    from imgstore.chunks import ExclusiveBlob
    from imgstore.errors import BlobBusy
    from imgstore.store import open_store

    bad = 0
    async with open_store(cfg) as store:
        for sha1 in sha1s:
            # A mount that has the blob open trusts its own view of the cached bytes; dropping
            # them under it (on a mismatch) would make it serve holes. Verify it later.
            try:
                with ExclusiveBlob(cfg.cache_dir, sha1):
                    pass
            except BlobBusy:
                print(f"{sha1} is open by a mount or another process: not verified now")
                bad += 1
                continue
            handle = await store.open(sha1)
            try:
                if not await store.verify_cached(handle):
                    print(f"{sha1} not fully cached (use `imgstore fetch`)")
                    bad += 1
                else:
                    print(f"{sha1} {handle.blob.state}")
                    bad += handle.blob.state != "verified"
            finally:
                await store.release(handle)
    return EXIT_FAILED if bad else EXIT_OK


def cmd_evict(args: argparse.Namespace) -> int:
    from imgstore.budget import evict_blob
    from imgstore.catalog import Catalog
    from imgstore.verify import normalize_sha1

    cfg = _config(args)
    if not args.sha1s and not args.all:
        raise ConfigError("name blobs to evict, or --all")
    blobs = {b.sha1: b for b in client.list_blobs(cfg.cache_dir)}
    if args.all:
        sha1s = list(blobs)
    else:
        sha1s = [normalize_sha1(s) for s in args.sha1s]
        for sha1 in sha1s:
            client.info(cfg.cache_dir, sha1)
    catalog = Catalog(cfg.cache_dir)
    refused = 0
    try:
        for sha1 in sha1s:
            if catalog.pinned(sha1):
                print(
                    f"{sha1} pinned by {', '.join(catalog.get(sha1).pins)}: kept", file=sys.stderr
                )
                refused += not args.all
                continue
            try:
                freed = evict_blob(cfg.cache_dir, catalog, sha1)
            except StoreError as exc:
                print(f"{sha1}: {exc}: kept", file=sys.stderr)
                refused += not args.all
                continue
            print(f"{sha1} evicted ({human_size(freed)} freed)")
    finally:
        catalog.close()
    return EXIT_FAILED if refused else EXIT_OK


COMMANDS = {
    "mount": cmd_mount,
    "umount": cmd_umount,
    "add": cmd_add,
    "ls": cmd_ls,
    "fetch": cmd_fetch,
    "verify": cmd_verify,
    "evict": cmd_evict,
}
