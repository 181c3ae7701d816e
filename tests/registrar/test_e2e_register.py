"""End to end: the real registrar service, a real imgstore mount, nginx and the moto cloud.

ORCA's side is played by zeep built from ORCA's WSDL (SOAP 1.1 and 1.2) and by raw envelopes
shaped and chunked the way its Axis2 1.1 stub sends them.
"""

from __future__ import annotations

import threading

import pytest
from lxml import etree

from registrar.soap import ORCA_NS, SoapVersion
from tests.registrar import e2e_stack
from tests.registrar.e2e_bundles import unbundle
from tests.registrar.e2e_stack import Stack
from tests.registrar.soap_javaprops import loads
from tests.registrar.soap_messages import axis2_envelope, axis2_headers, post_chunked
from tests.support.images import ImageFactory, ImageSet
from tests.support.origin import Origin

FS_MIB = 16

stack, stack_factory = e2e_stack.stack, e2e_stack.stack_factory  # fixtures


def _publish(image_factory: ImageFactory, origin: Origin, **options: object) -> ImageSet:
    # ZFILESYSTEM: a gzipped tar holding one sparse `filesystem`, as ORCA sites publish images.
    options.setdefault("fs_format", "tar.gz")
    return image_factory.publish(origin, size_mib=FS_MIB, **options)  # type: ignore[arg-type]


def _check_answer(stack: Stack, image_factory: ImageFactory, images: ImageSet, text: str) -> None:
    """The text loads as Java Properties; the ids exist and hold exactly the published bytes."""
    answer = loads(text)
    assert set(answer) == {"FILESYSTEM", "KERNEL", "RAMDISK"}
    fs, kernel, ramdisk = answer["FILESYSTEM"], answer["KERNEL"], answer["RAMDISK"]
    assert sorted(stack.cloud.image_ids()) == sorted([fs, kernel, ramdisk])
    machine = unbundle(stack.cloud, fs)
    assert machine.image_type == "machine"
    assert (machine.kernel_id, machine.ramdisk_id) == (kernel, ramdisk)
    # The published filesystem is compressed; the bundle holds the raw ext4 image.
    assert machine.sha1 == image_factory.sha1(image_factory.ext4(FS_MIB))
    for image_id, kind in ((kernel, "KERNEL"), (ramdisk, "RAMDISK")):
        opened = unbundle(stack.cloud, image_id)
        assert opened.image_type == kind.lower()
        assert opened.sha1 == images.parts[kind].sha1
    registered = stack.cloud.calls_of("RegisterImage")
    assert [c.get("KernelId") for c in registered] == [None, None, kernel]
    assert [c.get("RamdiskId") for c in registered] == [None, None, ramdisk]


@pytest.mark.parametrize(
    ("soap12", "fs_format"),
    [(False, "tar.gz"), (True, "gz")],
    ids=["soap11-zfilesystem", "soap12-gzipped-filesystem"],
)
def test_zeep_gets_correct_ids_for_kernel_and_ramdisk(
    stack: Stack, origin: Origin, image_factory: ImageFactory, soap12: bool, fs_format: str
) -> None:
    images = _publish(image_factory, origin, fs_format=fs_format)
    registrar = stack.start()
    service = stack.zeep(registrar, soap12=soap12)
    text = service.RegisterImage(
        url=f" {images.metadata_url}\n", signature=f" {images.metadata_sha1} "
    )
    _check_answer(stack, image_factory, images, text)


def _puts(stack: Stack) -> int:
    return sum(1 for method, _path, _acl in stack.cloud.s3_requests if method == "PUT")


def _return_text(version: SoapVersion, body: bytes) -> str:
    env = version.namespace
    ret = etree.fromstring(body).find(
        f"{{{env}}}Body/{{{ORCA_NS}}}RegisterImageResponse/{{{ORCA_NS}}}return"
    )
    assert ret is not None, body
    return ret.text or ""


def test_raw_chunked_envelopes_and_a_repeat_answered_from_the_registry(
    stack: Stack, origin: Origin, image_factory: ImageFactory
) -> None:
    images = _publish(image_factory, origin)
    registrar = stack.start()
    host, port = registrar.host_port

    def call(version: SoapVersion, path: str) -> str:
        body = axis2_envelope(version, images.metadata_url, images.metadata_sha1)
        reply = post_chunked(host, port, path, body, axis2_headers(version), timeout=120)
        assert reply.status == 200, reply.body
        return _return_text(version, reply.body)

    first = call(SoapVersion.SOAP11, "/axis2/services/IMAGEPROXY")
    _check_answer(stack, image_factory, images, first)
    # Every blob was fetched once (plus imgstore's size probe), nothing more.
    for part in images.parts.values():
        assert (
            part.path.stat().st_size
            <= origin.bytes_sent(part.name)
            < (part.path.stat().st_size + 64 * 1024)
        )
    origin_bytes, puts = origin.bytes_sent(), _puts(stack)
    registered = len(stack.cloud.calls_of("RegisterImage"))
    described = len(stack.cloud.calls_of("DescribeImages"))

    again = call(SoapVersion.SOAP12, "/axis2/services/IMAGEPROXY.IMAGEPROXYHttpSoap12Endpoint/")
    assert again == first
    assert origin.bytes_sent() == origin_bytes
    assert _puts(stack) == puts
    assert len(stack.cloud.calls_of("RegisterImage")) == registered
    # One cheap check that the ids still exist, nothing else.
    assert len(stack.cloud.calls_of("DescribeImages")) == described + 1


def test_ten_concurrent_identical_calls_do_the_work_once(
    stack: Stack, origin: Origin, image_factory: ImageFactory
) -> None:
    images = _publish(image_factory, origin)
    registrar = stack.start()
    answers: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(10, timeout=60)

    def call() -> None:
        try:
            service = stack.zeep(registrar)
            start.wait()
            answers.append(
                service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1)
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(170)
    assert errors == []
    assert len(answers) == 10 and len(set(answers)) == 1
    _check_answer(stack, image_factory, images, answers[0])  # three RegisterImage calls in all
    for part in images.parts.values():
        size = part.path.stat().st_size
        assert size <= origin.bytes_sent(part.name) < size + 64 * 1024
    manifests = [p for m, p, _ in stack.cloud.s3_requests if m == "PUT" and p.endswith(".xml")]
    assert len(manifests) == 3
