"""A part whose bytes do not match its signature: a fault naming the part and both hashes.

The bundler never sees bytes the mount did not verify (the last piece of a read is held until
the SHA-1 matched), so nothing is uploaded or registered; the blob is `corrupt` in the cache
until it is declared again, and the image with the right signature then goes through.
"""

from __future__ import annotations

import hashlib

import pytest
import zeep.exceptions

from tests.registrar import e2e_stack
from tests.registrar.e2e_stack import Stack
from tests.support.images import ImageFactory, metadata_xml
from tests.support.origin import Origin

stack, stack_factory = e2e_stack.stack, e2e_stack.stack_factory  # fixtures


def test_sha1_mismatch_names_the_part_and_both_hashes(
    stack: Stack, origin: Origin, image_factory: ImageFactory
) -> None:
    images = image_factory.publish(
        origin, size_mib=16, fs_format="raw", kernel=False, ramdisk=False
    )
    fs = images.parts["FILESYSTEM"]
    claimed = "1" * 40
    meta = metadata_xml([("FILESYSTEM", claimed, fs.url)])
    service = stack.zeep(stack.start())
    with pytest.raises(zeep.exceptions.Fault) as caught:
        service.RegisterImage(
            url=origin.put("lie.xml", meta), signature=hashlib.sha1(meta).hexdigest()
        )
    assert caught.value.message == (
        f"signature {claimed} does not match computed signature {fs.sha1} "
        f"for FILESYSTEM image at {fs.url}"
    )
    assert stack.cloud.bucket_keys() == [] and stack.cloud.image_ids() == []
    listed = stack.imgstore_ls()[claimed]
    assert listed["state"] == "corrupt" and listed["cached_bytes"] == 0

    # The metadata itself, the same way.
    with pytest.raises(zeep.exceptions.Fault) as caught:
        service.RegisterImage(url=images.metadata_url, signature="0" * 40)
    assert caught.value.message == (
        f"signature {'0' * 40} does not match computed signature {images.metadata_sha1} "
        f"for metadata at {images.metadata_url}"
    )
    assert stack.cloud.bucket_keys() == [] and stack.cloud.image_ids() == []

    text = service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1)
    assert text.startswith("FILESYSTEM=")
