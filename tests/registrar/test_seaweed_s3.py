"""The registrar against a real S3 with authentication: SeaweedFS (tests/support/seaweed.py).

S3 goes to SeaweedFS, which checks every SigV4 signature; EC2 stays moto behind the recording
proxy (moto does not look at ImageLocation, and the proxy reads each manifest from SeaweedFS to
check it). Every bundle is downloaded back from SeaweedFS, unbundled and compared with its
source.

Not checked here, because SeaweedFS cannot show it: SeaweedFS stores no canned ACL, and it
refuses botocore's SigV2 on bucket-level requests. The `aws-exec-read` ACL is checked by
`check_bundle` on every upload through the recording proxy in front of moto
(tests/registrar/test_install_image_cli.py, test_e2e_register.py, …), and SigV2 by
`test_cloud_config.py::test_cloud_from_a_eucarc_with_sigv2_uploads_registers_and_cleans_up`.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.s3_faults import S3Faults
from tests.faults.site import set_keys
from tests.registrar import e2e_stack
from tests.registrar.bundle_check import check_bundle
from tests.registrar.e2e_stack import Stack
from tests.registrar.soap_javaprops import loads
from tests.registrar.test_install_image_cli import install_image, one_line_error
from tests.support.cloud import StandInCloud
from tests.support.images import ImageFactory
from tests.support.origin import Origin
from tests.support.seaweed import SeaweedS3

stack, stack_factory = e2e_stack.stack, e2e_stack.stack_factory  # fixtures


@dataclasses.dataclass
class SeaweedView:
    """What `check_bundle` reads of a cloud, with S3 being SeaweedFS."""

    s3: Any
    account_id: str
    cloud_key: Path
    user_key: Path
    user_cert: Path
    s3_requests: list[tuple[str, str, str | None]] = dataclasses.field(default_factory=list)


@pytest.fixture
def on_seaweed(cloud: StandInCloud, seaweed: SeaweedS3) -> SeaweedView:
    """The stand-in cloud with its manifests read from SeaweedFS; the view to unbundle from."""
    cloud.read_manifests_from(seaweed.client())
    return SeaweedView(
        seaweed.client(), cloud.account_id, cloud.cloud_key, cloud.user_key, cloud.user_cert
    )


def _s3_keys(seaweed: SeaweedS3, **override: str) -> dict[str, str]:
    keys = {"s3_url": seaweed.url, "access_key": seaweed.access_key}
    keys["secret_key"] = seaweed.secret_key
    keys.update(override)
    return keys


def _check(view: SeaweedView, location: str, source_sha1: str) -> Any:
    checked = check_bundle(view, location, signed=True, acl=False)
    assert checked.image_sha1 == source_sha1
    return checked


def test_install_image_uploads_a_bundle_seaweedfs_accepts_and_serves_back(
    cloud: StandInCloud,
    seaweed: SeaweedS3,
    on_seaweed: SeaweedView,
    tmp_path: Path,
    image_factory: ImageFactory,
) -> None:
    config = cloud.write_config(tmp_path / "c.toml", **_s3_keys(seaweed))
    kernel = image_factory.blob(2 * 1024 * 1024, seed=21, kind="kernel")
    machine = image_factory.blob(22 << 20, seed=22)  # random, so three 10 MiB parts
    done = install_image("--config", config, "--type", "kernel", kernel)
    assert done.returncode == 0, done.stderr
    kernel_id = done.stdout.strip()
    done = install_image("--config", config, "--kernel", kernel_id, machine)
    assert done.returncode == 0, done.stderr
    kernel_call, machine_call = cloud.calls_of("RegisterImage")
    assert machine_call["KernelId"] == kernel_id
    assert _check(on_seaweed, kernel_call["ImageLocation"], image_factory.sha1(kernel))
    checked = _check(on_seaweed, machine_call["ImageLocation"], image_factory.sha1(machine))
    assert len(checked.part_keys) == 3 and checked.kernel_id == kernel_id
    assert len(seaweed.bucket_keys(cloud.bucket)) == 2 + 4  # parts and manifests
    assert cloud.s3_requests == []  # no S3 request went to moto


def test_soap_registers_a_machine_image_with_kernel_and_ramdisk_on_seaweedfs(
    stack: Stack,
    seaweed: SeaweedS3,
    on_seaweed: SeaweedView,
    origin: Origin,
    image_factory: ImageFactory,
) -> None:
    images = image_factory.publish(origin, size_mib=16, seed=23, fs_format="raw")
    set_keys(stack, "cloud", **_s3_keys(seaweed))
    service = stack.zeep(stack.start())
    answer = loads(service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1))
    calls = stack.cloud.calls_of("RegisterImage")
    assert len(calls) == 3
    [machine] = [call for call in calls if "KernelId" in call]
    assert (machine["KernelId"], machine["RamdiskId"]) == (answer["KERNEL"], answer["RAMDISK"])
    assert sorted(stack.cloud.image_ids()) == sorted(answer.values())
    kinds = {"machine": "FILESYSTEM", "kernel": "KERNEL", "ramdisk": "RAMDISK"}
    seen = []
    for call in calls:
        checked = check_bundle(on_seaweed, call["ImageLocation"], signed=True, acl=False)
        kind = kinds[checked.image_type]
        assert checked.image_sha1 == images.parts[kind].sha1, kind
        seen.append(kind)
        if kind == "FILESYSTEM":
            assert (checked.kernel_id, checked.ramdisk_id) == (answer["KERNEL"], answer["RAMDISK"])
    assert sorted(seen) == ["FILESYSTEM", "KERNEL", "RAMDISK"]


@pytest.mark.parametrize(
    ("override", "cause"),
    [
        (
            {"secret_key": "not-the-secret-key"},
            "SignatureDoesNotMatch: The request signature we calculated does not match the "
            "signature you provided. Check your key and signing method.",
        ),
        (
            {"access_key": "nobody-has-this-key"},
            "InvalidAccessKeyId: The access key ID you provided does not exist in our records.",
        ),
    ],
    ids=["wrong-secret-key", "unknown-access-key"],
)
def test_wrong_credentials_name_the_cause_in_one_line_and_upload_nothing(
    cloud: StandInCloud,
    seaweed: SeaweedS3,
    on_seaweed: SeaweedView,
    tmp_path: Path,
    image_factory: ImageFactory,
    override: dict[str, str],
    cause: str,
) -> None:
    seaweed.client().create_bucket(Bucket=cloud.bucket)
    config = cloud.write_config(tmp_path / "c.toml", **_s3_keys(seaweed, **override))
    kernel = image_factory.blob(1024 * 1024, seed=24, kind="kernel")
    done = install_image("--config", config, "--type", "kernel", kernel)
    assert done.returncode == 1
    # The bucket check is a HEAD, whose 403 has no body; the cause comes from a listing.
    assert one_line_error(done) == f"registrar: error: bucket check: {cause}"
    assert seaweed.bucket_keys(cloud.bucket) == []
    assert cloud.calls_of("RegisterImage") == []


@pytest.fixture
def s3_faults(seaweed: SeaweedS3) -> Iterator[S3Faults]:
    proxy = S3Faults(seaweed.url)
    yield proxy
    proxy.close()


def test_an_interrupted_upload_leaves_nothing_on_seaweedfs(
    cloud: StandInCloud,
    seaweed: SeaweedS3,
    on_seaweed: SeaweedView,
    s3_faults: S3Faults,
    tmp_path: Path,
    image_factory: ImageFactory,
) -> None:
    # The parts are up and the manifest is in flight (held by the proxy) when the operator
    # presses Ctrl-C. Deletes go through the proxy too: signed for its address, as sent.
    config = cloud.write_config(tmp_path / "c.toml", **_s3_keys(seaweed, s3_url=s3_faults.url))
    machine = image_factory.blob(22 << 20, seed=25)  # three parts
    s3_faults.hold = "manifest upload"
    proc = subprocess.Popen(
        ["registrar", "install-image", "--config", str(config), str(machine)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C at a terminal reaches a process whose SIGINT is at its default. A suite run
        # as a background job of a script has SIGINT ignored (POSIX shells do that), and a
        # child keeps an ignored signal across exec: it would never see this one.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        held = s3_faults.held.wait(60)
        parts = seaweed.bucket_keys(cloud.bucket)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        s3_faults.release.set()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert held, f"no manifest upload arrived: {stderr}"
    assert len(parts) == 3, parts
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == (
        "registrar: error: interrupted; what was uploaded has been removed"
    )
    assert seaweed.bucket_keys(cloud.bucket) == []
    assert cloud.calls_of("RegisterImage") == []
