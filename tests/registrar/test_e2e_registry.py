"""End to end: the registry across calls and restarts — reuse, redo, recover.

- a part shared by two image sets is registered once, even when both arrive together;
- an image deregistered behind our back is noticed by the cheap check and redone;
- a registrar killed mid-registration leaves nothing behind once it is restarted, even when
  it died before the cloud's answer to RegisterImage reached it.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

from registrar.registry import Registry
from tests.registrar import e2e_stack
from tests.registrar.e2e_stack import Stack, register_in_background
from tests.registrar.soap_javaprops import loads
from tests.support.images import ImageFactory, metadata_xml
from tests.support.origin import Origin

stack, stack_factory = e2e_stack.stack, e2e_stack.stack_factory  # fixtures


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _stuck_in_pending(stack: Stack) -> bool:
    """Kernel and ramdisk are registered and their ids recorded in the registry's jobs."""
    if len(stack.cloud.calls_of("RegisterImage")) < 2:
        return False
    registry = Registry(stack.state_dir)
    try:
        jobs = registry.jobs()
    finally:
        registry.close()
    return len(jobs) == 2 and all(job.image_id for job in jobs)


def _folders(stack: Stack) -> set[str]:
    return {key.split("/", 1)[0] for key in stack.cloud.bucket_keys()}


def test_shared_kernel_and_ramdisk_are_registered_once_for_two_images(
    stack: Stack, origin: Origin, image_factory: ImageFactory
) -> None:
    images = image_factory.publish(origin, size_mib=16, fs_format="raw")
    fs, kernel = images.parts["FILESYSTEM"], images.parts["KERNEL"]
    # A second image set: the same filesystem and kernel, no ramdisk (so another machine image).
    other = metadata_xml([("FILESYSTEM", fs.sha1, fs.url), ("KERNEL", kernel.sha1, kernel.url)])
    other_url = origin.put("other/metadata.xml", other)
    import hashlib

    other_sha1 = hashlib.sha1(other).hexdigest()
    registrar = stack.start()
    answers: dict[str, dict[str, str]] = {}
    barrier = threading.Barrier(2, timeout=60)

    def call(url: str, sha1: str) -> None:
        service = stack.zeep(registrar)
        barrier.wait()
        answers[url] = loads(service.RegisterImage(url=url, signature=sha1))

    threads = [
        threading.Thread(target=call, args=(images.metadata_url, images.metadata_sha1)),
        threading.Thread(target=call, args=(other_url, other_sha1)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(170)
    first, second = answers[images.metadata_url], answers[other_url]
    assert first["KERNEL"] == second["KERNEL"] != ""
    assert second["RAMDISK"] == ""
    assert first["FILESYSTEM"] != second["FILESYSTEM"]
    # kernel, ramdisk, and one machine image per set
    assert len(stack.cloud.calls_of("RegisterImage")) == 4
    assert origin.bytes_sent(kernel.name) < kernel.path.stat().st_size + 64 * 1024


def test_image_deregistered_in_the_cloud_is_redone(
    stack: Stack, origin: Origin, image_factory: ImageFactory
) -> None:
    images = image_factory.publish(origin, size_mib=16, fs_format="raw")
    service = stack.zeep(stack.start())
    first = loads(service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1))
    old_folders = _folders(stack)
    origin_bytes = origin.bytes_sent()
    stack.cloud.ec2.deregister_image(ImageId=first["FILESYSTEM"])

    second = loads(service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1))
    assert second["FILESYSTEM"] != first["FILESYSTEM"]
    assert (second["KERNEL"], second["RAMDISK"]) == (first["KERNEL"], first["RAMDISK"])
    assert sorted(stack.cloud.image_ids()) == sorted(second.values())
    assert len(stack.cloud.calls_of("RegisterImage")) == 4
    # The cache served the redo: no new bytes from the origin.
    assert origin.bytes_sent() == origin_bytes
    # The vanished image's bundle was deleted, the new one is there: exactly three bundles.
    assert len(_folders(stack)) == 3
    assert len(_folders(stack) & old_folders) == 2


def test_registrar_killed_mid_registration_is_cleaned_up_and_redone(
    stack: Stack, origin: Origin, image_factory: ImageFactory
) -> None:
    images = image_factory.publish(origin, size_mib=16, fs_format="raw")
    stack.cloud.hold_pending = True  # kernel and ramdisk register but never become available
    registrar = stack.start()
    caller, outcome = register_in_background(
        stack.zeep(registrar), images.metadata_url, images.metadata_sha1
    )
    _wait_for(lambda: _stuck_in_pending(stack), "kernel and ramdisk registered, stuck pending")
    assert stack.cloud.image_ids() and stack.cloud.bucket_keys()
    registrar.stop(signal.SIGKILL)
    caller.join(60)
    assert outcome and not isinstance(outcome[0], str)  # the caller saw the connection drop
    kernel_pins = stack.imgstore_ls()[images.parts["KERNEL"].sha1]["pins"]
    assert kernel_pins, "the dead registrar's pin is still there before the restart"

    stack.cloud.hold_pending = False
    restarted = stack.start()
    # Before listening, the new registrar cleaned up what the dead one left.
    assert stack.cloud.image_ids() == []
    assert stack.cloud.bucket_keys() == []
    assert stack.imgstore_ls()[images.parts["KERNEL"].sha1]["pins"] == []
    assert "cleaned up 2 registrations" in restarted.log_text()

    answer = loads(
        stack.zeep(restarted).RegisterImage(url=images.metadata_url, signature=images.metadata_sha1)
    )
    assert sorted(stack.cloud.image_ids()) == sorted(answer.values())
    assert len(_folders(stack)) == 3


def test_registrar_killed_before_the_cloud_answered_register_leaves_no_image(
    stack: Stack, origin: Origin, image_factory: ImageFactory
) -> None:
    # The window between the cloud registering an image and the registrar saving its id.
    images = image_factory.publish(
        origin, size_mib=16, fs_format="raw", kernel=False, ramdisk=False
    )
    stack.cloud.hold_answer("RegisterImage")
    registrar = stack.start()
    caller, outcome = register_in_background(
        stack.zeep(registrar), images.metadata_url, images.metadata_sha1
    )
    _wait_for(lambda: len(stack.cloud.image_ids()) == 1, "the cloud registered the image")
    registrar.stop(signal.SIGKILL)
    caller.join(60)
    assert outcome and not isinstance(outcome[0], str)
    stack.cloud.answer_normally()

    restarted = stack.start()
    assert stack.cloud.image_ids() == []
    assert stack.cloud.bucket_keys() == []
    assert "cleaned up 1 registration" in restarted.log_text()
    answer = loads(
        stack.zeep(restarted).RegisterImage(url=images.metadata_url, signature=images.metadata_sha1)
    )
    assert stack.cloud.image_ids() == [answer["FILESYSTEM"]]


def test_sigterm_mid_registration_exits_promptly_and_the_next_start_cleans_up(
    stack: Stack, origin: Origin, image_factory: ImageFactory
) -> None:
    images = image_factory.publish(origin, size_mib=16, fs_format="raw")
    stack.cloud.hold_pending = True  # the kernel's registration hangs in "pending"
    registrar = stack.start()
    caller, outcome = register_in_background(
        stack.zeep(registrar), images.metadata_url, images.metadata_sha1
    )
    _wait_for(lambda: _stuck_in_pending(stack), "kernel and ramdisk registered, stuck pending")
    # systemd gives 30 s (TimeoutStopSec); the registrar must not wait for the stuck job.
    registrar.proc.send_signal(signal.SIGTERM)
    assert registrar.proc.wait(25) == 0
    caller.join(60)
    assert outcome and not isinstance(outcome[0], str)

    stack.cloud.hold_pending = False
    restarted = stack.start()
    assert stack.cloud.image_ids() == []
    assert stack.cloud.bucket_keys() == []
    answer = loads(
        stack.zeep(restarted).RegisterImage(url=images.metadata_url, signature=images.metadata_sha1)
    )
    assert sorted(stack.cloud.image_ids()) == sorted(answer.values())
