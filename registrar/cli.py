"""The `registrar` command line.

`registrar install-image --config F [--type machine|kernel|ramdisk] [--kernel EKI]
[--ramdisk ERI] [--arch x86_64] [--name NAME] [--raw] FILE` bundles, uploads and registers one
local image file (what `euca-install-image` does) and prints the new image id. A compressed
machine image (gzip, bzip2, xz/lzma, compress, or a tarball holding `filesystem`) is unpacked
first, detected by its magic bytes; `--raw` bundles it as it is. Kernels and ramdisks are always
bundled byte for byte (a ramdisk is usually gzipped on purpose). A progress bar shows on a
terminal. It is also the quickest way to test the `[cloud]` settings.

The config file is `--config`, else `$IMAGEPROXY_CONFIG`, else /etc/imageproxy/imageproxy.toml.

Exit codes: 0 success; 1 the bundle, upload or registration failed (nothing is left behind in
the cloud); 2 bad usage, config, credentials or input file. Errors print one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from registrar import config as registrar_config
from registrar import owner_cli, service_cli
from registrar.errors import (
    ConfigError,
    DecompressError,
    ImageChecksumMismatch,
    InputError,
    RegistrarError,
)

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registrar",
        description="Answers ORCA RegisterImage calls: bundles, uploads and registers images.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML config file")
    parser.add_argument(
        "--debug", action="store_true", help="log debugging detail and show tracebacks"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    service_cli.add_subcommands(sub)
    _add_install_image(sub)
    owner_cli.add_subcommands(sub)
    return parser


def _add_install_image(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "install-image",
        help="bundle, upload and register a local image file",
        description="Bundle, upload and register a local image file; print the new image id.",
        epilog="Exit codes: 0 success, 1 bundling/upload/registration failed, "
        "2 bad usage, config or input file.",
    )
    # SUPPRESS: a --config given before the subcommand is not reset by this default.
    p.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="TOML config file (default: $IMAGEPROXY_CONFIG, else /etc/imageproxy/imageproxy.toml)",
    )
    p.add_argument(
        "--type",
        dest="image_type",
        choices=("machine", "kernel", "ramdisk"),
        default="machine",
        help="image type (default: machine)",
    )
    p.add_argument("--kernel", metavar="EKI", help="kernel id for a machine image")
    p.add_argument("--ramdisk", metavar="ERI", help="ramdisk id for a machine image")
    p.add_argument(
        "--arch",
        default="x86_64",
        choices=("i386", "x86_64", "armhf", "aarch64"),
        help="architecture (default: x86_64)",
    )
    p.add_argument("--name", help="image name (default: unique, from the file name)")
    p.add_argument(
        "--raw",
        action="store_true",
        help="bundle a machine image as it is, even if it looks compressed",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log each step")
    # SUPPRESS, as --config: `registrar --debug install-image` is not reset here.
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log debugging detail and show tracebacks",
    )
    p.add_argument("file", metavar="FILE", type=Path, help="the image file")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    if args.command == "install-image":
        return _install_image(args)
    if hasattr(args, "owner_command"):
        return owner_cli.run(args)
    return service_cli.run(args)


def _error(message: str, code: int, debug: bool = False) -> int:
    if debug:
        log.exception("failed")
    print(f"registrar: error: {message}", file=sys.stderr)
    return code


def _install_image(args: argparse.Namespace) -> int:
    debug = getattr(args, "debug", False)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not debug:
        for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.image_type != "machine" and (args.kernel or args.ramdisk):
        return _error(
            f"--kernel and --ramdisk apply to machine images, not {args.image_type}", EXIT_USAGE
        )
    config_path = service_cli.config_path(getattr(args, "config", None))
    if config_path is None:
        return _error(service_cli.NO_CONFIG, EXIT_USAGE)
    # Imported here: `registrar --help` stays quick without boto3.
    from registrar.install import install_file

    try:
        size = args.file.stat().st_size
    except OSError as exc:
        return _error(f"cannot read {args.file}: {exc.strerror}", EXIT_USAGE)
    try:
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
    except (ConfigError, InputError, DecompressError) as exc:
        if isinstance(exc, ImageChecksumMismatch):
            return _error(str(exc), EXIT_FAILED, debug)
        return _error(str(exc), EXIT_USAGE, debug)
    except RegistrarError as exc:
        # A failed cleanup is noted on the error: say it on the same line.
        notes = "".join(f"; {note}" for note in getattr(exc, "__notes__", ()))
        return _error(f"{exc}{notes}", EXIT_FAILED, debug)
    except KeyboardInterrupt:
        return _error("interrupted; what was uploaded has been removed", 130)
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
