"""Eucalyptus: bundle (tar | gzip | AES-128-CBC | 10 MiB parts + manifest) to S3, register
through EC2, wait until `available`.

    backend = Eucalyptus(cloud, keys, account_id)      # cloud: euca_api.Cloud
    backend = Eucalyptus.from_config(config)

Each new bundle goes under a fresh folder of the bucket, named like the image. A machine image
whose filesystem is already bundled (for another kernel/ramdisk combination) is registered
from a new manifest beside those parts, naming the new kernel and ramdisk: a combination costs
a manifest and a registration, not a bundle. Such a placement has `manifest` set, and its undo
removes that manifest and image only, never the shared parts.

QCOW2 images cannot be bundled for Eucalyptus: `kinds` leaves them out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence

from lxml import etree

from registrar import names
from registrar.bundle import bundle_image
from registrar.clouds import (
    KERNEL,
    MACHINE,
    RAMDISK,
    OpenSource,
    PartRequest,
    Placement,
    Progress,
    Registered,
)
from registrar.clouds.euca_api import BundleUpload, Cloud
from registrar.config import CloudConfig, Config
from registrar.errors import CloudError, ConfigError
from registrar.manifest import BundleKeys, manifest_filename, rebind_manifest

log = logging.getLogger(__name__)

DEFAULT_ARCH = "x86_64"
MANIFEST_SUFFIX = ".manifest.xml"


@dataclasses.dataclass
class Eucalyptus:
    """The Eucalyptus backend: one bucket, one account, the bundle keys."""

    cloud: Cloud
    keys: BundleKeys
    account_id: str
    arch: str = DEFAULT_ARCH
    compression_level: int | None = None  # None: the cloud config's
    kinds: frozenset[str] = frozenset({MACHINE, KERNEL, RAMDISK})
    # Manifests `plan` downloaded for placements beside them, until `register` uses them.
    _sources: dict[str, bytes] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, config: Config, arch: str = DEFAULT_ARCH) -> Eucalyptus:
        cfg = config.require_cloud()
        if not isinstance(cfg, CloudConfig):
            raise ConfigError("[cloud] type is not eucalyptus")
        keys = BundleKeys.load(cfg.cloud_cert, cfg.user_cert, cfg.user_key)
        return cls(Cloud.from_config(config), keys, cfg.account_id, arch, cfg.compression_level)

    @property
    def location(self) -> str:
        return self.cloud.bucket

    # --- where it goes ---

    def plan(self, request: PartRequest, reusable: Sequence[Placement] = ()) -> Placement:
        """A fresh folder, or for a machine image a new manifest beside bundled parts."""
        if request.kind == MACHINE:
            for shared in reusable:
                if shared.location == self.cloud.bucket and shared.folder:
                    placement = self._beside(request, shared)
                    if placement is not None:
                        return placement
        return Placement(self.cloud.bucket, names.unique_name(request.label, request.sha1))

    def _beside(self, request: PartRequest, shared: Placement) -> Placement | None:
        """A placement for a new manifest beside `shared`'s parts, if they are all there."""
        source = self._manifest_key(shared)
        try:
            xml = self.cloud.get_object(source, step="manifest download")
            present = set(self.cloud.list_keys(shared.folder))
            listed = _part_files(xml)
        except (CloudError, etree.XMLSyntaxError) as exc:
            log.warning("cannot reuse the bundle in %s (%s); bundling anew", shared.folder, exc)
            return None
        if not listed or not all(f"{shared.folder}/{p}" in present for p in listed):
            log.warning("parts of the bundle in %s are missing; bundling anew", shared.folder)
            return None
        name = request.name or names.unique_name(request.label, request.sha1)
        placement = Placement(
            self.cloud.bucket, shared.folder, f"{shared.folder}/{manifest_filename(name)}"
        )
        assert placement.manifest is not None
        self._sources[placement.manifest] = xml
        return placement

    @staticmethod
    def _manifest_key(placement: Placement) -> str:
        return placement.manifest or f"{placement.folder}/{manifest_filename(placement.folder)}"

    # --- register ---

    def register(
        self,
        open_source: OpenSource,
        request: PartRequest,
        placement: Placement,
        *,
        on_start: Callable[[], None],
        on_id: Callable[[str], None],
        slot: contextlib.AbstractContextManager[object],
        progress: Progress | None = None,
        on_sending: Callable[[], None] | None = None,
    ) -> Registered:
        """Bundle, upload, register and wait; or, for a shared placement, add a manifest."""
        if placement.manifest is not None:
            on_start()
            return self._register_beside(request, placement, on_id)
        name = names.validate(request.name) if request.name else placement.folder
        upload = self.cloud.start_upload(placement.folder)  # checks (or creates) the bucket
        on_start()
        if on_sending is not None:  # S3 takes many uploads at once: nothing to wait for
            on_sending()
        try:
            # The slot bounds the CPU and memory of bundling; waiting for "available" holds none.
            with slot, open_source() as (source, _size):
                manifest = bundle_image(
                    source,
                    name=name,
                    prefix=placement.folder,
                    image_type=request.kind,
                    arch=self.arch,
                    expected_sha1=request.sha1,
                    keys=self.keys,
                    account_id=self.account_id,
                    part_sink=upload.put_part,
                    kernel_id=request.kernel_id or None,
                    ramdisk_id=request.ramdisk_id or None,
                    decompress=request.decompress,
                    compression_level=self._level(),
                    progress=progress,
                )
            location = upload.finish(manifest)
        except BaseException:
            _abort(upload)
            raise
        image_id = self._register_and_wait(location, name, request, on_id)
        stored = manifest.bundled_size + len(manifest.xml)
        return Registered(image_id, name, manifest.size, stored, location)

    def _level(self) -> int:
        if self.compression_level is not None:
            return self.compression_level
        return self.cloud.cfg.compression_level

    def _register_beside(
        self, request: PartRequest, placement: Placement, on_id: Callable[[str], None]
    ) -> Registered:
        assert placement.manifest is not None
        name = placement.manifest.rsplit("/", 1)[-1].removesuffix(MANIFEST_SUFFIX)
        # The manifest `plan` read, or (if planned elsewhere) any other beside the same parts:
        # all list the same parts and the same key.
        xml = self._sources.pop(placement.manifest, None) or self._any_manifest(placement)
        manifest = rebind_manifest(
            xml,
            name=name,
            keys=self.keys,
            kernel_id=request.kernel_id or None,
            ramdisk_id=request.ramdisk_id or None,
        )
        self.cloud.put_object(placement.manifest, manifest, step="manifest upload")
        location = f"{self.cloud.bucket}/{placement.manifest}"
        image_id = self._register_and_wait(location, name, request, on_id)
        log.info("registered %s from the bundle in %s", image_id, placement.folder)
        return Registered(image_id, name, 0, len(manifest), location)

    def _any_manifest(self, placement: Placement) -> bytes:
        for key in self.cloud.list_keys(placement.folder):
            if key.endswith(MANIFEST_SUFFIX) and key != placement.manifest:
                return self.cloud.get_object(key, step="manifest download")
        raise CloudError("manifest download", f"no manifest left in {placement.folder}")

    def _register_and_wait(
        self, location: str, name: str, request: PartRequest, on_id: Callable[[str], None]
    ) -> str:
        image_id = self.cloud.register(
            location,
            name=name,
            arch=self.arch,
            kernel_id=request.kernel_id or None,
            ramdisk_id=request.ramdisk_id or None,
            description=request.description,
        )
        on_id(image_id)
        self.cloud.wait_available(image_id)
        return image_id

    # --- cleanup and state ---

    def undo(self, placement: Placement, image_id: str | None) -> None:
        """Deregister the image (by name too) and delete the folder, or just the added manifest.

        By name as well as by id: a RegisterImage answer lost to a reset or a timeout, or a
        registrar killed before it saved the id, leaves an image only its name can find.
        """
        if placement.location != self.cloud.bucket:
            log.warning(
                "%s/%s is in another bucket; left alone", placement.location, placement.folder
            )
            if image_id:
                self.cloud.deregister(image_id)
            return
        if placement.manifest is not None:
            name = placement.manifest.rsplit("/", 1)[-1].removesuffix(MANIFEST_SUFFIX)
            self.cloud.cleanup_manifest(placement.manifest, name, image_id)
        else:
            self.cloud.cleanup(placement.folder, image_id, by_name=image_id is None)

    def states(self, image_ids: Sequence[str]) -> dict[str, str]:
        return {i: s.state for i, s in self.cloud.describe(image_ids).items()}

    def discard(self, placement: Placement, *, shared: bool) -> None:
        if placement.location != self.cloud.bucket or not placement.folder:
            return
        if not shared:
            self.cloud.cleanup(placement.folder)
        elif placement.manifest:
            self.cloud.delete_keys([placement.manifest])


def _part_files(manifest: bytes) -> list[str]:
    """The part file names a manifest lists."""
    root = etree.fromstring(manifest, etree.XMLParser(resolve_entities=False, no_network=True))
    return [p.findtext("filename") or "" for p in root.iterfind("image/parts/part")]


def _abort(upload: BundleUpload) -> None:
    """Stop an upload and delete what it put, without masking the error being raised."""
    with contextlib.suppress(CloudError):
        upload.abort()
