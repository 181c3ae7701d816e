"""End to end: a call whose work outlasts a minute is still answered.

ORCA waits up to `ec2.img.proxy.timeout` (3600 s) for one RegisterImage call; nothing on the
server side may cut it sooner. The kernel comes from an origin that trickles it out over just
over 60 s (imgstore's read deadline is raised to allow that), and zeep waits with a raised timeout.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from tests.registrar import e2e_stack
from tests.registrar.soap_javaprops import loads
from tests.support.faulty import FaultyOrigin
from tests.support.images import ImageFactory, metadata_xml
from tests.support.origin import Origin

stack, stack_factory = e2e_stack.stack, e2e_stack.stack_factory  # fixtures

KERNEL_BYTES = 64 * 1024
PIECE = 1024  # one piece a second: about 64 s for the kernel, just past the minute


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_call_outlasting_a_minute_is_answered(
    stack_factory: object,
    origin: Origin,
    faulty_origin: FaultyOrigin,
    image_factory: ImageFactory,
) -> None:
    stack = stack_factory(store={"read_deadline": 300})  # type: ignore[operator]
    fs_path = image_factory.ext4(16)
    fs_url = origin.put("filesystem.img", fs_path)
    kernel = os.urandom(KERNEL_BYTES)
    kernel_url = faulty_origin.add("vmlinuz", kernel)
    faulty_origin.program("vmlinuz", throttle=1.0, piece=PIECE)
    metadata = metadata_xml(
        [
            ("FILESYSTEM", image_factory.sha1(fs_path), fs_url),
            ("KERNEL", hashlib.sha1(kernel).hexdigest(), kernel_url),
        ]
    )
    metadata_url = origin.put("metadata.xml", metadata)

    service = stack.zeep(stack.start(), timeout=350)
    answer = loads(
        service.RegisterImage(url=metadata_url, signature=hashlib.sha1(metadata).hexdigest())
    )
    assert answer["KERNEL"] and answer["FILESYSTEM"] and answer["RAMDISK"] == ""
    assert sorted(stack.cloud.image_ids()) == sorted([answer["KERNEL"], answer["FILESYSTEM"]])
    # The kernel really was trickled: the whole of it came through the throttled origin.
    assert faulty_origin.bytes_sent("vmlinuz") >= KERNEL_BYTES
    assert any(entry["state"] == "done" for entry in faulty_origin.log("vmlinuz"))
