"""The `registrar publish` and `registrar check` commands, for image owners.

They need no config file, no mount and no cloud. Wiring (registrar/cli.py): `add_subcommands`
adds both; for them `args.owner_command` is set, and `run(args)` runs it and returns the exit
code. Output goes to stdout; progress bars (on a terminal) and errors to stderr.

Exit codes:
- publish: 0 written; 1 the registrar would refuse the files (nothing written); 2 bad usage
  (PublishUsage) or a file that cannot be read.
- check: 0 every site would accept the image; 1 it would not (the reasons are printed);
  2 bad usage (a URL or SHA-1 that is not one).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from registrar.errors import InputError, PublishError
from registrar.imagefile import human_size
from registrar.progress import progress_bars

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_subcommands(subparsers: Any) -> None:
    """Add `publish` and `check` to the `registrar` parser's subparsers."""
    p = subparsers.add_parser(
        "publish",
        help="write the metadata file for image files, and the lines for an ORCA request",
        description="Hash each file, tell its type from its content as the registrar reads it, "
        "write NAME.xml (the original ImageProxy's metadata format, each URL being "
        "BASE_URL/<file name>), and print the metadata's URL and SHA-1 with the NDL-OWL lines "
        "to paste into an ORCA request. Upload NAME.xml and the files to BASE_URL, then run "
        "`registrar check`. Needs no config, mount or cloud.",
        epilog="IMAGE may be a raw filesystem image (FILESYSTEM); a gzip, bzip2, xz, lzma or "
        "compress file, or such a compressed tar holding `filesystem` (ZFILESYSTEM); or a qcow2 "
        "image (QCOW2). Exit codes: 0 written; 1 the registrar would refuse the files (nothing "
        "written); 2 bad usage or an unreadable file.",
    )
    p.add_argument(
        "--base-url",
        required=True,
        metavar="URL",
        help="where the files will be served: each URL is URL/<file name>",
    )
    p.add_argument("--name", help="metadata file name without .xml (default: from IMAGE)")
    p.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=Path("."),
        help="where NAME.xml (and --tar's NAME.tgz) are written (default: .)",
    )
    p.add_argument("--kernel", metavar="FILE", type=Path, help="a kernel (KERNEL), as is")
    p.add_argument("--ramdisk", metavar="FILE", type=Path, help="a ramdisk (RAMDISK), as is")
    p.add_argument(
        "--qcow2",
        metavar="FILE",
        type=Path,
        help="a qcow2 image (QCOW2; OpenStack sites), beside or instead of IMAGE",
    )
    p.add_argument(
        "--tar",
        metavar="DIR_OR_FILE",
        type=Path,
        help="make the ZFILESYSTEM first, as imgcapture.sh did: OUT/NAME.tgz, a gzip tar with "
        "one sparse member `filesystem` (the file DIR/filesystem, or FILE itself); it is IMAGE",
    )
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="tracebacks")
    p.add_argument("image", metavar="IMAGE", nargs="?", type=Path, help="the filesystem image")
    p.set_defaults(owner_command=cmd_publish)

    p = subparsers.add_parser(
        "check",
        help="check that a published image will register at every site",
        description="Do what a site does with URL and SIGNATURE, from here: download the "
        "metadata, check its SHA-1, parse it with the service's rules; for each image, a real "
        "ranged request (reachable, size, Range honoured, ETag) and, unless --quick, a full "
        "download checking the SHA-1, the declared type against the content, and that a "
        "ZFILESYSTEM decompresses to a usable image. Prints a table and a verdict. No address "
        "is refused and nothing is cached.",
        epilog="Exit codes: 0 every site would accept the image; 1 it would not (each reason "
        "is printed); 2 bad usage.",
    )
    p.add_argument("url", metavar="URL", help="the metadata file's URL")
    p.add_argument("signature", metavar="SIGNATURE", help="the metadata file's SHA-1")
    p.add_argument(
        "--quick",
        action="store_true",
        help="no full downloads: probe each file and read only the start of filesystems",
    )
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="tracebacks")
    p.set_defaults(owner_command=cmd_check)


def run(args: argparse.Namespace) -> int:
    """Run `publish` or `check`; errors become one line on stderr and an exit code."""
    debug = getattr(args, "debug", False)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format=f"registrar {args.command}: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
    handler: Callable[[argparse.Namespace], int] = args.owner_command
    try:
        return handler(args)
    except PublishError as exc:
        return _fail(args, exc, debug, EXIT_FAILED)
    except InputError as exc:
        return _fail(args, exc, debug, EXIT_USAGE)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(args, f"{where}{exc.strerror or exc}", debug, EXIT_USAGE)
    except KeyboardInterrupt:
        return 130


def _fail(args: argparse.Namespace, exc: BaseException | str, debug: bool, code: int) -> int:
    if debug and isinstance(exc, BaseException):
        log.exception("failed")
    print(f"registrar {args.command}: {exc}", file=sys.stderr)
    return code


# --- publish ---


def cmd_publish(args: argparse.Namespace) -> int:
    from registrar import publish as pub

    image = args.image
    if args.tar is not None and image is not None:
        print("registrar publish: give IMAGE or --tar, not both", file=sys.stderr)
        return EXIT_USAGE
    if not args.out.is_dir():
        print(f"registrar publish: --out {args.out}: no such directory", file=sys.stderr)
        return EXIT_USAGE
    for given in (image, args.kernel, args.ramdisk, args.qcow2):
        if given is not None and not given.is_file():
            print(f"registrar publish: {given}: no such file", file=sys.stderr)
            return EXIT_USAGE
    with _progress() as progress:
        if args.tar is not None:
            name = args.name or pub.default_name(args.tar)
            image = pub.make_tarball(args.tar, args.out, name, progress)
            args.name = name
            print(f"made {image} (gzip tar, one sparse member `filesystem`)")
        result = pub.publish(
            args.base_url,
            image=image,
            kernel=args.kernel,
            ramdisk=args.ramdisk,
            qcow2=args.qcow2,
            name=args.name,
            out_dir=args.out,
            progress=progress,
        )
    for note in result.notes:
        print(f"note: {note}")
    _print_table(
        ["type", "file", "size", "content", "sha1"],
        [[f.type, str(f.path), human_size(f.size), f.content, f.sha1] for f in result.files],
    )
    base = result.metadata_url.rsplit("/", 1)[0]
    uploads = " ".join([result.metadata_path.name, *(f.path.name for f in result.files)])
    print(f"\nwrote {result.metadata_path}")
    print(f"upload to {base}/: {uploads}")
    print(f"\nmetadata URL:   {result.metadata_url}")
    print(f"metadata SHA-1: {result.metadata_sha1}")
    print("\nNDL-OWL (the image in an ORCA request; a node names it with compute:diskImage):")
    print(pub.ndl_owl(result))
    print(f'<!-- node: <compute:diskImage rdf:resource="{pub.image_subject(result)}"/> -->')
    print(f"\nonce uploaded: registrar check {result.metadata_url} {result.metadata_sha1}")
    return EXIT_OK


# --- check ---


def cmd_check(args: argparse.Namespace) -> int:
    from registrar.check import check

    with _progress() as progress:
        result = check(args.url, args.signature, quick=args.quick, progress=progress)
    print(f"metadata {result.url}")
    if result.metadata_sha1 is not None:
        mark = "ok" if result.metadata_sha1 == result.signature else "MISMATCH"
        print(f"  SHA-1 {result.metadata_sha1} ({mark})")
    for note in result.notes:
        print(f"  note: {note}")
    if result.parts:
        print()
        _print_table(
            ["type", "reachable", "size", "range", "etag", "sha1", "content", "url"],
            [
                [
                    p.type,
                    "yes" if p.reachable else "NO",
                    human_size(p.size) if p.size is not None else "-",
                    {True: "yes", False: "NO", None: "-"}[p.ranges],
                    p.etag or "-",
                    {True: "ok", False: "MISMATCH", None: "not checked"}[p.sha1_ok],
                    p.content or "-",
                    p.url,
                ]
                for p in result.parts
            ],
        )
        for p in result.parts:
            for note in p.notes:
                print(f"  note: {p.type}: {note}")
    problems = result.all_problems()
    print()
    for problem in problems:
        print(f"problem: {problem}")
    if problems:
        print(f"verdict: NOT READY - {len(problems)} problem(s) above; fix them and check again")
        return EXIT_FAILED
    checked = "probed (--quick)" if args.quick else "downloaded and verified"
    print(f"verdict: OK - every site would register it ({len(result.parts)} file(s) {checked})")
    return EXIT_OK


# --- output ---


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(*header)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    # Not a terminal: plain aligned columns that never fold, for grep and scripts.
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@contextlib.contextmanager
def _progress() -> Iterator[Callable[[str, int, int | None], None] | None]:
    """A progress bar per file on stderr when it is a terminal; else None."""
    if not sys.stderr.isatty():
        yield None
        return
    with progress_bars(transient=True) as update:
        yield update
