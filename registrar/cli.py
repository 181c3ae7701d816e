"""The `registrar` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registrar",
        description="Answers ORCA RegisterImage calls: bundles, uploads and registers images.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML config file")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("serve", help="run the SOAP service")
    sub.add_parser("register", help="register one image from its metadata URL and SHA-1")
    sub.add_parser("install-image", help="bundle, upload and register a local image file")
    sub.add_parser("list", help="show the registry")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    print(f"registrar: {args.command}: not implemented yet", file=sys.stderr)
    return 2
