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
from typing import Any, TypeAlias

import trio

from imgstore import client
from imgstore.config import StoreConfig, config_path, human_size, load
from imgstore.errors import BadSha1, BadUrl, ConfigError, StoreError

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
    _add_mount(sub, common)
    _add_blob_commands(sub, common)
    p = sub.add_parser("umount", parents=[common], help="unmount", description="Unmount a mount.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, nargs="?")
    return parser


# argparse's type for the subcommands' action is private: named once, for the annotations.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _add_mount(sub: Subparsers, common: argparse.ArgumentParser) -> None:
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


def _add_blob_commands(sub: Subparsers, common: argparse.ArgumentParser) -> None:
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
    cfg = _config(args, cache_size=args.cache_size)
    watch = _progress if sys.stderr.isatty() else None
    results = client.fetch(cfg, args.sha1s, _print_fetched, watch)
    return EXIT_FAILED if any(r.error for r in results) else EXIT_OK


def _print_fetched(result: client.Fetched) -> None:
    if result.error is None:
        print(f"{result.sha1} verified")
    else:
        print(f"imgstore fetch: {result.error}", file=sys.stderr)


async def _progress(blob: client.Progress) -> None:
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
    results = client.verify(_config(args), args.sha1s, _print_verdict)
    return EXIT_OK if all(v.ok for v in results) else EXIT_FAILED


def _print_verdict(verdict: client.Verdict) -> None:
    if verdict.skipped == "open":
        print(f"{verdict.sha1} is open by a mount or another process: not verified now")
    elif verdict.skipped == "incomplete":
        print(f"{verdict.sha1} not fully cached (use `imgstore fetch`)")
    else:
        print(f"{verdict.sha1} {verdict.state}")


def cmd_evict(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if not args.sha1s and not args.all:
        raise ConfigError("name blobs to evict, or --all")
    refused = 0
    for done in client.evict(cfg.cache_dir, args.sha1s, every=args.all):
        if done.pinned_by:
            print(f"{done.sha1} pinned by {', '.join(done.pinned_by)}: kept", file=sys.stderr)
        elif done.error is not None:
            print(f"{done.sha1}: {done.error}: kept", file=sys.stderr)
        else:
            print(f"{done.sha1} evicted ({human_size(done.freed)} freed)")
        # With --all, blobs in use are expected to stay: only a named blob kept is a failure.
        refused += done.kept and not args.all
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
