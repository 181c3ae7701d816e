"""The store's Prometheus counters; `metrics_listener.py` serves them over HTTP.

Kept apart from the listener so the store counts without importing an HTTP server. Values live
in this process's own registry (not prometheus_client's global one).

The store counts as it goes (each call is an integer add, fine on the trio thread); cache usage,
the budget and evictions are read from the `Budget` when scraped. Usage is this process's view:
what `imgstore fetch` or `imgstore evict` change beside the mount shows once the mount next
rescans the cache (when it makes room).

Metric names:

- `imgstore_origin_bytes_total`: body bytes received from origins (ranges and whole bodies)
- `imgstore_served_bytes_total`: bytes returned to readers of the mount
- `imgstore_chunk_lookups_total{result}`: chunks touched by reads, `hit` if cached at the time
  of the read, `miss` if the read had to wait for a fetch
- `imgstore_chunk_fetch_seconds`: histogram of successful ranged fetches of one chunk
- `imgstore_chunk_fetch_errors_total`: chunk fetches that failed (their readers got EIO)
- `imgstore_blobs_verified_total`, `imgstore_verification_failures_total`: SHA-1 verdicts
- `imgstore_cache_used_bytes`: bytes the cache's data files hold on disk, plus reservations
- `imgstore_cache_budget_bytes`: `cache_size` (absent when unlimited)
- `imgstore_cache_min_free_bytes`: `min_free`
- `imgstore_evictions_total`, `imgstore_evicted_bytes_total`: blobs this process evicted to make
  room, and the bytes that freed
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# One chunk over loopback takes milliseconds; over a WAN to a slow origin, seconds.
FETCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf"))


class ChunkedBlob(Protocol):
    """What a read's hit/miss count looks at in `imgstore.store.Blob`."""

    readable: Mapping[int, int]


class CacheState(Protocol):
    """What the cache collector reads from `imgstore.budget.Budget`."""

    @property
    def used(self) -> int: ...

    evictions: int
    evicted_bytes: int


class StoreMetrics:
    """The counters of one store process; see the module docstring for the names."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.origin_bytes = Counter(
            "imgstore_origin_bytes", "Body bytes received from origins", registry=r
        )
        self.served_bytes = Counter(
            "imgstore_served_bytes", "Bytes returned to readers of the mount", registry=r
        )
        self.chunk_lookups = Counter(
            "imgstore_chunk_lookups",
            "Chunks touched by reads: hit if cached at the time, miss if fetched for it",
            ["result"],
            registry=r,
        )
        self.fetch_seconds = Histogram(
            "imgstore_chunk_fetch_seconds",
            "Time to fetch one chunk from an origin",
            buckets=FETCH_BUCKETS,
            registry=r,
        )
        self.fetch_errors = Counter(
            "imgstore_chunk_fetch_errors", "Chunk fetches that failed", registry=r
        )
        self.verified = Counter("imgstore_blobs_verified", "Blobs whose SHA-1 matched", registry=r)
        self.verification_failures = Counter(
            "imgstore_verification_failures", "Blobs whose SHA-1 did not match", registry=r
        )
        self._hits = self.chunk_lookups.labels("hit")
        self._misses = self.chunk_lookups.labels("miss")

    def lookup(self, blob: ChunkedBlob, touched: Iterable[int]) -> None:
        """Count the chunks a read touches as hits (cached now) or misses."""
        for idx in touched:
            (self._hits if idx in blob.readable else self._misses).inc()

    def fetched(self, length: int, seconds: float) -> None:
        """One chunk of `length` bytes came from an origin in `seconds`."""
        self.origin_bytes.inc(length)
        self.fetch_seconds.observe(seconds)

    def watch_cache(self, cache: CacheState, budget: int | None, min_free: int) -> None:
        """Report `cache`'s usage and evictions, read at every scrape."""
        self.registry.register(_CacheCollector(cache, budget, min_free))

    def exposition(self) -> bytes:
        """The current values in the Prometheus text format."""
        return generate_latest(self.registry)


class _CacheCollector(Collector):
    def __init__(self, cache: CacheState, budget: int | None, min_free: int) -> None:
        self.cache = cache
        self.budget = budget
        self.min_free = min_free

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "imgstore_cache_used_bytes",
            "Bytes the cache holds on disk, plus space reserved for writes in progress",
            value=self.cache.used,
        )
        if self.budget is not None:
            yield GaugeMetricFamily(
                "imgstore_cache_budget_bytes", "The cache_size budget", value=self.budget
            )
        yield GaugeMetricFamily(
            "imgstore_cache_min_free_bytes",
            "Free space kept on the cache filesystem (min_free)",
            value=self.min_free,
        )
        yield CounterMetricFamily(
            "imgstore_evictions",
            "Blobs evicted by this process to make room",
            value=self.cache.evictions,
        )
        yield CounterMetricFamily(
            "imgstore_evicted_bytes",
            "Bytes freed by evictions",
            value=self.cache.evicted_bytes,
        )
