"""Bundles that Eucalyptus would accept, uploaded to and registered with the stand-in cloud.

Each bundle is taken apart by tests/registrar/bundle_check.py from what S3 holds.
"""

from __future__ import annotations

import filecmp
import os
from pathlib import Path

import pytest

from registrar import config as registrar_config
from registrar.clouds.euca_api import Cloud
from registrar.errors import (
    CloudError,
    ImageChecksumMismatch,
    ImageFailed,
    RegistrationTimeout,
)
from registrar.install import ImageFile, Installed, install_image, install_set
from registrar.manifest import BundleKeys
from tests.registrar.bundle_check import check_bundle
from tests.support.cloud import StandInCloud
from tests.support.images import ImageFactory

WRONG_SHA1 = "0" * 40


def connect(cloud: StandInCloud, tmp_path: Path, **settings: object) -> tuple[Cloud, BundleKeys]:
    config = registrar_config.load(cloud.write_config(tmp_path / "registrar.toml", **settings))
    cfg = config.require_cloud()
    return Cloud.from_config(config), BundleKeys.load(cfg.cloud_cert, cfg.user_cert, cfg.user_key)


def install_machine(
    cloud: StandInCloud,
    remote: Cloud,
    keys: BundleKeys,
    path: Path,
    label: str,
    sha1: str,
    *,
    decompress: bool = False,
) -> Installed:
    """Install the file at `path` as an x86_64 machine image, as `install-image` does."""
    with open(path, "rb") as stream:
        return install_image(
            remote,
            keys,
            stream,
            label=label,
            image_type="machine",
            arch="x86_64",
            expected_sha1=sha1,
            account_id=cloud.account_id,
            decompress=decompress,
        )


def test_machine_image_with_kernel_and_ramdisk(
    cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory
) -> None:
    machine = image_factory.ext4(size_mib=32, seed=4)
    kernel = image_factory.blob(5 * 1024 * 1024 + 7, seed=1, kind="kernel")
    ramdisk = image_factory.blob(3 * 1024 * 1024 + 3, seed=2, kind="ramdisk")
    sha1 = image_factory.sha1
    remote, keys = connect(cloud, tmp_path)

    done = install_set(
        remote,
        keys,
        account_id=cloud.account_id,
        arch="x86_64",
        machine=ImageFile(machine, sha1(machine)),
        kernel=ImageFile(kernel, sha1(kernel)),
        ramdisk=ImageFile(ramdisk, sha1(ramdisk)),
    )

    for kind, path in (("kernel", kernel), ("ramdisk", ramdisk), ("machine", machine)):
        checked = check_bundle(cloud, done[kind].location, signed=True, out=tmp_path / kind)
        assert checked.image_type == kind
        assert checked.image_sha1 == sha1(path)
        assert checked.image_size == path.stat().st_size
        assert filecmp.cmp(tmp_path / kind, path, shallow=False)
    # Kernel and ramdisk first; the machine image's registration and manifest name their ids.
    registered = cloud.calls_of("RegisterImage")
    assert [call["ImageLocation"] for call in registered] == [
        done["kernel"].location,
        done["ramdisk"].location,
        done["machine"].location,
    ]
    assert "KernelId" not in registered[0] and "RamdiskId" not in registered[1]
    assert registered[2]["KernelId"] == done["kernel"].image_id
    assert registered[2]["RamdiskId"] == done["ramdisk"].image_id
    machine_manifest = check_bundle(cloud, done["machine"].location, signed=True)
    assert machine_manifest.kernel_id == done["kernel"].image_id
    assert machine_manifest.ramdisk_id == done["ramdisk"].image_id
    assert sorted(cloud.image_ids()) == sorted(d.image_id for d in done.values())
    # The images were seen available before install returned.
    described = {c.get("ImageId.1") for c in cloud.calls_of("DescribeImages")}
    assert {d.image_id for d in done.values()} <= described


def test_multi_part_bundle_has_10_mib_parts(
    cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory
) -> None:
    blob = image_factory.blob(27 * 1024 * 1024, seed=7)  # incompressible: three parts
    remote, keys = connect(cloud, tmp_path)
    installed = install_machine(cloud, remote, keys, blob, "blob", image_factory.sha1(blob))
    checked = check_bundle(cloud, installed.location, signed=True)
    assert len(checked.part_keys) == 3
    assert checked.image_sha1 == image_factory.sha1(blob)
    assert sorted(cloud.bucket_keys()) == sorted(
        [*checked.part_keys, installed.location.partition("/")[2]]
    )


def test_unsigned_manifest_without_user_key_or_cert(
    cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory
) -> None:
    image = image_factory.ext4(size_mib=8, seed=5)
    remote, keys = connect(cloud, tmp_path, signed=False, user_cert=False)
    installed = install_machine(cloud, remote, keys, image, "unsigned", image_factory.sha1(image))
    checked = check_bundle(cloud, installed.location, signed=False, user_copy=False)
    assert checked.image_sha1 == image_factory.sha1(image)


@pytest.mark.parametrize("fmt", ["gz", "bz2", "xz", "Z"])
def test_zfilesystem_is_unpacked_before_bundling(
    fmt: str, cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory
) -> None:
    raw = image_factory.ext4(size_mib=16, seed=6)
    packed = image_factory.compressed(fmt, size_mib=16, seed=6)
    remote, keys = connect(cloud, tmp_path)
    installed = install_machine(
        cloud, remote, keys, packed, packed.name, image_factory.sha1(packed), decompress=True
    )
    checked = check_bundle(cloud, installed.location, signed=True)
    assert checked.image_sha1 == image_factory.sha1(raw)
    assert checked.image_size == raw.stat().st_size


def test_sparse_tar_member_is_unbundled_with_its_holes(
    cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory
) -> None:
    raw = image_factory.ext4(size_mib=24, seed=8)
    tarball = image_factory.sparse_tar_gz(size_mib=24, seed=8)
    remote, keys = connect(cloud, tmp_path)
    installed = install_machine(
        cloud, remote, keys, tarball, "sparse", image_factory.sha1(tarball), decompress=True
    )
    out = tmp_path / "unbundled"
    checked = check_bundle(cloud, installed.location, signed=True, out=out)
    assert checked.image_size == raw.stat().st_size == out.stat().st_size
    assert filecmp.cmp(out, raw, shallow=False)
    # The holes are zeros that the unbundler could leave unallocated, as in the original.
    assert out.stat().st_blocks * 512 < out.stat().st_size
    assert checked.image_sha1 == image_factory.sha1(raw)


def test_wrong_sha1_stops_before_the_manifest_and_leaves_the_bucket_empty(
    cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory
) -> None:
    # Big enough that full parts stream out before the end, whatever blocks are in flight.
    blob = image_factory.blob(44 * 1024 * 1024, seed=9)
    remote, keys = connect(cloud, tmp_path)
    with pytest.raises(ImageChecksumMismatch) as caught:
        install_machine(cloud, remote, keys, blob, "wrong", WRONG_SHA1)
    assert image_factory.sha1(blob) in str(caught.value)
    puts = [path for method, path, _ in cloud.s3_requests if method == "PUT" and "." in path]
    # Full parts went up while bundling (that is the streaming) but no manifest ever did …
    assert any(path.endswith(".part.00") for path in puts)
    assert not any(path.endswith(".manifest.xml") for path in puts)
    # … and the last part was never made: the mismatch is found before the gzip trailer.
    assert not any(path.endswith(".part.04") for path in puts)
    assert cloud.bucket_keys() == []
    assert cloud.calls_of("RegisterImage") == []


def test_wrong_sha1_of_a_compressed_image_uploads_nothing(
    cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory
) -> None:
    packed = image_factory.compressed("gz", size_mib=16, seed=6)
    remote, keys = connect(cloud, tmp_path)
    with pytest.raises(ImageChecksumMismatch):
        install_machine(cloud, remote, keys, packed, "wrong", WRONG_SHA1, decompress=True)
    assert [r for r in cloud.s3_requests if r[0] == "PUT" and ".part." in r[1]] == []
    assert cloud.bucket_keys() == []


def test_refused_register_image_leaves_the_bucket_empty(
    cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory
) -> None:
    image = image_factory.ext4(size_mib=8, seed=5)
    cloud.refuse("RegisterImage", "InvalidParameterValue", "Invalid value for Architecture")
    remote, keys = connect(cloud, tmp_path)
    with pytest.raises(CloudError) as caught:
        install_machine(cloud, remote, keys, image, "refused", image_factory.sha1(image))
    assert caught.value.step == "RegisterImage"
    assert caught.value.code == "InvalidParameterValue"
    assert "Invalid value for Architecture" in str(caught.value)
    assert any(p.endswith(".manifest.xml") for m, p, _ in cloud.s3_requests if m == "PUT")
    assert cloud.bucket_keys() == []
    assert cloud.image_ids() == []


def test_image_never_available_is_deregistered_and_deleted(
    cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory
) -> None:
    image = image_factory.ext4(size_mib=8, seed=5)
    cloud.hold_pending = True
    remote, keys = connect(cloud, tmp_path, register_timeout=0.3)
    with pytest.raises(RegistrationTimeout) as caught:
        install_machine(cloud, remote, keys, image, "stuck", image_factory.sha1(image))
    assert caught.value.step == "waiting for available"
    [registered] = cloud.calls_of("RegisterImage")
    [deregistered] = cloud.calls_of("DeregisterImage")
    assert deregistered["ImageId"] in str(caught.value)
    assert cloud.image_ids() == []
    assert cloud.bucket_keys() == []
    assert registered["ImageLocation"].startswith(f"{cloud.bucket}/")


def test_image_the_cloud_marks_failed_is_deregistered_and_deleted(
    cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory
) -> None:
    image = image_factory.ext4(size_mib=8, seed=5)
    cloud.report_image_state("failed")
    remote, keys = connect(cloud, tmp_path)
    with pytest.raises(ImageFailed, match="is failed"):
        install_machine(cloud, remote, keys, image, "failed", image_factory.sha1(image))
    assert len(cloud.calls_of("DeregisterImage")) == 1
    assert cloud.image_ids() == [] and cloud.bucket_keys() == []


def test_reinstalling_the_same_image_never_collides(
    cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory
) -> None:
    image = image_factory.ext4(size_mib=8, seed=5)
    remote, keys = connect(cloud, tmp_path)
    installed = []
    for _ in range(2):
        installed.append(
            install_machine(cloud, remote, keys, image, "same", image_factory.sha1(image))
        )
    first, second = installed
    assert first.name != second.name and first.folder != second.folder
    assert first.image_id != second.image_id
    for item in installed:
        check_bundle(cloud, item.location, signed=True)
    assert os.path.commonprefix([first.name, second.name]).startswith("same-")
