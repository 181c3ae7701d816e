"""The `registrar` command line: one parser for every subcommand, one table for every error.

    registrar [--config FILE] [--debug] COMMAND …

- `serve`, `register URL SIGNATURE`, `list`, `import-registry PATH`: the service
  (registrar/commands/service.py; the daemon's wiring is registrar/daemon.py).
- `install-image [--type machine|kernel|ramdisk] [--kernel EKI] [--ramdisk ERI] [--arch ARCH]
  [--name NAME] [--raw] FILE`: bundle, upload and register one local image file (what
  `euca-install-image` does) and print the new image id; the quickest test of `[cloud]`. A
  compressed machine image (gzip, bzip2, xz/lzma, compress, or a tarball holding
  `filesystem`) is unpacked first, detected by its magic bytes; `--raw` bundles it as it is.
  Kernels and ramdisks are always bundled byte for byte (a ramdisk is usually gzipped on
  purpose). Handler: registrar/commands/install.py.
- `publish …`, `check URL SIGNATURE`: for image owners; no config, mount or cloud
  (registrar/commands/owner.py).

The config file is `--config`, else `$IMAGEPROXY_CONFIG`, else /etc/imageproxy/imageproxy.toml.

`main` parses, sets up logging as the command's `Style` says, and runs the command's handler,
which returns the exit code or raises. `ERRORS` turns what it raises into one line on stderr
(with the traceback before it under `--debug`) and an exit code; any other exception is a bug
and crashes with its traceback.

Exit codes: 0 success; 1 the work failed (a registration, bundle or upload: nothing is left
behind in the cloud; `check`: a site would refuse the image; `publish`: the registrar would
refuse the files, nothing is written); 2 bad usage, config, credentials or input; 130
interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgstore.errors import ConfigError as StoreConfigError
from imgstore.errors import StoreError
from registrar.commands import install, owner, service
from registrar.errors import (
    ConfigError,
    DecompressError,
    InputError,
    PublishError,
    RegistrarError,
    RequestError,
    SignatureMismatch,
)

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _notes(exc: BaseException) -> str:
    """The message, and on the same line what was noted on it (a cleanup that failed too:
    registrar/pipeline.py)."""
    return str(exc) + "".join(f"; {note}" for note in getattr(exc, "__notes__", ()))


def _os_error(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


# What a command raises → (exit code, its message). The first row that matches wins, so a
# subclass comes before its base.
ERRORS: tuple[tuple[type[BaseException], int, Callable[[Any], str]], ...] = (
    # Bytes that fail their SHA-1 (the download's, or install-image's own file read back) are
    # a failure of the work, not of the caller's input.
    (SignatureMismatch, EXIT_FAILED, str),
    # `publish`: the registrar would refuse these files.
    (PublishError, EXIT_FAILED, str),
    (InputError, EXIT_USAGE, str),
    (RequestError, EXIT_USAGE, str),
    (ConfigError, EXIT_USAGE, str),
    # install-image's own file: corrupt or truncated compressed data is the input's fault.
    (DecompressError, EXIT_USAGE, str),
    (StoreConfigError, EXIT_USAGE, str),
    (StoreError, EXIT_FAILED, str),
    (RegistrarError, EXIT_FAILED, _notes),
    # A file named on the command line that cannot be read or written.
    (OSError, EXIT_USAGE, _os_error),
)


@dataclasses.dataclass(frozen=True)
class Style:
    """How a family of commands logs and words its error line."""

    error: str  # the error line; {command} and {message} are filled in
    log_format: str  # {command} is filled in
    log_level: int  # without --debug (or install-image's -v)
    interrupted: str | None = None  # the message on Ctrl-C; None: exit 130 in silence


# The service logs a line per step, as the daemon does, so a run reads like its journal.
SERVICE = Style(
    "registrar {command}: {message}",
    "%(asctime)s registrar[%(process)d] %(levelname)s %(name)s: %(message)s",
    logging.INFO,
)
# install-image keeps euca-install-image's quiet output and its "error:" line.
INSTALL = Style(
    "registrar: error: {message}",
    "%(asctime)s %(levelname)s %(name)s: %(message)s",
    logging.WARNING,
    # The pipeline deletes what was uploaded before the interrupt reaches us.
    interrupted="interrupted; what was uploaded has been removed",
)
# The owners' commands print tables; only warnings go between them.
OWNER = Style(
    "registrar {command}: {message}",
    "registrar {command}: %(levelname)s: %(message)s",
    logging.WARNING,
)
# Chatty below WARNING; their detail shows with --debug.
NOISY_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer", "httpx", "httpcore")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run the parsed command's handler; what it raises becomes a line and an exit code."""
    style: Style = args.style
    debug: bool = args.debug
    _set_up_logging(style, args.command, debug, getattr(args, "verbose", False))
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        if style.interrupted:
            _say(style, args.command, style.interrupted)
        return EXIT_INTERRUPTED
    except Exception as exc:
        for kind, code, message in ERRORS:
            if isinstance(exc, kind):
                if debug:
                    log.exception("failed")
                _say(style, args.command, message(exc))
                return code
        raise


def _say(style: Style, command: str, message: str) -> None:
    print(style.error.format(command=command, message=message), file=sys.stderr)


def _set_up_logging(style: Style, command: str, debug: bool, verbose: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else style.log_level
    logging.basicConfig(
        level=level, format=style.log_format.replace("{command}", command), stream=sys.stderr
    )
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)


# --- the parser ---

DEBUG_HELP = "log debugging detail and show tracebacks"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registrar",
        description="Answers ORCA RegisterImage calls: bundles, uploads and registers images.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML config file")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_service_commands(sub)
    _add_install_image(sub)
    _add_publish(sub)
    _add_check(sub)
    return parser


# A subcommand's --config and --debug default to SUPPRESS: one given before the subcommand is
# not reset by the subparser's default.


def _config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="TOML config file (default: $IMAGEPROXY_CONFIG, else /etc/imageproxy/imageproxy.toml)",
    )


def _debug_option(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=text)


def _add_service_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the SOAP service",
        description="Serve ORCA's RegisterImage SOAP calls on [registrar] listen, one log line "
        "per request. Cleans up what a previous run left half done before listening.",
    )
    _config_option(p)
    _debug_option(p, DEBUG_HELP)
    p.set_defaults(handler=service.serve, style=SERVICE)

    p = sub.add_parser(
        "register",
        help="register one image from its metadata URL and SHA-1",
        description="Do what one SOAP RegisterImage call does and print the same answer "
        "(FILESYSTEM=…, KERNEL=…, RAMDISK=… in java.util.Properties format).",
    )
    _config_option(p)
    _debug_option(p, DEBUG_HELP)
    p.add_argument("url", metavar="URL", help="the metadata file's URL")
    p.add_argument("signature", metavar="SIGNATURE", help="the metadata file's SHA-1")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")
    p.set_defaults(handler=service.register, style=SERVICE)

    p = sub.add_parser(
        "list",
        help="show the registry",
        description="Show what is registered: answers per metadata SHA-1, the images behind "
        "them, and registrations in flight.",
    )
    _config_option(p)
    _debug_option(p, DEBUG_HELP)
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        type=Path,
        help="registry directory (default: [registrar] state_dir)",
    )
    p.set_defaults(handler=service.list_registry, style=SERVICE)

    p = sub.add_parser(
        "import-registry",
        help="take over the images the original ImageProxy registered",
        description="Read the original ImageProxy's registry (imageproxy.db, table IMAGE) and "
        "record every image id the cloud still has, so RegisterImage answers with it instead "
        "of registering the part again. Unfinished registrations and ids the cloud no longer "
        "has are skipped. Running it twice changes nothing.",
    )
    _config_option(p)
    _debug_option(p, DEBUG_HELP)
    p.add_argument("path", metavar="PATH", type=Path, help="the original's imageproxy.db")
    p.set_defaults(handler=service.import_registry, style=SERVICE)


def _add_install_image(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "install-image",
        help="bundle, upload and register a local image file",
        description="Bundle, upload and register a local image file; print the new image id.",
        epilog="Exit codes: 0 success, 1 bundling/upload/registration failed, "
        "2 bad usage, config or input file.",
    )
    _config_option(p)
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
    _debug_option(p, DEBUG_HELP)
    p.add_argument("file", metavar="FILE", type=Path, help="the image file")
    p.set_defaults(handler=install.install_image, style=INSTALL)


def _add_publish(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
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
    _debug_option(p, "tracebacks")
    p.add_argument("image", metavar="IMAGE", nargs="?", type=Path, help="the filesystem image")
    p.set_defaults(handler=owner.publish, style=OWNER)


def _add_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
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
    _debug_option(p, "tracebacks")
    p.set_defaults(handler=owner.check, style=OWNER)
