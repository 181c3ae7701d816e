"""The clouds a registrar registers images with, behind one small interface.

Two implementations: `eucalyptus.Eucalyptus` (bundles to S3, then EC2 RegisterImage, through
boto3 in `euca_api`) and `openstack.OpenStack` (Glance, through openstacksdk). Only those
modules import a cloud SDK. `registrar.pipeline` drives a backend the same way for the SOAP
service and for `install-image`:

    placement = backend.plan(request, reusable)     # where the image's objects will go
    # ... the caller records the placement (so a crash can be cleaned up), then:
    done = backend.register(open_source, request, placement, on_start=..., on_id=..., slot=...)
    backend.undo(placement, image_id)               # after a failure, or for an abandoned job
    backend.states(ids)                             # which images still exist, and how
    backend.discard(placement, shared=...)          # leftovers of an image the cloud lost

A placement names everything a job may create, before it creates anything: the bundle folder
(Eucalyptus) or the image name (OpenStack). Both are unique, so `undo` can find an image whose
id never reached us by that name.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import BinaryIO, Protocol

# Image kinds. A filesystem (FILESYSTEM, ZFILESYSTEM) is a machine image.
MACHINE, KERNEL, RAMDISK, QCOW2 = "machine", "kernel", "ramdisk", "qcow2"
KIND_OF_TYPE = {
    "FILESYSTEM": MACHINE,
    "ZFILESYSTEM": MACHINE,
    "KERNEL": KERNEL,
    "RAMDISK": RAMDISK,
    "QCOW2": QCOW2,
}
GONE_STATES = frozenset({"deregistered", "failed", "error", "deleted", "killed", "gone"})

# What `open_source()` yields: a readable stream of the image as published, and its size.
OpenSource = Callable[[], contextlib.AbstractContextManager[tuple[BinaryIO, int]]]
Progress = Callable[[int], None]  # bytes of the source read so far, as a delta


@dataclasses.dataclass(frozen=True)
class PartRequest:
    """One image to register, whatever the cloud."""

    kind: str  # MACHINE, KERNEL, RAMDISK or QCOW2
    label: str  # readable base of the unique name
    sha1: str | None  # SHA-1 of the source as read; None: not checked (a local file)
    kernel_id: str = ""
    ramdisk_id: str = ""
    decompress: bool = False  # a filesystem that may come compressed, or in a tar
    name: str | None = None  # the image's name; default: unique, from label and sha1
    source_url: str = ""  # where the part came from (recorded with the image where possible)
    metadata_sha1: str = ""  # the metadata file that named it
    description: str | None = None


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a job's objects go, known before any is made; recorded with the job.

    `location` is the registry's `bucket` column: the bucket, or the image service.
    `folder` is the bundle prefix, or the image name: unique, so findable after a crash.
    `manifest`: only a manifest added beside another image's bundle parts (Eucalyptus).
    """

    location: str
    folder: str
    manifest: str | None = None


@dataclasses.dataclass(frozen=True)
class Registered:
    """A registered image and what it cost: bytes read from the source, bytes stored."""

    image_id: str
    name: str
    source_bytes: int = 0
    stored_bytes: int = 0
    location: str = ""  # Eucalyptus: the manifest's ImageLocation


class Backend(Protocol):
    """A cloud the pipeline registers with. Every failure is a registrar error, with its step."""

    location: str
    kinds: frozenset[str]

    def plan(self, request: PartRequest, reusable: Sequence[Placement] = ()) -> Placement:
        """Where `request` will go; `reusable`: placements of the same image already made."""
        ...

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
        """Store and register the image, and wait until it is usable.

        Calls `on_start` just before its first write to the cloud (nothing to undo before it),
        `on_sending` once the cloud has begun to take the image's bytes (a cloud that takes
        one upload at a time has taken this one), and `on_id` as soon as the cloud has given
        the image an id. Holds `slot` while it streams (the CPU- and memory-heavy part), not
        while it waits.
        """
        ...

    def undo(self, placement: Placement, image_id: str | None) -> None:
        """Delete everything a job with this placement may have made, found by name too."""
        ...

    def states(self, image_ids: Sequence[str]) -> dict[str, str]:
        """The state of each image that exists; ids the cloud does not know are left out."""
        ...

    def discard(self, placement: Placement, *, shared: bool) -> None:
        """Delete what is left of an image the cloud no longer has.

        `shared`: other registered images use the same placement's folder; keep it.
        """
        ...
