"""SSRF through SOAP: metadata and part URLs that reach this host or link-local are refused.

The registrar allows only 127.0.0.1/32 here (the nginx origin); 127.0.0.2 is loopback too but
not allowed, and 169.254.169.254 is the cloud metadata service's address. Each refused URL is a
fault that names it and why; nothing is fetched, uploaded or registered.
"""

from __future__ import annotations

import hashlib

import pytest
import zeep.exceptions

from tests.faults.site import set_registrar_keys
from tests.registrar import e2e_stack
from tests.registrar.e2e_stack import Stack
from tests.support.images import ImageFactory, metadata_xml
from tests.support.origin import Origin

stack, stack_factory = e2e_stack.stack, e2e_stack.stack_factory  # fixtures


def _fault(service: object, url: str, signature: str) -> str:
    with pytest.raises(zeep.exceptions.Fault) as caught:
        service.RegisterImage(url=url, signature=signature)  # type: ignore[attr-defined]
    return str(caught.value.message)


def test_soap_urls_to_loopback_and_link_local_are_refused(
    stack: Stack, origin: Origin, image_factory: ImageFactory
) -> None:
    set_registrar_keys(stack, allowed_networks=["127.0.0.1/32"])
    images = image_factory.publish(origin, size_mib=16, fs_format="raw", ramdisk=False)
    service = stack.zeep(stack.start())
    port = origin.base_url.rsplit(":", 1)[1]

    other_loopback = images.metadata_url.replace("127.0.0.1", "127.0.0.2")
    message = _fault(service, other_loopback, images.metadata_sha1)
    assert message == (
        f"cannot fetch metadata at {other_loopback}: refused {other_loopback}: 127.0.0.2 is a "
        "loopback address (allow its network in allowed_networks)"
    )
    metadata_service = "http://169.254.169.254/latest/meta-data/iam"
    message = _fault(service, metadata_service, images.metadata_sha1)
    assert "169.254.169.254 is a link-local address" in message
    ipv6 = f"http://[::1]:{port}/x.xml"
    assert "::1 is a loopback address" in _fault(service, ipv6, images.metadata_sha1)

    # Allowed metadata whose part points inward: the part is refused, by name.
    user_data = "http://169.254.169.254/latest/user-data"
    inward = metadata_xml([("FILESYSTEM", images.parts["FILESYSTEM"].sha1, user_data)])
    message = _fault(service, origin.put("inward.xml", inward), hashlib.sha1(inward).hexdigest())
    assert f"FILESYSTEM image at {user_data}" in message
    assert "169.254.169.254 is a link-local address" in message

    assert stack.cloud.bucket_keys() == []
    assert stack.cloud.image_ids() == []
    assert images.parts["FILESYSTEM"].sha1 not in stack.imgstore_ls()
    # The same registrar still serves a good request (kernel + filesystem on the allowed origin).
    text = service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1)
    assert "FILESYSTEM=" in text and "KERNEL=" in text
