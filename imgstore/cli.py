"""The `imgstore` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgstore",
        description="A lazy, verified, content-addressed image store behind a FUSE mount.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML config file")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("mount", help="mount the store")
    sub.add_parser("add", help="declare a blob by SHA-1 and URL(s)")
    sub.add_parser("ls", help="list blobs")
    sub.add_parser("fetch", help="fetch and verify whole blobs")
    sub.add_parser("verify", help="re-verify cached blobs")
    sub.add_parser("evict", help="drop cached data")
    sub.add_parser("umount", help="unmount")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    print(f"imgstore: {args.command}: not implemented yet", file=sys.stderr)
    return 2
