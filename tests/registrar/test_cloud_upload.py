"""Part uploads run in parallel, with a bounded number in flight."""

from __future__ import annotations

from pathlib import Path

from registrar import config as registrar_config
from registrar.clouds.euca_api import Cloud
from registrar.install import install_image
from registrar.manifest import BundleKeys
from tests.registrar.bundle_check import check_bundle
from tests.support.cloud import StandInCloud
from tests.support.images import ImageFactory


def install_blob(cloud: StandInCloud, tmp_path: Path, blob: Path, sha1: str, **settings: object):
    config = registrar_config.load(cloud.write_config(tmp_path / "c.toml", **settings))
    cfg = config.require_cloud()
    keys = BundleKeys.load(cfg.cloud_cert, cfg.user_cert, cfg.user_key)
    with open(blob, "rb") as stream:
        return install_image(
            Cloud.from_config(config),
            keys,
            stream,
            label="parallel",
            image_type="machine",
            arch="x86_64",
            expected_sha1=sha1,
            account_id=cloud.account_id,
        )


def test_parts_upload_in_parallel(
    cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory
) -> None:
    blob = image_factory.blob(44 * 1024 * 1024, seed=21)  # five parts
    cloud.expect_parallel_parts(3)
    installed = install_blob(cloud, tmp_path, blob, image_factory.sha1(blob), upload_concurrency=4)
    assert cloud.parallel_parts_result == "tripped"  # three part PUTs were in flight at once
    check_bundle(cloud, installed.location, signed=True)


def test_parts_in_flight_are_bounded(
    cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory
) -> None:
    blob = image_factory.blob(44 * 1024 * 1024, seed=21)
    # With two upload slots a third part never starts while two are held: the bundler waits.
    cloud.expect_parallel_parts(3, timeout=2.0)
    installed = install_blob(cloud, tmp_path, blob, image_factory.sha1(blob), upload_concurrency=2)
    assert cloud.parallel_parts_result == "broken"
    check_bundle(cloud, installed.location, signed=True)
