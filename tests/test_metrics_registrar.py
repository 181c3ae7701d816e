"""The registrar's /metrics after real RegisterImage calls on the whole stack (e2e fixtures).

The real `registrar serve`, a real imgstore mount (with its own metrics listener), nginx and
the moto cloud, as in tests/registrar/test_e2e_*.py. The counts are checked against what
happened elsewhere: the bucket's object sizes, the images' raw sizes, nginx's access log.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable

import pytest
import zeep.exceptions

from registrar.errors import FetchError
from registrar.metrics import RegistrarMetrics
from registrar.server import SERVICE
from registrar.soap import SoapVersion
from tests.registrar import e2e_stack
from tests.registrar.e2e_stack import Stack
from tests.registrar.soap_javaprops import loads
from tests.registrar.soap_messages import axis2_envelope, axis2_headers
from tests.registrar.soap_server import running_server
from tests.support.images import ImageFactory
from tests.support.origin import Origin
from tests.test_metrics_imgstore import Samples, free_port, scrape, value

stack_factory = e2e_stack.stack_factory  # fixture

FS_MIB = 16
PROBE = "bytes=0-0"  # `imgstore add` (in the registrar) learns a URL's size with this range


def post(port: int, body: bytes, content_type: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", SERVICE, body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def requests(samples: Samples, outcome: str) -> float:
    return value(samples, "imageproxy_registrar_requests_total", outcome=outcome)


def test_register_then_again_counts_work_bytes_and_a_registry_hit(
    stack_factory: Callable[..., Stack], origin: Origin, image_factory: ImageFactory
) -> None:
    store_port = free_port()
    stack = stack_factory(store={"metrics_listen": f"127.0.0.1:{store_port}"})
    images = image_factory.publish(origin, size_mib=FS_MIB, fs_format="gz")
    registrar = stack.start()
    port = registrar.host_port[1]
    before = scrape(port)
    assert requests(before, "ok") == 0
    assert value(before, "imageproxy_registrar_bundled_bytes_total") == 0
    origin.reset_counts()

    service = stack.zeep(registrar)
    first = loads(service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1))

    after = scrape(port)
    assert requests(after, "ok") == 1
    assert value(after, "imageproxy_registrar_registration_duration_seconds_count", outcome="ok")
    assert value(after, "imageproxy_registrar_registry_hits_total") == 0
    for kind in ("machine", "kernel", "ramdisk"):
        assert value(after, "imageproxy_registrar_images_registered_total", kind=kind) == 1
    assert value(after, "imageproxy_registrar_requests_in_progress") == 0
    assert value(after, "imageproxy_registrar_jobs_in_progress") == 0
    # Bundled: the raw images (the filesystem unzipped); uploaded: every object in the bucket.
    raw = image_factory.ext4(FS_MIB).stat().st_size + sum(
        images.parts[kind].path.stat().st_size for kind in ("KERNEL", "RAMDISK")
    )
    assert value(after, "imageproxy_registrar_bundled_bytes_total") == raw
    objects = stack.cloud.s3.list_objects_v2(Bucket=stack.cloud.bucket)["Contents"]
    assert len(objects) > 3  # parts and a manifest per image
    uploaded = sum(item["Size"] for item in objects)
    assert value(after, "imageproxy_registrar_uploaded_bytes_total") == uploaded

    # The mount fetched each published byte once (the registrar's size probes aside) and
    # served at least as much to the registrar.
    published = len(images.metadata) + sum(p.path.stat().st_size for p in images.parts.values())
    fetched = sum(e["body_bytes"] for e in origin.log() if e["range"] != PROBE)
    assert fetched == published
    store = scrape(store_port)
    assert value(store, "imgstore_origin_bytes_total") == fetched
    assert value(store, "imgstore_served_bytes_total") >= published
    assert value(store, "imgstore_blobs_verified_total") == 4  # metadata, fs, kernel, ramdisk
    assert value(store, "imgstore_cache_used_bytes") >= published

    # Again: answered from the registry, nothing bundled, uploaded or fetched.
    origin.reset_counts()
    second = loads(service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1))
    assert second == first
    again = scrape(port)
    assert requests(again, "ok") == 2
    assert value(again, "imageproxy_registrar_registry_hits_total") == 1
    assert value(again, "imageproxy_registrar_bundled_bytes_total") == raw
    assert value(again, "imageproxy_registrar_uploaded_bytes_total") == uploaded
    assert value(again, "imageproxy_registrar_images_registered_total", kind="machine") == 1
    assert origin.bytes_sent() == 0
    assert value(scrape(store_port), "imgstore_origin_bytes_total") == fetched


def test_faults_and_refused_requests_are_counted_by_outcome(
    stack_factory: Callable[..., Stack], origin: Origin
) -> None:
    stack = stack_factory()
    registrar = stack.start()
    port = registrar.host_port[1]
    service = stack.zeep(registrar)

    with pytest.raises(zeep.exceptions.Fault):
        service.RegisterImage(url=origin.url("metadata.xml"), signature="not-a-sha1")
    assert post(port, b"<not-soap/>", "text/xml; charset=utf-8") == 500
    assert post(port, b"{}", "application/json") == 415

    samples = scrape(port)
    assert requests(samples, "fault") == 1
    assert requests(samples, "bad_request") == 1
    assert requests(samples, "unsupported_media_type") == 1
    assert requests(samples, "ok") == requests(samples, "error") == 0
    assert value(
        samples, "imageproxy_registrar_registration_duration_seconds_count", outcome="fault"
    )
    assert value(samples, "imageproxy_registrar_bundled_bytes_total") == 0


# --- the server's own counting, in process (the real hypercorn app on a real socket) ---


def fake_register(url: str, signature: str) -> str:
    """Answers, faults or crashes by URL, as the service would (a fake, not a mock)."""
    if url.endswith("/fault"):
        raise FetchError(f"cannot fetch metadata at {url}: HTTP 404")
    if url.endswith("/bug"):
        raise RuntimeError("a bug")
    return "FILESYSTEM=ami-1\nKERNEL=\nRAMDISK=\n"


def soap_post(port: int, url: str, body: bytes | None = None) -> int:
    version = SoapVersion.SOAP11
    body = body or axis2_envelope(version, url, "0" * 40)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", SERVICE, body=body, headers=axis2_headers(version))
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_each_app_counts_its_own_calls_by_outcome_including_bugs_and_oversized_bodies() -> None:
    metrics, other = RegistrarMetrics(), RegistrarMetrics()
    with running_server(fake_register, metrics=metrics, max_body=4096) as srv:
        assert soap_post(srv.port, "http://o.example/ok") == 200
        assert soap_post(srv.port, "http://o.example/ok") == 200
        assert soap_post(srv.port, "http://o.example/fault") == 500
        assert soap_post(srv.port, "http://o.example/bug") == 500
        assert soap_post(srv.port, "", body=b"<x>" + b"y" * 8192 + b"</x>") == 413
        samples = scrape(srv.port)
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        conn.request("HEAD", "/metrics")
        assert conn.getresponse().status == 200
        conn.close()
        with running_server(fake_register, metrics=other) as second:
            assert requests(scrape(second.port), "ok") == 0  # registries are not shared

    assert requests(samples, "ok") == 2
    assert requests(samples, "fault") == requests(samples, "error") == 1
    assert requests(samples, "too_large") == 1
    assert requests(samples, "bad_request") == 0
    name = "imageproxy_registrar_registration_duration_seconds_count"
    assert value(samples, name, outcome="ok") == 2
    assert value(samples, name, outcome="error") == 1
    assert value(samples, "imageproxy_registrar_requests_in_progress") == 0
