"""The cloud fails at each step of a registration, seen through SOAP.

One registrar, one image (a filesystem only); the S3 side goes through a fault proxy
(tests/faults/s3_faults.py) and EC2 through the stand-in cloud's own refusals. Each step's
failure is a SOAP fault naming the image, its URL and the step; afterwards the bucket holds no
object and no image is registered (both listed to prove it). Then the same request succeeds.
"""

from __future__ import annotations

import signal

import pytest
import zeep.exceptions

from tests.faults.s3_faults import S3Faults
from tests.faults.site import set_keys
from tests.registrar import e2e_stack
from tests.registrar.e2e_stack import Stack, register_in_background
from tests.support.cloud import S3_PATH
from tests.support.images import ImageFactory, ImageSet
from tests.support.origin import Origin

stack, stack_factory = e2e_stack.stack, e2e_stack.stack_factory  # fixtures


@pytest.fixture
def s3_faults(stack: Stack):
    proxy = S3Faults(stack.cloud.s3_url.removesuffix(S3_PATH))
    yield proxy
    proxy.close()


def _kill_mid_bundle(stack: Stack, s3_faults: S3Faults, images: ImageSet) -> None:
    """Start a registrar, and kill it (SIGKILL) with the parts uploaded and the manifest held."""
    set_keys(stack, "cloud", s3_url=s3_faults.url + S3_PATH)
    s3_faults.hold = "manifest upload"  # the parts are in the bucket by then
    registrar = stack.start()
    caller, outcome = register_in_background(
        stack.zeep(registrar), images.metadata_url, images.metadata_sha1
    )
    assert s3_faults.held.wait(60), "no manifest upload arrived"
    assert any(".part." in key for key in stack.cloud.bucket_keys())
    registrar.stop(signal.SIGKILL)  # mid-bundle: parts uploaded, the manifest in flight
    caller.join(60)
    assert outcome and not isinstance(outcome[0], str)
    s3_faults.hold = None
    s3_faults.release.set()


def _fault(service: object, url: str, signature: str) -> str:
    with pytest.raises(zeep.exceptions.Fault) as caught:
        service.RegisterImage(url=url, signature=signature)  # type: ignore[attr-defined]
    return str(caught.value.message)


def test_each_cloud_step_failing_is_a_fault_naming_it_and_leaves_nothing(
    stack: Stack, s3_faults: S3Faults, origin: Origin, image_factory: ImageFactory
) -> None:
    images = image_factory.publish(
        origin, size_mib=16, fs_format="raw", kernel=False, ramdisk=False
    )
    fs = images.parts["FILESYSTEM"]
    set_keys(stack, "cloud", s3_url=s3_faults.url + S3_PATH, register_timeout=1.0)
    service = stack.zeep(stack.start())
    prefix = f"registering the FILESYSTEM image from {fs.url} failed: "

    for step in ("bucket create", "part upload", "manifest upload"):
        s3_faults.refuse = step
        message = _fault(service, images.metadata_url, images.metadata_sha1)
        assert message == (f"{prefix}{step}: AccessDenied: {step} refused by the fault proxy"), step
        assert stack.cloud.bucket_keys() == [], step
        assert stack.cloud.image_ids() == [], step
    assert s3_faults.refused >= 3
    s3_faults.refuse = None

    # The image never becomes available within register_timeout: deregistered, bundle deleted.
    stack.cloud.hold_pending = True
    message = _fault(service, images.metadata_url, images.metadata_sha1)
    assert message.startswith(prefix + "waiting for available: ")
    assert "pending" in message
    assert stack.cloud.bucket_keys() == []
    assert stack.cloud.image_ids() == []
    assert len(stack.cloud.calls_of("RegisterImage")) == 1
    assert len(stack.cloud.calls_of("DeregisterImage")) == 1
    stack.cloud.hold_pending = False

    # Nothing half done spoils the next identical request.
    text = service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1)
    assert text.startswith("FILESYSTEM=")
    assert len(stack.cloud.image_ids()) == 1
    assert any(key.endswith(".manifest.xml") for key in stack.cloud.bucket_keys())

    # RegisterImage refused (a new image, so the registry does not answer it).
    other = image_factory.publish(
        origin, size_mib=16, seed=5, fs_format="raw", kernel=False, ramdisk=False, prefix="o-"
    )
    keys_before, images_before = stack.cloud.bucket_keys(), stack.cloud.image_ids()
    stack.cloud.refuse("RegisterImage", "InvalidManifest", "manifest signature is invalid")
    message = _fault(service, other.metadata_url, other.metadata_sha1)
    assert message == (
        f"registering the FILESYSTEM image from {other.parts['FILESYSTEM'].url} failed: "
        "RegisterImage: InvalidManifest: manifest signature is invalid"
    )
    assert stack.cloud.bucket_keys() == keys_before
    assert stack.cloud.image_ids() == images_before


def test_registrar_killed_mid_bundle_leaves_no_orphans_and_the_request_is_redone(
    stack: Stack, s3_faults: S3Faults, origin: Origin, image_factory: ImageFactory
) -> None:
    images = image_factory.publish(
        origin, size_mib=16, fs_format="raw", kernel=False, ramdisk=False
    )
    _kill_mid_bundle(stack, s3_faults, images)

    restarted = stack.start()
    # Before listening, the new registrar deleted the dead one's parts.
    assert stack.cloud.bucket_keys() == [] and stack.cloud.image_ids() == []
    assert "cleaned up 1 registrations" in restarted.log_text()
    text = stack.zeep(restarted).RegisterImage(
        url=images.metadata_url, signature=images.metadata_sha1
    )
    assert text.startswith("FILESYSTEM=")
    assert len(stack.cloud.image_ids()) == 1
    assert len({key.split("/", 1)[0] for key in stack.cloud.bucket_keys()}) == 1


def test_a_dead_registrars_job_whose_cleanup_fails_is_a_fault_naming_the_image_then_redone(
    stack: Stack, s3_faults: S3Faults, origin: Origin, image_factory: ImageFactory
) -> None:
    images = image_factory.publish(
        origin, size_mib=16, fs_format="raw", kernel=False, ramdisk=False
    )
    fs = images.parts["FILESYSTEM"]
    _kill_mid_bundle(stack, s3_faults, images)  # parts in the bucket, a job left behind
    left = stack.cloud.bucket_keys()

    # The cloud refuses the cleanup: the registrar starts all the same and says why it left
    # the job; a call for the image is a fault naming it and the step, not a bare cloud error.
    s3_faults.refuse = "bucket list"
    restarted = stack.start()
    assert "will at its next claim" in restarted.log_text()
    service = stack.zeep(restarted)
    message = _fault(service, images.metadata_url, images.metadata_sha1)
    assert message == (
        f"registering the FILESYSTEM image from {fs.url} failed: "
        "list: AccessDenied: bucket list refused by the fault proxy"
    )
    assert stack.cloud.bucket_keys() == left and stack.cloud.image_ids() == []

    # Once the cloud answers, the next call cleans up the dead job's parts and registers.
    s3_faults.refuse = None
    text = service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1)
    assert text.startswith("FILESYSTEM=")
    assert len(stack.cloud.image_ids()) == 1
    assert not set(left) & set(stack.cloud.bucket_keys())


def test_a_registration_whose_answer_was_lost_is_found_by_name_and_undone(
    stack: Stack, origin: Origin, image_factory: ImageFactory
) -> None:
    # The cloud registers the image but the registrar never hears it: it gets 503s (botocore
    # retries, and every attempt registers again).
    images = image_factory.publish(
        origin, size_mib=16, fs_format="raw", kernel=False, ramdisk=False
    )
    fs = images.parts["FILESYSTEM"]
    service = stack.zeep(stack.start())
    stack.cloud.lose_answer("RegisterImage")
    message = _fault(service, images.metadata_url, images.metadata_sha1)
    assert message.startswith(
        f"registering the FILESYSTEM image from {fs.url} failed: RegisterImage: "
    )
    assert "ServiceUnavailable" in message
    assert len(stack.cloud.calls_of("RegisterImage")) >= 1
    assert len(stack.cloud.calls_of("DeregisterImage")) >= 1
    assert stack.cloud.image_ids() == []
    assert stack.cloud.bucket_keys() == []

    stack.cloud.answer_normally()
    text = service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1)
    assert text.startswith("FILESYSTEM=")
    assert len(stack.cloud.image_ids()) == 1
