"""`kill -9` of the imgstore daemon while the registrar reads an image through the mount.

The registration in flight ends in a fault naming the image (its read failed), and leaves no
object in the bucket and no image. After the operator's restart of the mount (the dead mount
cleaned up), the next identical request succeeds: the image verifies, and the bucket holds
exactly the one bundle of the answer.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import zeep.exceptions

from tests.registrar import e2e_stack
from tests.registrar.e2e_stack import IMGSTORE, Stack, register_in_background
from tests.support.faulty import Faults
from tests.support.images import ImageFactory

stack, stack_factory = e2e_stack.stack, e2e_stack.stack_factory  # fixtures


class _Publisher:
    """faulty_origin with the `put(name, data) -> url` that image_factory.publish expects."""

    def __init__(self, faulty) -> None:
        self.faulty = faulty

    def put(self, name: str, data: bytes | Path) -> str:
        return self.faulty.add(name, data.read_bytes() if isinstance(data, Path) else data)


def _wait_paused(faulty, name: str, timeout: float = 60.0) -> None:
    """Poll until one of the requests for `name` is stalled (readahead runs several at once)."""
    deadline = time.monotonic() + timeout
    while not any(entry["state"] == "paused" for entry in faulty.log(name)):
        assert time.monotonic() < deadline, f"no stalled request for {name}: {faulty.log(name)}"
        time.sleep(0.02)


def test_imgstore_killed_mid_read_then_the_same_request_succeeds(
    stack: Stack, faulty_origin, image_factory: ImageFactory, fuse_mount
) -> None:
    images = image_factory.publish(
        _Publisher(faulty_origin), size_mib=16, fs_format="raw", kernel=False, ramdisk=False
    )
    fs = images.parts["FILESYSTEM"]
    # Requests 1 and 2 are the probe of the add (a HEAD, then one ranged byte); request 3 (the
    # first chunk) stalls mid-body.
    faulty_origin.program(fs.name, Faults(), Faults(), Faults(stall=60.0, stall_at=64 * 1024))
    service = stack.zeep(stack.start())
    caller, outcome = register_in_background(service, images.metadata_url, images.metadata_sha1)
    _wait_paused(faulty_origin, fs.name)  # the read is provably in flight
    stack.mount.kill()
    stack.mount.wait()
    caller.join(120)
    assert not caller.is_alive()
    assert isinstance(outcome[0], zeep.exceptions.Fault), outcome
    message = str(outcome[0].message)
    # The kernel says ECONNABORTED to a read in flight when the FUSE daemon dies, and ENOTCONN
    # to one that starts after; which one the registrar meets depends on timing.
    assert message in (
        f"cannot read FILESYSTEM image at {fs.url} through imgstore: {reason}"
        for reason in ("Software caused connection abort", "Transport endpoint is not connected")
    )
    assert stack.cloud.bucket_keys() == [] and stack.cloud.image_ids() == []

    # The operator restarts the mount: the dead one is cleaned up, the cache kept.
    subprocess.run(["fusermount3", "-u", "-z", str(stack.mountpoint)], check=False)
    fuse_mount(
        [*IMGSTORE, "mount", "--foreground", "--config", str(stack.config), str(stack.mountpoint)],
        stack.mountpoint,
    )
    text = service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1)
    image_id = re.search(r"^FILESYSTEM=(\S+)$", text, re.M).group(1)  # type: ignore[union-attr]
    assert stack.cloud.image_ids() == [image_id]
    folders = {key.split("/", 1)[0] for key in stack.cloud.bucket_keys()}
    assert len(folders) == 1  # the answer's bundle, no orphan from the killed attempt
    assert stack.imgstore_ls()[fs.sha1]["state"] == "verified"
