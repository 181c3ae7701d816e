"""The public, synchronous Python API of the store, for other processes (the registrar).

Stable interface; every function takes the cache directory and opens the catalog itself, so it
is safe to call from any process or thread while a mount is running. The functions block (SQLite,
and HTTP for `add`); from async code call them in a worker thread (`trio.to_thread.run_sync`).

    add(cache_dir, sha1, urls, *, trusted=True, allowed_networks=()) -> BlobInfo
        Declare a blob (or add mirrors to it). Probes the first reachable URL with a ranged GET
        to learn the exact size; downloads nothing else. Re-adding a corrupt blob resets it to
        `remote`. `trusted=False` marks URLs that came from remote users: the probe (and every
        later fetch by the mount) refuses loopback, link-local and this host's addresses unless
        in `allowed_networks` (CIDR strings; imgstore/netpolicy.py).
        Raises BadSha1, BadUrl (not http/https), OriginError (no URL reachable, or mirrors
        disagree about the size; ForbiddenAddress when the policy refused it).
    info(cache_dir, sha1) -> BlobInfo                  UnknownBlob if never added
    list_blobs(cache_dir) -> list[BlobInfo]
    pin(cache_dir, sha1, owner)                        keeps the blob from eviction
    unpin(cache_dir, sha1, owner)
    unpin_owner_prefix(cache_dir, prefix) -> int       e.g. clear a crashed registrar's pins

    BlobInfo: sha1, size, cached_bytes, state (remote|partial|complete|verified|corrupt),
              urls (tuple of str), pins (tuple of owner str), last_used (Unix time),
              error (why it is corrupt, e.g. "content has SHA-1 <hex>"; else None)

Cache maintenance, what `imgstore fetch`, `verify` and `evict` do (the CLI only prints the
results). `fetch` and `verify` run a store of their own on a trio loop in the calling thread,
so call them from a thread where no loop runs; each reports every blob as it is done:

    evict(cache_dir, sha1s=(), *, every=False) -> Iterator[Eviction]
        Drop blobs' cached bytes; pinned blobs and blobs open elsewhere are kept.
    fetch(cfg, sha1s, report, watch=None) -> list[Fetched]
        Fetch whole blobs and verify their SHA-1.
    verify(cfg, sha1s, report) -> list[Verdict]
        Hash fully cached blobs again (sha1s empty: every fully cached blob).

The blob's bytes are read through the mount: MOUNTPOINT/by-sha1/<sha1>. All errors derive
from imgstore.errors.StoreError.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import trio

from imgstore.budget import evict_blob
from imgstore.catalog import BlobRecord, Catalog, Url
from imgstore.config import StoreConfig
from imgstore.errors import BadUrl, BlobBusy, BlobCorrupt, OriginError, StoreError
from imgstore.fetcher import Origin, Probe, check_url
from imgstore.netpolicy import NetPolicy
from imgstore.verify import normalize_sha1

if TYPE_CHECKING:
    from imgstore.store import Store

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_CHUNK_SIZE = StoreConfig.chunk_size


@dataclasses.dataclass(frozen=True)
class BlobInfo:
    """A blob as the store knows it."""

    sha1: str
    size: int
    cached_bytes: int
    state: str
    urls: tuple[str, ...]
    pins: tuple[str, ...]
    last_used: float
    error: str | None = None  # why it is corrupt, e.g. "content has SHA-1 <hex>"

    @classmethod
    def from_record(cls, rec: BlobRecord) -> BlobInfo:
        return cls(
            sha1=rec.sha1,
            size=rec.size,
            cached_bytes=rec.cached_bytes,
            state=rec.state,
            urls=tuple(u.url for u in rec.urls),
            pins=rec.pins,
            last_used=rec.last_used,
            error=rec.error,
        )


def add(
    cache_dir: os.PathLike[str] | str,
    sha1: str,
    urls: Sequence[str],
    *,
    trusted: bool = True,
    allowed_networks: Sequence[str] = (),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    connect_timeout: float = 10.0,
    http_proxy: str = "",
) -> BlobInfo:
    """Declare a blob by SHA-1 and URL(s); see the module docstring.

    `http_proxy` (the mount's `[store] http_proxy`) is used for trusted URLs' probes, so the
    probe goes the way the chunks will.
    """
    sha1 = normalize_sha1(sha1)
    checked = list(dict.fromkeys(check_url(u) for u in urls))  # in order, no duplicates
    if not checked:
        raise BadUrl("at least one URL is needed")
    policy = None if trusted else NetPolicy.from_cidrs(allowed_networks)
    probes = _run_trio(lambda: _probe_all(checked, connect_timeout, policy, http_proxy))
    sizes = {p.size for p in probes.values()}
    if len(sizes) > 1:
        raise OriginError(f"mirrors disagree about the size of {sha1}: {sorted(sizes)}")
    first = probes[next(u for u in checked if u in probes)]
    records = [Url(u, trusted, probes[u].etag if u in probes else None) for u in checked]
    catalog = Catalog(Path(cache_dir))
    try:
        known = catalog.find(sha1)
        if known is not None and known.state != "corrupt" and known.size != first.size:
            # Content addressing fixes the size: a URL that disagrees serves something else.
            raise OriginError(
                f"{checked[0]} has {first.size} bytes, but blob {sha1} has {known.size}"
            )
        rec, reset = catalog.upsert(sha1, first.size, first.etag, first.ranges, records, chunk_size)
        if reset:
            try:
                evict_blob(Path(cache_dir), catalog, sha1)
            except BlobBusy:
                log.info("blob %s is open; its old data is already unreadable", sha1)
            rec = catalog.get(sha1)
        return BlobInfo.from_record(rec)
    finally:
        catalog.close()


def info(cache_dir: os.PathLike[str] | str, sha1: str) -> BlobInfo:
    """The blob's current record; UnknownBlob if it was never added."""
    sha1 = normalize_sha1(sha1)
    return _with_catalog(cache_dir, lambda c: BlobInfo.from_record(c.get(sha1)))


def list_blobs(cache_dir: os.PathLike[str] | str) -> list[BlobInfo]:
    """Every blob in the catalog, in the order they were first added."""
    return _with_catalog(cache_dir, lambda c: [BlobInfo.from_record(r) for r in c.list()])


def pin(cache_dir: os.PathLike[str] | str, sha1: str, owner: str) -> None:
    """Keep the blob from eviction until `unpin` with the same owner."""
    sha1 = normalize_sha1(sha1)
    _with_catalog(cache_dir, lambda c: c.pin(sha1, owner))


def unpin(cache_dir: os.PathLike[str] | str, sha1: str, owner: str) -> None:
    sha1 = normalize_sha1(sha1)
    _with_catalog(cache_dir, lambda c: c.unpin(sha1, owner))


def unpin_owner_prefix(cache_dir: os.PathLike[str] | str, prefix: str) -> int:
    """Drop every pin whose owner starts with `prefix`; returns how many were dropped."""
    return _with_catalog(cache_dir, lambda c: c.unpin_owner_prefix(prefix))


@dataclasses.dataclass(frozen=True)
class Eviction:
    """What `evict` did with one blob: freed its bytes, or kept it (pinned, or an error)."""

    sha1: str
    freed: int = 0
    pinned_by: tuple[str, ...] = ()
    error: StoreError | None = None  # e.g. BlobBusy: open by a mount or another process

    @property
    def kept(self) -> bool:
        return bool(self.pinned_by) or self.error is not None


def evict(
    cache_dir: os.PathLike[str] | str, sha1s: Sequence[str] = (), *, every: bool = False
) -> Iterator[Eviction]:
    """Drop the cached bytes of the named blobs (with `every`, of every blob), one by one.

    The blobs stay declared and fetchable. A pinned blob is kept, and so is one that a mount
    or another process has open (its readers trust the bytes they were promised). Named blobs
    are checked before any is evicted: BadSha1, UnknownBlob.
    """
    cache_dir = Path(cache_dir)
    targets = [b.sha1 for b in list_blobs(cache_dir)] if every else _known(cache_dir, sha1s)
    catalog = Catalog(cache_dir)
    try:
        for sha1 in targets:
            if catalog.pinned(sha1):
                yield Eviction(sha1, pinned_by=catalog.get(sha1).pins)
                continue
            try:
                freed = evict_blob(cache_dir, catalog, sha1)
            except StoreError as exc:
                yield Eviction(sha1, error=exc)
                continue
            yield Eviction(sha1, freed=freed)
    finally:
        catalog.close()


class Progress(Protocol):
    """What a `fetch` watcher may read while a blob is fetched."""

    sha1: str
    size: int

    @property
    def cached_bytes(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class Fetched:
    """How `fetch` ended for one blob: fetched and verified, or the error."""

    sha1: str
    error: StoreError | None = None


def fetch(
    cfg: StoreConfig,
    sha1s: Sequence[str],
    report: Callable[[Fetched], None],
    watch: Callable[[Progress], Awaitable[None]] | None = None,
) -> list[Fetched]:
    """Fetch whole blobs into the cache and verify their SHA-1, without a mount.

    One blob failing does not stop the others. `watch(blob)`, if given, runs while each blob
    is fetched and is cancelled when it is done (a progress bar). Named blobs are checked
    before any work: BadSha1, UnknownBlob.
    """
    targets = _known(cfg.cache_dir, sha1s)
    return trio.run(_fetch, cfg, targets, report, watch)


async def _fetch(
    cfg: StoreConfig,
    sha1s: list[str],
    report: Callable[[Fetched], None],
    watch: Callable[[Progress], Awaitable[None]] | None,
) -> list[Fetched]:
    from imgstore.store import open_store  # the store's machinery only where one runs

    results = []
    async with open_store(cfg) as store:
        for sha1 in sha1s:
            error = await _fetch_one(store, sha1, watch)
            if isinstance(error, BlobCorrupt):
                # The reason (the SHA-1 the bytes have) is in the catalog, as readers see it.
                error = BlobCorrupt.of(sha1, (await store.blob_record(sha1)).error)
            results.append(Fetched(sha1, error))
            report(results[-1])
    return results


async def _fetch_one(
    store: Store, sha1: str, watch: Callable[[Progress], Awaitable[None]] | None
) -> StoreError | None:
    """Fetch and verify one blob; the error, if any, for the caller to report and go on."""
    try:
        handle = await store.open(sha1)
    except StoreError as exc:
        return exc
    error = None
    try:
        async with trio.open_nursery() as nursery:
            if watch is not None:
                nursery.start_soon(watch, handle.blob)
            try:
                await store.fetch_all(handle)
            except StoreError as exc:
                # Caught here, not around the nursery: it would wrap it in an ExceptionGroup.
                error = exc
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await store.release(handle)
    return error


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What `verify` found for one blob: its state after hashing, or why it was not hashed."""

    sha1: str
    state: str | None = None  # "verified", or "corrupt" when the bytes did not match
    skipped: str | None = None  # "open" (by a mount or another process), or "incomplete"

    @property
    def ok(self) -> bool:
        return self.state == "verified"


def verify(
    cfg: StoreConfig, sha1s: Sequence[str], report: Callable[[Verdict], None]
) -> list[Verdict]:
    """Hash the cached bytes of fully cached blobs again; a mismatch makes the blob corrupt.

    `sha1s` empty: every fully cached blob. Named blobs are checked before any work: BadSha1,
    UnknownBlob.
    """
    if sha1s:
        targets = _known(cfg.cache_dir, sha1s)
    else:
        targets = [b.sha1 for b in list_blobs(cfg.cache_dir) if b.cached_bytes == b.size]
    return trio.run(_verify, cfg, targets, report)


async def _verify(
    cfg: StoreConfig, sha1s: list[str], report: Callable[[Verdict], None]
) -> list[Verdict]:
    from imgstore.chunks import ExclusiveBlob
    from imgstore.store import open_store  # the store's machinery only where one runs

    results = []
    async with open_store(cfg) as store:
        for sha1 in sha1s:
            # A mount that has the blob open trusts its own view of the cached bytes; dropping
            # them under it (on a mismatch) would make it serve holes. Verify it later.
            try:
                with ExclusiveBlob(cfg.cache_dir, sha1):
                    pass
            except BlobBusy:
                results.append(Verdict(sha1, skipped="open"))
                report(results[-1])
                continue
            handle = await store.open(sha1)
            try:
                if await store.verify_cached(handle):
                    verdict = Verdict(sha1, state=handle.blob.state)
                else:
                    verdict = Verdict(sha1, skipped="incomplete")
                report(verdict)
            finally:
                await store.release(handle)
            results.append(verdict)
    return results


def _known(cache_dir: os.PathLike[str] | str, sha1s: Sequence[str]) -> list[str]:
    """The SHA-1s in canonical form, once each is known to the catalog (BadSha1, UnknownBlob)."""
    canonical = [normalize_sha1(s) for s in sha1s]
    for sha1 in canonical:
        info(cache_dir, sha1)
    return canonical


def _with_catalog(cache_dir: os.PathLike[str] | str, fn: Callable[[Catalog], T]) -> T:
    catalog = Catalog(Path(cache_dir))
    try:
        return fn(catalog)
    finally:
        catalog.close()


async def _probe_all(
    urls: list[str], connect_timeout: float, policy: NetPolicy | None, http_proxy: str = ""
) -> dict[str, Probe]:
    """Probe every URL; at least one must answer. Dead mirrors are logged, not fatal.

    With a `policy`, the URLs are untrusted and every connection is checked against it.
    """
    origin = Origin(
        connect_timeout=connect_timeout, read_timeout=30.0, policy=policy, proxy=http_proxy
    )
    if policy is not None:
        origin.distrust(urls)
    results: dict[str, Probe] = {}
    errors: list[OriginError] = []
    try:
        for url in urls:
            try:
                results[url] = await origin.probe(url)
            except OriginError as exc:
                errors.append(exc)
    finally:
        await origin.aclose()
    if not results:
        raise errors[0]  # the caller's one-line error: no warning line before it
    for exc in errors:
        log.warning("mirror unusable: %s", exc)
    return results


def _run_trio(fn: Callable[[], object]) -> T:  # type: ignore[type-var]
    """Run an async function to completion in a fresh thread (safe inside any event loop)."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = trio.run(fn)  # type: ignore[arg-type]
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="imgstore-client")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
