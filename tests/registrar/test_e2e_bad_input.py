"""End to end: each bad input gets a SOAP fault saying exactly what is wrong, and leaves nothing
behind — no bucket object, no image, no corrupt cache entry that would spoil a good request."""

from __future__ import annotations

import hashlib

import pytest
import zeep.exceptions

from tests.registrar import e2e_stack
from tests.registrar.e2e_stack import Stack
from tests.registrar.soap_javaprops import loads
from tests.support.images import ImageFactory, metadata_xml
from tests.support.origin import Origin

stack, stack_factory = e2e_stack.stack, e2e_stack.stack_factory  # fixtures


def _fault(service: object, url: str, signature: str) -> zeep.exceptions.Fault:
    with pytest.raises(zeep.exceptions.Fault) as caught:
        service.RegisterImage(url=url, signature=signature)  # type: ignore[attr-defined]
    return caught.value


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def test_bad_inputs_get_specific_faults_and_leave_nothing_behind(
    stack: Stack, origin: Origin, image_factory: ImageFactory
) -> None:
    images = image_factory.publish(origin, size_mib=16, fs_format="raw")
    kernel = images.parts["KERNEL"]
    fs = images.parts["FILESYSTEM"]
    service = stack.zeep(stack.start())
    wrong = "0" * 40

    cases: list[tuple[str, str, str, str]] = []  # (what, url, signature, expected message)
    cases.append(
        (
            "bad signature format",
            images.metadata_url,
            "not-a-sha1",
            "metadata signature 'not-a-sha1' is not a SHA-1 (40 hexadecimal digits)",
        )
    )
    cases.append(
        (
            "metadata SHA-1 mismatch",
            images.metadata_url,
            wrong,
            f"signature {wrong} does not match computed signature {images.metadata_sha1} "
            f"for metadata at {images.metadata_url}",
        )
    )
    cases.append(
        (
            "URL scheme",
            "file:///etc/passwd",
            images.metadata_sha1,
            "metadata URL 'file:///etc/passwd' has scheme 'file'",
        )
    )
    bad_xml = b"<images><image><type>FILESYSTEM</type>"
    cases.append(
        (
            "malformed metadata",
            origin.put("bad.xml", bad_xml),
            _sha1(bad_xml),
            "is not well-formed XML",
        )
    )
    no_fs = metadata_xml([("KERNEL", kernel.sha1, kernel.url)])
    cases.append(
        (
            "no filesystem",
            origin.put("nofs.xml", no_fs),
            _sha1(no_fs),
            "lists no FILESYSTEM, ZFILESYSTEM or QCOW2 image; a filesystem or a QCOW2 is required",
        )
    )
    doctype = b'<!DOCTYPE images [<!ENTITY x SYSTEM "file:///etc/passwd">]><images>&x;</images>'
    cases.append(
        (
            "DTD in metadata",
            origin.put("dtd.xml", doctype),
            _sha1(doctype),
            "has a DOCTYPE; DTDs and entities are not accepted",
        )
    )
    bad_part_sig = metadata_xml([("FILESYSTEM", fs.sha1, fs.url), ("KERNEL", "xyz", kernel.url)])
    cases.append(
        (
            "part signature format",
            origin.put("badsig.xml", bad_part_sig),
            _sha1(bad_part_sig),
            "KERNEL image in metadata at",
        )
    )
    wrong_part = metadata_xml([("FILESYSTEM", fs.sha1, fs.url), ("KERNEL", "1" * 40, kernel.url)])
    cases.append(
        (
            "part SHA-1 mismatch",
            origin.put("wrongpart.xml", wrong_part),
            _sha1(wrong_part),
            f"signature {'1' * 40} does not match computed signature {kernel.sha1} "
            f"for KERNEL image at {kernel.url}",
        )
    )

    for what, url, signature, message in cases:
        fault = _fault(service, url, signature)
        assert message in fault.message, f"{what}: {fault.message}"
        assert fault.detail is None, what  # nothing for ORCA's stub to replace the message by
        assert stack.cloud.bucket_keys() == [], what
        assert stack.cloud.image_ids() == [], what

    # The faults name the part that failed and the metadata it came from.
    assert "for KERNEL image at " + kernel.url in fault.message

    # Nothing corrupt was left in the cache: the good request works, every part verified.
    text = service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1)
    answer = loads(text)
    assert sorted(stack.cloud.image_ids()) == sorted(answer.values())
    blobs = stack.imgstore_ls()
    for part in images.parts.values():
        assert blobs[part.sha1]["state"] == "verified"


def test_cloud_refusal_is_a_server_fault_naming_image_and_step_and_nothing_leaks(
    stack: Stack, origin: Origin, image_factory: ImageFactory
) -> None:
    images = image_factory.publish(origin, size_mib=16, fs_format="raw", kernel=False)
    stack.cloud.refuse("RegisterImage", "InvalidManifest", "manifest signature is invalid")
    service = stack.zeep(stack.start())
    fault = _fault(service, images.metadata_url, images.metadata_sha1)
    assert fault.code == "soapenv:Server"
    ramdisk = images.parts["RAMDISK"]
    assert fault.message == (
        f"registering the RAMDISK image from {ramdisk.url} failed: "
        "RegisterImage: InvalidManifest: manifest signature is invalid"
    )
    assert stack.cloud.bucket_keys() == []
    assert stack.cloud.image_ids() == []
