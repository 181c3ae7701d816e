"""RegisterImage end to end: metadata → imgstore → the cloud's backend → ids.

    service = Service.from_config(config, cache_dir, mountpoint)  # + the store's paths
    service.recover()                              # clean up what a dead registrar left
    answer = service.register(url, signature)      # blocks; call from a worker thread
    text = service.answer_text(url, signature)     # the same, as ORCA's Properties text

The steps of one call:

1. Check the URL and signature (metadata.check_url / check_signature).
2. If the registry has an answer for the metadata SHA-1 and one DescribeImages shows its ids
   still exist, answer it: nothing is fetched, bundled or uploaded.
3. Add the metadata to imgstore by its signature (URLs from SOAP are untrusted) and read it from
   the mount — a complete read succeeds only on verified bytes — then parse it. A QCOW2 needs
   a backend that takes QCOW2 (OpenStack): on Eucalyptus, beside a filesystem it is skipped
   with a log line; alone it is an UnsupportedImage error.
4. For the kernel and the ramdisk (in parallel), then the machine image (which names their
   ids) and the QCOW2, which starts once the cloud takes the machine image's bytes (a Glance
   serving one upload at a time then takes the filesystem as it downloads): if the registry
   has the part's image and the cloud still has it,
   reuse it; otherwise claim the part's key and run the registration pipeline
   (`registrar.pipeline`, at most `max_bundles` streaming at once) with the cloud's backend:
   the part is added to imgstore (part URLs are never trusted), pinned, and streamed from the
   mount into the cloud, registered, waited for, and recorded. A part the original ImageProxy
   registered (`registrar import-registry`) is answered with its id if the cloud still has it.
   On Eucalyptus, a machine image whose filesystem is already bundled for another
   kernel/ramdisk combination costs only a new manifest beside the existing parts.
5. Save and return the answer.

Single flight. Within this process, one thread does the work for a metadata SHA-1 and one for
a part key; concurrent callers wait for it and share its result or its error (`registrar.flights`).
Across processes (the server and a `registrar register`), the registry's job claims serialize a
part key; a process that finds a live claim polls until it is released.

Nothing leaks. A job records its placement (bundle folder, or image name) before uploading and
its image id as soon as it has one. On failure the backend deletes what the job made before
the claim is dropped; if that cleanup itself fails the job is marked abandoned, so the next
claim (or `recover()` at the next start) cleans it up again. A registrar killed mid-job leaves
a job whose owner is dead; `recover()` and any later claim of that key clean it up the same way.

A registrar killed between the cloud accepting RegisterImage and the registry recording the id
leaves an image whose id nobody saved: the job recorded its name first, so the cleanup finds it
by name and deletes it.

Lock order: a metadata flight may wait on part flights, never the other way round; no lock is
held while waiting on a flight or on the cloud.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imgstore import client as imgstore
from registrar import names
from registrar.blobs import Blobs
from registrar.clouds import (
    GONE_STATES,
    KERNEL,
    MACHINE,
    QCOW2,
    RAMDISK,
    Backend,
    PartRequest,
    Placement,
)
from registrar.clouds.select import backend_for
from registrar.config import Config
from registrar.errors import (
    BundleError,
    CloudError,
    FetchError,
    InputError,
    RegistrationFailed,
    UnsupportedImage,
)
from registrar.flights import Flights, in_parallel, one_then_other
from registrar.metadata import ImageSet, Part, check_signature, check_url
from registrar.metrics import RegistrarMetrics
from registrar.owners import dead_processes, owner_process, process_prefix
from registrar.pipeline import JobHooks, no_hook, register_part
from registrar.properties import answer_text
from registrar.registry import Answer, Claimed, Image, Job, Registry, image_key

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (what, bytes done, bytes total)

DEFAULT_ARCH = "x86_64"


@dataclass(frozen=True)
class Settings:
    """Where the store is, and how long to wait for another process's registration."""

    cache_dir: Path
    mountpoint: Path
    state_dir: Path
    allowed_networks: tuple[str, ...] = ()  # CIDRs untrusted URLs may reach despite the rules
    http_proxy: str = ""  # the store's [store] http_proxy: the probe goes where the chunks go
    arch: str = DEFAULT_ARCH
    max_bundles: int = 2  # images bundled at once; each takes a few cores and up to ~80 MiB
    claim_wait: float = 4 * 3600.0  # longer than any registration ORCA would still wait for
    claim_poll: float = 0.5


class Service:
    """Does RegisterImage calls; thread-safe, one instance per process."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        registry: Registry | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.registry = registry or Registry(settings.state_dir)
        self._flights = Flights()
        self._blobs = Blobs(settings)
        self.metrics = RegistrarMetrics()
        self._bundle_slots = threading.BoundedSemaphore(settings.max_bundles)
        self._jobs = 0
        self._jobs_lock = threading.Lock()
        self._owner_prefix = process_prefix()

    @classmethod
    def from_config(
        cls, config: Config, cache_dir: Path, mountpoint: Path, http_proxy: str = ""
    ) -> Service:
        """The service for a loaded registrar config and the store's settings it needs."""
        settings = Settings(
            cache_dir=cache_dir,
            mountpoint=mountpoint,
            state_dir=config.registrar.state_dir,
            allowed_networks=tuple(str(net) for net in config.registrar.allowed_networks),
            http_proxy=http_proxy,
        )
        return cls(settings, backend_for(config, arch=settings.arch))

    def close(self) -> None:
        self.registry.close()

    # --- the call ---

    def answer_text(self, url: str, signature: str) -> str:
        """RegisterImage for the SOAP server: the answer as Properties text."""
        answer = self.register(url, signature)
        return answer_text(answer.filesystem, answer.kernel, answer.ramdisk, answer.qcow2)

    def register(
        self,
        url: str,
        signature: str,
        *,
        trusted: bool = False,
        progress: Progress | None = None,
    ) -> Answer:
        """Register the image set described at `url` (whose SHA-1 is `signature`).

        `trusted` marks a metadata URL typed by the operator (`registrar register`) rather
        than received over SOAP; the part URLs inside the metadata are never trusted. Raises a
        RegistrarError subclass saying what failed and why.
        """
        url = check_url(url, "metadata URL")
        sha1 = check_signature(signature, "metadata signature")
        return self._flights.run(
            ("metadata", sha1), lambda: self._register(url, sha1, trusted, progress)
        )

    def _register(self, url: str, sha1: str, trusted: bool, progress: Progress | None) -> Answer:
        known = self.registry.answer(sha1)
        if known is not None:
            if self._alive(known.ids()):
                log.info("metadata %s: answered from the registry", sha1)
                self.metrics.registry_hit()
                return known
            log.warning("metadata %s: a registered image is gone from the cloud; redoing", sha1)
        images = self._blobs.read_metadata(url, sha1, trusted)
        filesystem, qcow2 = self._supported(images, url)

        def part(p: Part | None, kind: str, kernel_id: str = "", ramdisk_id: str = "",
                 on_sending: Callable[[], None] = no_hook) -> str:  # fmt: skip
            return self._part(p, kind, kernel_id, ramdisk_id, sha1, progress, on_sending)

        # Kernel and ramdisk in parallel (each waits until usable), then the machine image,
        # which names both, beside the QCOW2. All run to the end even if one fails: a
        # registered part is kept for the next call.
        kernel_id, ramdisk_id = in_parallel(
            lambda: part(images.kernel, KERNEL), lambda: part(images.ramdisk, RAMDISK)
        )
        # The QCOW2 starts once the cloud takes the machine image's bytes: a Glance that takes
        # one upload at a time then streams the (compressed, smaller) filesystem as its
        # download begins, instead of waiting on the QCOW2's (1 GiB: 12.5 s to ids, not 14).
        machine_id, qcow2_id = one_then_other(
            lambda go: part(filesystem, MACHINE, kernel_id, ramdisk_id, on_sending=go),
            lambda: part(qcow2, QCOW2),
        )
        answer = Answer(sha1, url, machine_id, kernel_id, ramdisk_id, qcow2=qcow2_id)
        self.registry.save_answer(answer)
        ids = f"FILESYSTEM={machine_id} KERNEL={kernel_id} RAMDISK={ramdisk_id} QCOW2={qcow2_id}"
        log.info("metadata %s: %s", sha1, ids)
        return answer

    def _supported(self, images: ImageSet, url: str) -> tuple[Part | None, Part | None]:
        """The filesystem and QCOW2 to register; a QCOW2 cannot be bundled for Eucalyptus."""
        if images.qcow2 is None or QCOW2 in self.backend.kinds:
            return images.filesystem, images.qcow2
        if images.filesystem is None:
            raise UnsupportedImage(
                f"metadata at {url} lists only a QCOW2 image; QCOW2 images need an OpenStack "
                "cloud, and this site registers images with Eucalyptus"
            )
        log.warning(
            "metadata at %s: QCOW2 image %s skipped: Eucalyptus cannot register QCOW2 "
            "images; registering the %s image",
            url,
            images.qcow2.url,
            images.filesystem.type,
        )
        return images.filesystem, None

    def _alive(self, image_ids: list[str]) -> bool:
        """One look at the cloud: do all these images still exist (and have not failed)?"""
        found = self.backend.states(image_ids)
        return all(i in found and found[i] not in GONE_STATES for i in image_ids)

    # --- one part ---

    def _new_owner(self) -> str:
        with self._jobs_lock:
            self._jobs += 1
            return f"{self._owner_prefix}{self._jobs}"

    def _part(
        self,
        part: Part | None,
        kind: str,
        kernel_id: str,
        ramdisk_id: str,
        metadata_sha1: str,
        progress: Progress | None,
        on_sending: Callable[[], None] = no_hook,
    ) -> str:
        """The part's image id, registered now unless known; see JobHooks for `on_sending`."""
        if part is None:
            return ""
        key = image_key(kind, part.sha1, kernel_id, ramdisk_id)
        if self.registry.image(key) is None:
            original = self._imported(part, key)
            if original:
                return original
        request = PartRequest(
            kind=kind,
            label=names.label_from_url(part.url, kind),
            sha1=part.sha1,
            kernel_id=kernel_id,
            ramdisk_id=ramdisk_id,
            # A filesystem may come compressed (ZFILESYSTEM, or a gzipped FILESYSTEM); kernels,
            # ramdisks and QCOW2s are registered byte for byte.
            decompress=kind == MACHINE,
            source_url=part.url,
            metadata_sha1=metadata_sha1,
        )
        return self._flights.run(
            key, lambda: self._part_once(key, part, request, progress, on_sending)
        )

    def _part_once(
        self,
        key: str,
        part: Part,
        request: PartRequest,
        progress: Progress | None,
        on_sending: Callable[[], None],
    ) -> str:
        try:
            owner = self._claim(key)
        except CloudError as exc:  # a look at the cloud, or the cleanup of a dead job, failed
            raise RegistrationFailed(
                f"registering the {part.type} image from {part.url} failed: {exc}"
            ) from exc
        if owner is None:
            self.metrics.image_reused()
            image = self.registry.image(key)
            assert image is not None
            return image.image_id
        try:
            with self.metrics.job():
                return self._build(key, part, request, owner, progress, on_sending)
        except BaseException:
            job = self.registry.job(key)
            if job is not None and job.owner == owner and job.owner_alive():
                self.registry.release(key, owner)
            raise

    def _imported(self, part: Part, key: str) -> str:
        """The id the original ImageProxy registered for this part, if the cloud still has it.

        The original's machine images name no kernel or ramdisk (ORCA passes them at launch),
        so one serves every combination, as it did there.
        """
        original = self.registry.imported(part.sha1)
        if original is None:
            return ""
        if not self._alive([original.image_id]):
            log.warning(
                "%s: %s, imported from the original, is gone from the cloud; registering anew",
                key,
                original.image_id,
            )
            self.registry.forget_imported(part.sha1)
            return ""
        log.info("%s: answered with %s, registered by the original", key, original.image_id)
        self.metrics.image_reused()
        return original.image_id

    def _claim(self, key: str) -> str | None:
        """Claim `key` for a new owner and return it; None if the image is already registered."""
        deadline = time.monotonic() + self.settings.claim_wait
        waiting_for = ""
        while True:
            existing = self.registry.image(key)
            if existing is not None:
                if self._alive([existing.image_id]):
                    return None
                log.warning("%s: image %s is gone from the cloud; redoing", key, existing.image_id)
                self._discard(existing)
            owner = self._new_owner()
            try:
                stale = self.registry.claim(key, owner)
                if stale is not None:
                    log.warning("%s: cleaning up after %s, which died mid-job", key, stale.owner)
                    self._clean_job(stale)
                    self.registry.take_over(stale, owner)
            except Claimed as claimed:
                if waiting_for != claimed.job.owner:
                    waiting_for = claimed.job.owner
                    log.info("%s: waiting for %s, which is registering it", key, waiting_for)
                if time.monotonic() > deadline:
                    raise FetchError(
                        f"gave up waiting for {claimed.job.owner} to finish registering {key}"
                    ) from None
                time.sleep(self.settings.claim_poll)
                continue
            if self.registry.image(key) is not None:
                # Another process finished it between our look and our claim.
                self.registry.release(key, owner)
                continue
            return owner

    def _build(
        self,
        key: str,
        part: Part,
        request: PartRequest,
        owner: str,
        progress: Progress | None,
        on_sending: Callable[[], None],
    ) -> str:
        reusable = []
        if request.kind == MACHINE:
            # Bundles of this filesystem made for other kernels and ramdisks.
            reusable = [_placement(i) for i in self.registry.machine_images(part.sha1)]
        hooks = JobHooks(
            placed=lambda p: self.registry.record_bundle(key, p.location, p.folder, p.manifest),
            registered=lambda image_id: self.registry.record_image_id(key, image_id),
            abandoned=lambda exc: self._abandon(key, owner, exc),
            sending=on_sending,
        )
        sizes: list[int] = []  # the part's size, once `_source` has added it
        report = _reporter(part, progress, sizes)
        try:
            registered, placement = register_part(
                self.backend,
                request,
                lambda: self._source(part, owner, sizes),
                hooks=hooks,
                reusable=reusable,
                slot=self._bundle_slots,
                progress=report,
            )
        except (BundleError, CloudError) as exc:
            if isinstance(exc, InputError):
                raise
            raise RegistrationFailed(
                f"registering the {part.type} image from {part.url} failed: {exc}"
            ) from exc
        finally:
            if sizes:  # the part was added and pinned: the pin lasts the whole job
                imgstore.unpin(self.settings.cache_dir, part.sha1, owner)
        image = Image(
            key,
            request.kind,
            part.sha1,
            registered.image_id,
            placement.location,
            placement.folder,
            manifest=placement.manifest or "",
        )
        self.registry.finish(key, image)
        self.metrics.image_registered(request.kind)
        self.metrics.bundle_uploaded(registered.source_bytes, registered.stored_bytes)
        log.info("%s: registered %s as %s", key, part.url, registered.image_id)
        return registered.image_id

    def _abandon(self, key: str, owner: str, exc: CloudError) -> None:
        log.error("%s: cleanup failed (%s); will retry at the next claim", key, exc)
        self.registry.abandon(key, owner)

    @contextmanager
    def _source(
        self, part: Part, owner: str, sizes: list[int]
    ) -> Iterator[tuple[io.BufferedReader, int]]:
        """The part, added to imgstore and pinned (`_build` unpins it), read through the mount."""
        what = f"{part.type} image"
        # Part URLs come from the metadata file, written by a remote user: never trusted.
        blob = self._blobs.add(part.sha1, part.url, what, trusted=False)
        imgstore.pin(self.settings.cache_dir, part.sha1, owner)
        sizes.append(blob.size)
        with self._blobs.open(part.sha1, part.url, what) as source:
            yield source, blob.size

    def _clean_job(self, job: Job) -> None:
        """Delete what an abandoned job may have put in the cloud, and drop its pins."""
        if job.prefix:
            # No saved id: the registrar may have died after the cloud registered the image;
            # the backend finds it by its name.
            placement = Placement(job.bucket or "", job.prefix, job.manifest)
            self.backend.undo(placement, job.image_id)
        imgstore.unpin_owner_prefix(self.settings.cache_dir, owner_process(job.owner))

    def _discard(self, image: Image) -> None:
        """Forget an image the cloud no longer has, deleting what is left of it.

        A bundle folder that other images still use keeps its parts; only this image's own
        added manifest goes.
        """
        others = [
            i for i in self.registry.folder_users(image.bucket, image.prefix) if i.key != image.key
        ]
        shared = bool(others) or self.registry.folder_in_use(image.bucket, image.prefix)
        self.backend.discard(_placement(image), shared=shared)
        self.registry.forget_image(image.key)

    def recover(self) -> int:
        """Clean up after registrar processes that died: their jobs and their pins.

        Returns how many abandoned jobs were cleaned up. Call once at startup.
        """
        cleaned = 0
        for job in self.registry.abandoned_jobs():
            log.warning(
                "cleaning up %s left by %s (bundle %s, image %s)",
                job.key,
                job.owner,
                job.prefix or "-",
                job.image_id or "-",
            )
            try:
                self._clean_job(job)
            except CloudError as exc:  # the cloud may be down at start: serve all the same
                log.warning("could not clean up %s now (%s); will at its next claim", job.key, exc)
                continue
            self.registry.release(job.key, job.owner)
            cleaned += 1
        for prefix in sorted(dead_processes(self.settings.cache_dir)):
            dropped = imgstore.unpin_owner_prefix(self.settings.cache_dir, prefix)
            log.info("dropped %d pins of dead registrar %s", dropped, prefix)
        return cleaned


def _reporter(
    part: Part, progress: Progress | None, sizes: list[int]
) -> Callable[[int], None] | None:
    """Turns counts of source bytes read into `progress` calls with the running total."""
    if progress is None:
        return None
    done = 0

    def report(n: int) -> None:
        nonlocal done
        done += n
        progress(f"{part.type} {part.sha1[:12]}", done, sizes[0] if sizes else 0)

    return report


def _placement(image: Image) -> Placement:
    return Placement(image.bucket, image.prefix, image.manifest or None)
