"""Bundle, upload and register images in one call: what `euca-install-image` does, in-process.

    installed = install_image(cloud, keys, stream, label="centos", image_type="machine",
                              arch="x86_64", expected_sha1=sha1, account_id=acct,
                              kernel_id="eki-…", ramdisk_id="eri-…", decompress=True)
    installed.image_id                       # "emi-…" on Eucalyptus ("ami-…" on moto)

    ids = install_set(cloud, keys, account_id=acct, arch="x86_64",
                      machine=ImageFile(path, sha1, decompress=True),
                      kernel=ImageFile(kpath, ksha1), ramdisk=ImageFile(rpath, rsha1))

Every bundle goes under a fresh folder `<unique prefix>/` of the bucket, so a re-registration
never meets an earlier one's objects. On any failure or interruption — a wrong SHA-1, a part
that does not upload, RegisterImage refused, the image not available in time — what was
registered is deregistered and every object uploaded is deleted, and the original error is
raised: nothing leaks into the bucket.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import BinaryIO

from registrar import names
from registrar.bundle import Progress, bundle_image
from registrar.cloud import Cloud
from registrar.config import Config
from registrar.errors import BundleError, CloudError
from registrar.manifest import BundleKeys, Manifest

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Installed:
    """A registered image: its id, the name it was registered under, where its bundle is."""

    image_id: str
    name: str
    location: str
    folder: str
    manifest: Manifest


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
    wait: bool = True,
) -> Installed:
    """Bundle `source`, upload it, register it and (if `wait`) wait until it is available.

    `name` (validated) defaults to the unique bundle prefix made from `label` and the SHA-1.
    `compression_level` defaults to the cloud config's. Raises BundleError, DecompressError,
    ImageChecksumMismatch or CloudError, after cleaning up.
    """
    level = cloud.cfg.compression_level if compression_level is None else compression_level
    folder = names.unique_name(label, expected_sha1)
    name = names.validate(name) if name else folder
    upload = cloud.start_upload(folder)
    image_id: str | None = None
    try:
        manifest = bundle_image(
            source,
            name=name,
            prefix=folder,
            image_type=image_type,
            arch=arch,
            expected_sha1=expected_sha1,
            keys=keys,
            account_id=account_id,
            part_sink=upload.put_part,
            kernel_id=kernel_id,
            ramdisk_id=ramdisk_id,
            decompress=decompress,
            compression_level=level,
            progress=progress,
        )
        location = upload.finish(manifest)
        image_id = cloud.register(
            location,
            name=name,
            arch=arch,
            kernel_id=kernel_id,
            ramdisk_id=ramdisk_id,
            description=description,
        )
        if wait:
            cloud.wait_available(image_id)
    except BaseException as exc:
        _clean_up(cloud, upload, image_id, exc)
        raise
    log.info("installed %s as %s (%s)", label, image_id, location)
    return Installed(image_id, name, location, folder, manifest)


def _clean_up(cloud: Cloud, upload: object, image_id: str | None, cause: BaseException) -> None:
    """Undo a failed install; a cleanup failure is logged and noted, never masks the cause."""
    log.info("install failed (%s): deregistering and deleting what was uploaded", cause)
    try:
        if image_id:
            cloud.deregister(image_id)
    except CloudError as exc:
        log.error("cleanup: %s", exc)
        cause.add_note(f"cleanup failed too: {exc}")
    try:
        upload.abort()  # type: ignore[attr-defined]
    except CloudError as exc:
        log.error("cleanup: %s", exc)
        cause.add_note(f"cleanup failed too: {exc}")


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
    done: dict[str, Installed] = {}
    for image_type, item in (("kernel", kernel), ("ramdisk", ramdisk)):
        if item is not None:
            done[image_type] = _install_file(
                cloud,
                keys,
                item,
                image_type=image_type,
                arch=arch,
                account_id=account_id,
                progress=progress,
            )
    done["machine"] = _install_file(
        cloud,
        keys,
        machine,
        image_type="machine",
        arch=arch,
        account_id=account_id,
        kernel_id=done["kernel"].image_id if "kernel" in done else None,
        ramdisk_id=done["ramdisk"].image_id if "ramdisk" in done else None,
        progress=progress,
    )
    return done


def _install_file(
    cloud: Cloud,
    keys: BundleKeys,
    item: ImageFile,
    *,
    image_type: str,
    arch: str,
    account_id: str,
    kernel_id: str | None = None,
    ramdisk_id: str | None = None,
    progress: Progress | None = None,
    name: str | None = None,
) -> Installed:
    try:
        stream = open(item.path, "rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise BundleError(f"cannot open {item.path}: {exc.strerror}") from exc
    with stream:
        return install_image(
            cloud,
            keys,
            stream,
            label=item.label or item.path.name,
            image_type=image_type,
            arch=arch,
            expected_sha1=item.sha1,
            account_id=account_id,
            kernel_id=kernel_id,
            ramdisk_id=ramdisk_id,
            name=name,
            decompress=item.decompress,
            progress=progress,
        )


def install_file(
    config: Config,
    path: Path,
    *,
    image_type: str = "machine",
    arch: str = "x86_64",
    kernel_id: str | None = None,
    ramdisk_id: str | None = None,
    name: str | None = None,
    decompress: bool | None = None,
    progress: Progress | None = None,
) -> Installed:
    """`registrar install-image`: install one local file with the config's cloud and keys.

    `decompress` defaults to True for machine images and False for kernels and ramdisks.
    """
    if decompress is None:
        decompress = image_type == "machine"
    cfg = config.require_cloud()
    keys = BundleKeys.load(cfg.cloud_cert, cfg.user_cert, cfg.user_key)
    cloud = Cloud.from_config(config)
    return _install_file(
        cloud,
        keys,
        ImageFile(path, decompress=decompress),
        image_type=image_type,
        arch=arch,
        account_id=cfg.account_id,
        kernel_id=kernel_id,
        ramdisk_id=ramdisk_id,
        progress=progress,
        name=name,
    )
