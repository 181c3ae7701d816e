"""Register local image files in one call: what `euca-install-image` does, in-process.

    installed = install_image(cloud, keys, stream, label="centos", image_type="machine",
                              arch="x86_64", expected_sha1=sha1, account_id=acct,
                              kernel_id="eki-…", ramdisk_id="eri-…", decompress=True)
    installed.image_id                       # "emi-…" on Eucalyptus ("ami-…" on moto)

    ids = install_set(cloud, keys, account_id=acct, arch="x86_64",
                      machine=ImageFile(path, sha1, decompress=True),
                      kernel=ImageFile(kpath, ksha1), ramdisk=ImageFile(rpath, rsha1))

    installed = install_file(config, path, image_type="kernel")    # any [cloud] type

All of them run the one registration pipeline (`registrar.pipeline`) that the SOAP service
runs. Every image goes to a fresh placement (a bundle folder, an image name), so a
re-registration never meets an earlier one's objects. On any failure or interruption — a
wrong SHA-1, a part that does not upload, a registration refused, the image not usable in
time — what was registered is deleted and the original error is raised: nothing leaks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from registrar import names
from registrar.bundle import Progress
from registrar.clouds import KERNEL, MACHINE, RAMDISK, Backend, PartRequest
from registrar.clouds.euca_api import Cloud
from registrar.clouds.eucalyptus import Eucalyptus
from registrar.clouds.select import backend_for
from registrar.config import Config
from registrar.errors import BundleError
from registrar.manifest import BundleKeys
from registrar.pipeline import register_part

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Installed:
    """A registered image: its id, the name it was registered under, where it is stored."""

    image_id: str
    name: str
    location: str  # Eucalyptus: "bucket/folder/x.manifest.xml"; OpenStack: the image service
    folder: str


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """One local (or mounted) file to install; `sha1` None skips the check."""

    path: Path
    sha1: str | None = None
    label: str | None = None
    decompress: bool = False


def install_image(
    cloud: Cloud,
    keys: BundleKeys,
    source: BinaryIO,
    *,
    label: str,
    image_type: str,
    arch: str,
    expected_sha1: str | None,
    account_id: str,
    kernel_id: str | None = None,
    ramdisk_id: str | None = None,
    name: str | None = None,
    decompress: bool = False,
    description: str | None = None,
    compression_level: int | None = None,
    progress: Progress | None = None,
) -> Installed:
    """Bundle `source` for Eucalyptus, upload it, register it and wait until it is available.

    `name` (validated) defaults to the unique bundle prefix made from `label` and the SHA-1.
    `compression_level` defaults to the cloud config's. Raises BundleError, DecompressError,
    ImageChecksumMismatch or CloudError, after cleaning up.
    """
    backend = Eucalyptus(cloud, keys, account_id, arch, compression_level)
    request = PartRequest(
        kind=image_type,
        label=label,
        sha1=expected_sha1,
        kernel_id=kernel_id or "",
        ramdisk_id=ramdisk_id or "",
        decompress=decompress,
        name=names.validate(name) if name else None,
        description=description,
    )
    return _install(backend, request, source, progress)


def _install(
    backend: Backend, request: PartRequest, source: BinaryIO, progress: Progress | None
) -> Installed:
    @contextlib.contextmanager
    def open_source() -> Iterator[tuple[BinaryIO, int]]:
        yield source, _size(source)

    done, placement = register_part(backend, request, open_source, progress=progress)
    log.info("installed %s as %s (%s)", request.label, done.image_id, done.location)
    return Installed(
        done.image_id, done.name, done.location or placement.location, placement.folder
    )


def _size(source: BinaryIO) -> int:
    try:
        return os.fstat(source.fileno()).st_size
    except (OSError, ValueError, AttributeError):
        return 0


def install_set(
    cloud: Cloud,
    keys: BundleKeys,
    *,
    account_id: str,
    arch: str,
    machine: ImageFile,
    kernel: ImageFile | None = None,
    ramdisk: ImageFile | None = None,
    progress: Progress | None = None,
) -> dict[str, Installed]:
    """Install a kernel and ramdisk (when given) first, then the machine image naming them.

    Returns {"kernel": …, "ramdisk": …, "machine": …} for the images installed. If a later
    image fails, the earlier ones stay registered (they are complete and reusable).
    """
    backend = Eucalyptus(cloud, keys, account_id, arch)
    done: dict[str, Installed] = {}
    for kind, item in ((KERNEL, kernel), (RAMDISK, ramdisk)):
        if item is not None:
            done[kind] = _install_file(backend, item, kind, progress=progress)
    done[MACHINE] = _install_file(
        backend,
        machine,
        MACHINE,
        kernel_id=done[KERNEL].image_id if KERNEL in done else "",
        ramdisk_id=done[RAMDISK].image_id if RAMDISK in done else "",
        progress=progress,
    )
    return done


def _install_file(
    backend: Backend,
    item: ImageFile,
    kind: str,
    *,
    kernel_id: str = "",
    ramdisk_id: str = "",
    progress: Progress | None = None,
    name: str | None = None,
) -> Installed:
    try:
        stream = open(item.path, "rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise BundleError(f"cannot open {item.path}: {exc.strerror}") from exc
    request = PartRequest(
        kind=kind,
        label=item.label or item.path.name,
        sha1=item.sha1,
        kernel_id=kernel_id,
        ramdisk_id=ramdisk_id,
        decompress=item.decompress,
        name=names.validate(name) if name else None,
    )
    with stream:
        return _install(backend, request, stream, progress)


def install_file(
    config: Config,
    path: Path,
    *,
    image_type: str = MACHINE,
    arch: str = "x86_64",
    kernel_id: str | None = None,
    ramdisk_id: str | None = None,
    name: str | None = None,
    decompress: bool | None = None,
    progress: Progress | None = None,
) -> Installed:
    """`registrar install-image`: install one local file with the config's cloud.

    `decompress` defaults to True for machine images and False for the others.
    """
    if decompress is None:
        decompress = image_type == MACHINE
    return _install_file(
        backend_for(config, arch),
        ImageFile(path, decompress=decompress),
        image_type,
        kernel_id=kernel_id or "",
        ramdisk_id=ramdisk_id or "",
        progress=progress,
        name=name,
    )
