"""The handler of `registrar install-image`: bundle, upload and register one local file.

It takes the parsed arguments (registrar/cli.py builds the parser), prints the new image id
and returns 0; errors are raised and registrar/cli.py says them. A progress bar shows on a
terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator

from registrar import config as registrar_config
from registrar.errors import InputError

EXIT_OK = 0


def install_image(args: argparse.Namespace) -> int:
    if args.image_type != "machine" and (args.kernel or args.ramdisk):
        raise InputError(f"--kernel and --ramdisk apply to machine images, not {args.image_type}")
    config_path = registrar_config.config_file(args.config)
    # Imported here: `registrar --help` stays quick without boto3.
    from registrar.install import install_file

    try:
        size = args.file.stat().st_size
    except OSError as exc:
        raise InputError(f"cannot read {args.file}: {exc.strerror}") from exc
    config = registrar_config.load(config_path)
    with _progress_bar(size, args.file.name) as advance:
        installed = install_file(
            config,
            args.file,
            image_type=args.image_type,
            arch=args.arch,
            kernel_id=args.kernel,
            ramdisk_id=args.ramdisk,
            name=args.name,
            decompress=args.image_type == "machine" and not args.raw,
            progress=advance,
        )
    print(installed.image_id)
    return EXIT_OK


@contextlib.contextmanager
def _progress_bar(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr when it is a terminal; else a callback doing nothing."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = progress.add_task(f"bundling {label}", total=total)
    with progress:
        yield lambda n: progress.advance(task, n)
