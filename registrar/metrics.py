"""The registrar's Prometheus metrics, served as `GET /metrics` on the SOAP listener.

One `RegistrarMetrics` per service process, with a registry of its own (not prometheus_client's
global one), so several services or test apps in one process never share counts. The server
counts requests and times calls; the service counts registry hits, jobs and bytes. Every
method is thread-safe (prometheus_client locks its values) and cheap enough for the event loop.

Metric names (all prefixed `imageproxy_registrar_`):

- `requests_total{outcome}`: RegisterImage requests by how they ended: `ok`, `fault` (the work
  failed; ORCA got a SOAP fault), `error` (a bug; a Server fault), `bad_request` (not a valid
  RegisterImage envelope), `too_large` (body over the limit), `unsupported_media_type`
- `registration_duration_seconds{outcome}`: histogram of the time from a parsed request to its
  answer (`ok` or `fault`/`error`), registry hits included
- `requests_in_progress`: RegisterImage calls being worked on or waiting for another's result
- `jobs_in_progress`: images being bundled, uploaded, registered or waited on right now
- `registry_hits_total`: calls answered from the registry, with nothing fetched or bundled
- `images_reused_total`: images of a new image set found already registered (shared parts)
- `images_registered_total{kind}`: images registered (`machine`, `kernel`, `ramdisk`)
- `bundled_bytes_total`: raw image bytes that went through the bundler
- `uploaded_bytes_total`: bytes of bundle parts and manifests uploaded to the bucket
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from registrar.errors import RegistrarError

log = logging.getLogger(__name__)

Register = Callable[[str, str], str]

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "imageproxy_registrar"
OUTCOMES = ("ok", "fault", "error", "bad_request", "too_large", "unsupported_media_type")
# From a registry hit (tens of ms) to ORCA's 3600 s limit.
DURATION_BUCKETS = (0.05, 0.25, 1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))


class RegistrarMetrics:
    """Counters, gauges and histograms of one registrar process; see the module docstring."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "RegisterImage requests by outcome", ["outcome"], registry=r
        )
        self.durations = Histogram(
            f"{PREFIX}_registration_duration_seconds",
            "Time from a parsed RegisterImage request to its answer",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.requests_in_progress = Gauge(
            f"{PREFIX}_requests_in_progress", "RegisterImage calls not yet answered", registry=r
        )
        self.jobs_in_progress = Gauge(
            f"{PREFIX}_jobs_in_progress",
            "Images being bundled, uploaded, registered or waited on",
            registry=r,
        )
        self.registry_hits = Counter(
            f"{PREFIX}_registry_hits",
            "RegisterImage calls answered from the registry without fetching or bundling",
            registry=r,
        )
        self.images_reused = Counter(
            f"{PREFIX}_images_reused",
            "Images of an image set that were already registered and still in the cloud",
            registry=r,
        )
        self.images_registered = Counter(
            f"{PREFIX}_images_registered", "Images registered, by kind", ["kind"], registry=r
        )
        self.bundled_bytes = Counter(
            f"{PREFIX}_bundled_bytes", "Raw image bytes bundled", registry=r
        )
        self.uploaded_bytes = Counter(
            f"{PREFIX}_uploaded_bytes", "Bundle part and manifest bytes uploaded", registry=r
        )
        # Every outcome shows from the start (as 0), so a dashboard's rate() has a series.
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for kind in ("machine", "kernel", "ramdisk"):
            self.images_registered.labels(kind)

    # --- the server ---

    def rejected(self, outcome: str) -> None:
        """A request that never reached the service (bad_request, too_large, …)."""
        self.requests.labels(outcome).inc()

    def counted(self, register: Register) -> Register:
        """`register` counted, timed and tracked as in progress; its outcome from how it ends."""

        @functools.wraps(register)
        def call(url: str, signature: str) -> str:
            outcome = "error"  # anything but our own errors is a bug
            started = time.monotonic()
            self.requests_in_progress.inc()
            try:
                answer = register(url, signature)
                outcome = "ok"
                return answer
            except RegistrarError:
                outcome = "fault"
                raise
            finally:
                self.requests_in_progress.dec()
                self.requests.labels(outcome).inc()
                self.durations.labels(outcome).observe(time.monotonic() - started)

        return call

    def exposition(self) -> bytes:
        """The current values in the Prometheus text format."""
        return generate_latest(self.registry)

    # --- the service ---

    def registry_hit(self) -> None:
        self.registry_hits.inc()

    def image_reused(self) -> None:
        self.images_reused.inc()

    @contextmanager
    def job(self) -> Iterator[None]:
        """Count one image job as in progress while the block runs."""
        self.jobs_in_progress.inc()
        try:
            yield
        finally:
            self.jobs_in_progress.dec()

    def bundle_uploaded(self, raw_bytes: int, uploaded_bytes: int) -> None:
        """One bundle is uploaded whole: `raw_bytes` went in, `uploaded_bytes` went out."""
        self.bundled_bytes.inc(raw_bytes)
        self.uploaded_bytes.inc(uploaded_bytes)

    def image_registered(self, kind: str) -> None:
        self.images_registered.labels(kind).inc()
