"""registrar/clouds/glance_api.py against a real Glance (and Keystone): what Glance stores, checks
and refuses, and what is left behind after a failure."""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from registrar import config as config_mod
from registrar.clouds.glance_api import CHUNK_SIZE, PART_FORMATS, OpenStackCloud
from registrar.config import OpenStackConfig
from registrar.errors import CloudError, ConfigError, RegistrationTimeout
from tests.support.glance_proxy import GlanceProxy
from tests.support.openstack import (
    GlanceServer,
    KeystoneGlance,
    download_image,
    free_port,
    make_qcow2,
)


def _data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _noauth(glance_url: str, **extra: object) -> OpenStackCloud:
    cfg = config_mod.parse(
        {"cloud": {"type": "openstack", "auth_type": "none", "glance_url": glance_url, **extra}},
        base_dir=Path("/"),
    ).cloud
    assert isinstance(cfg, OpenStackConfig)
    return OpenStackCloud.from_config(cfg)


def _register(cloud: OpenStackCloud, data: bytes, part: str, **props: str) -> str:
    disk, container = PART_FORMATS[part]
    return cloud.register_stream(
        io.BytesIO(data),
        name=f"test-{part.lower()}",
        disk_format=disk,
        container_format=container,
        properties=props,
        timeout=30,
    )


@pytest.fixture(scope="module")
def noauth(glance_noauth: GlanceServer) -> OpenStackCloud:
    return _noauth(glance_noauth.url)


# --- what Glance stores ---


def test_each_part_type_is_stored_byte_for_byte_with_its_formats_and_properties(
    noauth: OpenStackCloud, glance_noauth: GlanceServer, tmp_path: Path
) -> None:
    parts = {
        "KERNEL": _data(300_000, 1),
        "RAMDISK": _data(200_000, 2),
        "FILESYSTEM": _data(3 * CHUNK_SIZE + 12345, 3),
        "QCOW2": make_qcow2(tmp_path / "d.qcow2", _data(100_000, 4)).read_bytes(),
    }
    ids = {}
    for part, data in parts.items():
        props = {"imageproxy_sha1": hashlib.sha1(data).hexdigest(), "imageproxy_part": part}
        if part == "FILESYSTEM":
            props |= {"kernel_id": ids["KERNEL"], "ramdisk_id": ids["RAMDISK"]}
        ids[part] = _register(noauth, data, part, **props)
    listed = {image.id: image for image in noauth.images()}
    for part, data in parts.items():
        assert download_image(glance_noauth.url, ids[part]) == data
        image = listed[ids[part]]
        assert image.status == "active"
        assert image.name == f"imageproxy/test-{part.lower()}"
        assert image.disk_format == PART_FORMATS[part][0]
        assert image.properties["imageproxy_sha1"] == hashlib.sha1(data).hexdigest()
    fs = listed[ids["FILESYSTEM"]].properties
    assert (fs["kernel_id"], fs["ramdisk_id"]) == (ids["KERNEL"], ids["RAMDISK"])
    assert noauth.states(ids.values()) == dict.fromkeys(ids.values(), "active")


def test_the_upload_is_one_chunked_pass_over_a_pipe_in_bounded_reads(
    glance_noauth: GlanceServer, glance_proxy: GlanceProxy
) -> None:
    """A pipe cannot be re-read or sized: the image goes up as it is read, 1 MiB at a time."""
    cloud = _noauth(glance_proxy.url)
    data = _data(24 * CHUNK_SIZE + 7, 5)  # far more than a pipe's buffer
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with open(write_fd, "wb") as pipe:
            pipe.write(data)

    writer = threading.Thread(target=feed)
    writer.start()
    sizes: list[int] = []
    with open(read_fd, "rb", buffering=0) as source:
        image_id = cloud.register_stream(
            source,  # type: ignore[arg-type]
            name="pipe",
            disk_format="ami",
            container_format="ami",
            properties={},
            timeout=30,
            progress=sizes.append,
        )
    writer.join()
    assert sum(sizes) == len(data)
    assert max(sizes) <= CHUNK_SIZE
    assert glance_proxy.upload_chunked == [True]
    assert download_image(glance_noauth.url, image_id) == data


# --- failures delete what they made ---


def test_a_byte_changed_on_the_way_fails_the_hash_check_and_deletes_the_image(
    glance_noauth: GlanceServer, glance_proxy: GlanceProxy
) -> None:
    cloud = _noauth(glance_proxy.url)
    glance_proxy.flip_upload_byte = 1000
    marker = {"imageproxy_test": "flipped"}
    stored_before = set(glance_noauth.images_dir.iterdir())
    with pytest.raises(CloudError) as caught:
        _register(cloud, _data(500_000, 6), "KERNEL", **marker)
    assert caught.value.step == "verify"
    assert re.fullmatch(
        r"verify: Glance's sha512 of image [0-9a-f-]{36} is [0-9a-f]{128}, "
        r"the bytes sent have [0-9a-f]{128}",
        str(caught.value),
    )
    assert glance_proxy.uploads == 1
    assert _noauth(glance_noauth.url).find(marker) == []  # deleted from Glance ...
    assert set(glance_noauth.images_dir.iterdir()) == stored_before  # ... and from its store


def test_an_image_short_of_active_times_out_and_is_deleted(
    glance_noauth: GlanceServer, glance_proxy: GlanceProxy
) -> None:
    cloud = _noauth(glance_proxy.url, poll_interval=0.1)
    glance_proxy.report_status = "saving"
    marker = {"imageproxy_test": "stuck"}
    disk, container = PART_FORMATS["RAMDISK"]
    with pytest.raises(RegistrationTimeout) as caught:
        cloud.register_stream(
            io.BytesIO(b"r" * 1000), name="stuck", disk_format=disk,
            container_format=container, properties=marker, timeout=0.5,
        )  # fmt: skip
    assert caught.value.step == "waiting for active"
    assert "still saving after 0.5 s" in str(caught.value)
    assert _noauth(glance_noauth.url).find(marker) == []


def test_glance_refusing_the_bytes_deletes_the_image(noauth: OpenStackCloud) -> None:
    marker = {"imageproxy_test": "not-qcow2"}
    with pytest.raises(CloudError) as caught:
        _register(noauth, b"\0" * 70_000, "QCOW2", **marker)
    assert caught.value.step == "image upload"
    reason = "Image disk_format qcow2 does not match stream data raw"
    assert str(caught.value).endswith(f"HTTP 415 from Glance {noauth._base}: {reason}")
    assert noauth.find(marker) == []


def test_delete_is_idempotent_and_states_omit_missing_images(noauth: OpenStackCloud) -> None:
    kept = _register(noauth, b"k" * 100, "KERNEL")
    gone = _register(noauth, b"g" * 100, "KERNEL")
    noauth.delete(gone)
    noauth.delete(gone)  # already gone: success
    missing = [f"00000000-0000-4000-8000-{n:012d}" for n in range(120)]  # three list calls
    assert noauth.states([kept, gone, *missing]) == {kept: "active"}
    assert noauth.states([]) == {}


_KILLED_UPLOADER = """
import sys, time
from pathlib import Path
from registrar import config
from registrar.clouds.glance_api import OpenStackCloud

cfg = config.parse({"cloud": {"type": "openstack", "auth_type": "none",
                               "glance_url": sys.argv[1]}}, base_dir=Path("/")).cloud
cloud = OpenStackCloud.from_config(cfg)

class Stalls:
    sent = 0
    def read(self, n):
        if self.sent >= 3 << 20:
            print("stalled", flush=True)
            time.sleep(600)
        self.sent += n
        return b"x" * n

cloud.register_stream(Stalls(), name="killed", disk_format="ami", container_format="ami",
                      properties={"imageproxy_test": sys.argv[2]}, timeout=30)
"""


def test_find_locates_the_half_made_image_of_a_killed_registrar(
    noauth: OpenStackCloud, glance_noauth: GlanceServer
) -> None:
    marker = f"killed-{time.monotonic_ns()}"
    with subprocess.Popen(
        [sys.executable, "-c", _KILLED_UPLOADER, glance_noauth.url, marker],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "stalled"  # mid-upload
        finally:
            proc.send_signal(signal.SIGKILL)
    found = noauth.find({"imageproxy_test": marker})
    assert len(found) == 1
    assert noauth.states(found)[found[0]] in ("queued", "saving", "killed")
    noauth.delete(found[0])
    assert noauth.find({"imageproxy_test": marker}) == []


# --- one-line errors ---


def test_an_unreachable_glance_is_one_line_naming_the_step() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CloudError) as caught:
        _register(_noauth(url), b"x", "KERNEL")
    assert str(caught.value) == f"image create: cannot connect to Glance {url}/v2"


def _keystone_cfg(kg: KeystoneGlance, **overrides: str) -> OpenStackConfig:
    section = {
        "type": "openstack",
        "auth_url": kg.auth_url,
        "username": kg.username,
        "password": kg.password,
        "project_name": kg.project_name,
        "user_domain_name": kg.user_domain_name,
        "project_domain_name": kg.project_domain_name,
        "region": kg.region,
        **overrides,
    }
    cfg = config_mod.parse({"cloud": section}, base_dir=Path("/")).cloud
    assert isinstance(cfg, OpenStackConfig)
    return cfg


def _roundtrip(kg: KeystoneGlance, cfg: OpenStackConfig, seed: int) -> None:
    cloud = OpenStackCloud.from_config(cfg)
    data = _data(400_000, seed)
    image_id = _register(cloud, data, "FILESYSTEM")
    assert download_image(kg.glance_url, image_id, kg.admin_token()) == data
    assert cloud.states([image_id]) == {image_id: "active"}
    cloud.delete(image_id)


def test_keystone_password_from_explicit_keys(keystone_glance: KeystoneGlance) -> None:
    _roundtrip(keystone_glance, _keystone_cfg(keystone_glance), 10)


def test_keystone_password_from_an_openrc(keystone_glance: KeystoneGlance, tmp_path: Path) -> None:
    openrc = keystone_glance.openrc(tmp_path / "admin-openrc.sh")
    cfg = config_mod.parse(
        {"cloud": {"type": "openstack", "openrc": str(openrc)}}, base_dir=tmp_path
    ).cloud
    assert isinstance(cfg, OpenStackConfig)
    _roundtrip(keystone_glance, cfg, 11)


def test_keystone_password_from_clouds_yaml(
    keystone_glance: KeystoneGlance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kg = keystone_glance
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(
        f"""clouds:
  testbed:
    region_name: {kg.region}
    auth:
      auth_url: {kg.auth_url}
      username: {kg.username}
      password: {kg.password}
      project_name: {kg.project_name}
      user_domain_name: {kg.user_domain_name}
      project_domain_name: {kg.project_domain_name}
"""
    )
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(clouds))  # openstacksdk's own variable
    cfg = config_mod.parse(
        {"cloud": {"type": "openstack", "os_cloud": "testbed"}}, base_dir=tmp_path
    ).cloud
    assert isinstance(cfg, OpenStackConfig)
    _roundtrip(kg, cfg, 12)
    # Explicit keys win over the clouds.yaml entry's: a stale password there is overridden.
    clouds.write_text(clouds.read_text().replace(f"password: {kg.password}", "password: stale"))
    stale = config_mod.parse({"cloud": {"type": "openstack", "os_cloud": "testbed"}},
                             base_dir=tmp_path).cloud  # fmt: skip
    assert isinstance(stale, OpenStackConfig)
    with pytest.raises(CloudError, match="^authenticate: credentials refused"):
        OpenStackCloud.from_config(stale).images()
    fixed = config_mod.parse(
        {"cloud": {"type": "openstack", "os_cloud": "testbed", "password": kg.password}},
        base_dir=tmp_path,
    ).cloud
    assert isinstance(fixed, OpenStackConfig)
    _roundtrip(kg, fixed, 13)
    missing = config_mod.parse(
        {"cloud": {"type": "openstack", "os_cloud": "nowhere"}}, base_dir=tmp_path
    ).cloud
    assert isinstance(missing, OpenStackConfig)
    with pytest.raises(ConfigError, match="nowhere") as caught:
        OpenStackCloud.from_config(missing)
    assert "\n" not in str(caught.value)


def test_keystone_application_credential(keystone_glance: KeystoneGlance) -> None:
    kg = keystone_glance
    cred_id, secret = kg.application_credential("imageproxy-test")
    section = {
        "type": "openstack",
        "auth_url": kg.auth_url,
        "application_credential_id": cred_id,
        "application_credential_secret": secret,
        "region": kg.region,
    }
    cfg = config_mod.parse({"cloud": section}, base_dir=Path("/")).cloud
    assert isinstance(cfg, OpenStackConfig)
    _roundtrip(kg, cfg, 14)


def test_a_wrong_password_is_one_line_from_authenticate(keystone_glance: KeystoneGlance) -> None:
    cloud = OpenStackCloud.from_config(_keystone_cfg(keystone_glance, password="wrong"))
    with pytest.raises(CloudError) as caught:
        cloud.images()
    assert caught.value.step == "authenticate"
    assert str(caught.value) == (
        f"authenticate: credentials refused by Keystone (HTTP 401) at "
        f"Keystone {keystone_glance.auth_url}"
    )


def test_an_unreachable_keystone_is_one_line_from_authenticate(
    keystone_glance: KeystoneGlance,
) -> None:
    url = f"http://127.0.0.1:{free_port()}/v3"
    cloud = OpenStackCloud.from_config(_keystone_cfg(keystone_glance, auth_url=url))
    with pytest.raises(CloudError) as caught:
        _register(cloud, b"x", "KERNEL")
    assert str(caught.value) == f"authenticate: cannot connect to Keystone {url}"


def test_a_policy_refusal_is_one_line_with_403(keystone_glance: KeystoneGlance) -> None:
    kg = keystone_glance
    cfg = _keystone_cfg(kg, username=kg.member, password=kg.member_password)
    cloud = OpenStackCloud.from_config(OpenStackConfig(**{**cfg.__dict__, "visibility": "public"}))
    with pytest.raises(CloudError) as caught:
        _register(cloud, b"x" * 10, "KERNEL")
    assert caught.value.step == "image create"
    assert "forbidden (HTTP 403)" in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def glance_quota(
    tmp_path_factory: pytest.TempPathFactory, openstack_templates: dict[str, Path]
) -> Iterator[GlanceServer]:
    """A Glance whose storage quota is 200 kB (Glance's own `user_storage_quota`)."""
    server = GlanceServer(
        tmp_path_factory.mktemp("glance-quota"),
        extra_conf="[DEFAULT]\nuser_storage_quota = 200000\n",
    )
    try:
        server.start(openstack_templates["glance"])
        yield server
    finally:
        server.stop()


def test_a_quota_refusal_is_one_line_with_413_and_deletes_the_image(
    glance_quota: GlanceServer,
) -> None:
    cloud = _noauth(glance_quota.url)
    marker = {"imageproxy_test": "quota"}
    with pytest.raises(CloudError) as caught:
        _register(cloud, _data(300_000, 7), "FILESYSTEM", **marker)
    assert caught.value.step == "image upload"
    assert caught.value.code == "413"
    assert str(caught.value) == (
        f"image upload: quota or size limit exceeded (HTTP 413) at Glance {cloud._base}: "
        "Image exceeds the storage quota: The size of the data 300000 will exceed the limit. "
        "200000 bytes remaining."
    )
    assert cloud.find(marker) == []
    assert list(glance_quota.images_dir.iterdir()) == []
