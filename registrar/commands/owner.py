"""The handlers of `registrar publish` and `registrar check`, for image owners.

They need no config file, no mount and no cloud. Each takes the parsed arguments
(registrar/cli.py builds the parser) and returns the exit code: `check` returns 1 when a site
would refuse the image; errors are raised and registrar/cli.py says them. Output goes to
stdout; progress bars (on a terminal) and errors to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from registrar.errors import PublishUsage
from registrar.imagefile import human_size
from registrar.progress import progress_bars

EXIT_OK, EXIT_FAILED = 0, 1


# --- publish ---


def publish(args: argparse.Namespace) -> int:
    from registrar import publish as pub

    image = args.image
    if args.tar is not None and image is not None:
        raise PublishUsage("give IMAGE or --tar, not both")
    if not args.out.is_dir():
        raise PublishUsage(f"--out {args.out}: no such directory")
    for given in (image, args.kernel, args.ramdisk, args.qcow2):
        if given is not None and not given.is_file():
            raise PublishUsage(f"{given}: no such file")
    made: Path | None = None  # the tarball --tar made
    with _progress() as progress:
        if args.tar is not None:
            name = args.name or pub.default_name(args.tar)
            image = made = pub.make_tarball(args.tar, args.out, name, progress)
            args.name = name
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
    # Printed once the bars are gone: while they show, rich sends whatever is printed to
    # their console, which is stderr.
    if made is not None:
        print(f"made {made} (gzip tar, one sparse member `filesystem`)")
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


def check(args: argparse.Namespace) -> int:
    from registrar.check import check as check_image

    with _progress() as progress:
        result = check_image(args.url, args.signature, quick=args.quick, progress=progress)
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
