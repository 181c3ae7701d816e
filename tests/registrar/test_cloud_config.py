"""The `[registrar]` and `[cloud]` config sections, eucarc files, and a Cloud built from them."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from registrar import config as registrar_config
from registrar.clouds.euca_api import Cloud
from registrar.errors import CloudError, ConfigError
from tests.support.cloud import StandInCloud

CLOUD = """
[cloud]
ec2_url = "http://head:8773/services/compute"
s3_url = "http://head:8773/services/objectstorage"
access_key = "AK"
secret_key = "SK"
account_id = "1234-5678-9012"
cloud_cert = "cloud-cert.pem"
"""


def load(tmp_path: Path, text: str) -> registrar_config.Config:
    path = tmp_path / "imageproxy.toml"
    path.write_text(text)
    return registrar_config.load(path)


def test_the_design_example_loads(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
[store]
cache_dir = "/var/cache/imageproxy"
whatever_imgstore_wants = 1

[registrar]
listen = "127.0.0.1:8080"
bucket = "imageproxy.bukkit"
state_dir = "/var/lib/imageproxy"
allowed_networks = ["10.0.0.0/8", "fd00::/8"]
"""
        + CLOUD
        + """
user_cert = "/root/.euca/euca2-cert.pem"
user_key = "/root/.euca/euca2-pk.pem"
""",
    )
    reg = config.registrar
    assert (reg.host, reg.port, reg.bucket) == ("127.0.0.1", 8080, "imageproxy.bukkit")
    assert reg.state_dir == Path("/var/lib/imageproxy")
    assert reg.allowed_networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
    )
    cloud = config.require_cloud()
    assert cloud.account_id == "123456789012"
    assert cloud.cloud_cert == tmp_path / "cloud-cert.pem"  # relative to the config file
    assert cloud.user_key == Path("/root/.euca/euca2-pk.pem")
    assert (cloud.s3_signature_version, cloud.s3_addressing_style) == ("s3v4", "path")
    assert cloud.register_timeout == 1800  # the original's imageproxy.registrationTimeout


def test_defaults_without_sections(tmp_path: Path) -> None:
    config = load(tmp_path, "")
    assert config.registrar.listen == "127.0.0.1:8080"
    assert config.cloud is None
    with pytest.raises(ConfigError, match=r"no \[cloud\] section"):
        config.require_cloud()


def test_ipv6_listen(tmp_path: Path) -> None:
    config = load(tmp_path, '[registrar]\nlisten = "[::1]:9000"\n')
    assert (config.registrar.host, config.registrar.port) == ("::1", 9000)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[registrar]\nlisten = "nowhere"\n', r"\[registrar\] listen"),
        ("[registrar]\nport = 8080\n", r"\[registrar\] port: unknown key"),
        ('[registrar]\nallowed_networks = ["10.0.0.0/33"]\n', "allowed_networks"),
        ('[registrar]\nbucket = "No_Such Bucket"\n', r"\[registrar\] bucket"),
        (CLOUD + 'colour = "blue"\n', r"\[cloud\] colour: unknown key"),
        (CLOUD + 's3_signature_version = "v5"\n', "s3_signature_version"),
        (CLOUD + 's3_addressing_style = "sideways"\n', "s3_addressing_style"),
        (CLOUD + "register_timeout = -1\n", "register_timeout"),
        (CLOUD + "upload_concurrency = 0\n", "upload_concurrency"),
        (CLOUD + "compression_level = 9\n", "compression_level"),
        (CLOUD.replace('"1234-5678-9012"', '"12345"'), "account_id"),
        (CLOUD.replace("http://head:8773/services/compute", "ftp://head"), "ec2_url"),
        (CLOUD.replace('access_key = "AK"\n', ""), r"\[cloud\] access_key: required"),
        ("[cloud\n", "not valid TOML"),
    ],
)
def test_bad_keys_and_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, text)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        registrar_config.load(tmp_path / "nope.toml")


def test_eucarc_supplies_the_cloud(tmp_path: Path) -> None:
    keydir = tmp_path / "euca"
    keydir.mkdir()
    (keydir / "eucarc").write_text("""\
EUCA_KEY_DIR=$(cd $(dirname ${BASH_SOURCE:-$0}); pwd -P)
export S3_URL=http://10.1.1.1:8773/services/Walrus
export EC2_URL=http://10.1.1.1:8773/services/Eucalyptus
export EC2_PRIVATE_KEY=${EUCA_KEY_DIR}/euca2-admin-8c1f-pk.pem
export EC2_CERT=${EUCA_KEY_DIR}/euca2-admin-8c1f-cert.pem
export EC2_JVM_ARGS=-Djavax.net.ssl.trustStore=${EUCA_KEY_DIR}/jssecacerts
export EUCALYPTUS_CERT=${EUCA_KEY_DIR}/cloud-cert.pem
export EC2_ACCOUNT_NUMBER='000100020003'
export EC2_ACCESS_KEY='AKIEXAMPLE'
export EC2_SECRET_KEY="secret with spaces"
export EC2_USER_ID='000100020003'
alias ec2-bundle-image="ec2-bundle-image --cert ${EC2_CERT} --privatekey ${EC2_PRIVATE_KEY}"
""")
    config = load(tmp_path, '[cloud]\neucarc = "euca/eucarc"\ns3_signature_version = "s3"\n')
    cloud = config.require_cloud()
    assert cloud.s3_url == "http://10.1.1.1:8773/services/Walrus"
    assert cloud.ec2_url == "http://10.1.1.1:8773/services/Eucalyptus"
    assert (cloud.access_key, cloud.secret_key) == ("AKIEXAMPLE", "secret with spaces")
    assert cloud.account_id == "000100020003"
    assert cloud.cloud_cert == keydir.resolve() / "cloud-cert.pem"
    assert cloud.user_key == keydir.resolve() / "euca2-admin-8c1f-pk.pem"
    assert cloud.s3_signature_version == "s3"
    # Explicit keys win over the eucarc.
    config = load(tmp_path, '[cloud]\neucarc = "euca/eucarc"\naccess_key = "OTHER"\n')
    assert config.require_cloud().access_key == "OTHER"


def test_unreadable_eucarc(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="eucarc"):
        load(tmp_path, '[cloud]\neucarc = "missing/eucarc"\n')


# What the recording proxy reads of a manifest (its type and architecture).
MINIMAL_MANIFEST = (
    b"<manifest><machine_configuration><architecture>x86_64</architecture>"
    b"</machine_configuration><image><type>machine</type></image></manifest>"
)


def test_cloud_from_a_eucarc_with_sigv2_uploads_registers_and_cleans_up(
    cloud: StandInCloud, tmp_path: Path
) -> None:
    eucarc = cloud.write_eucarc(tmp_path / "creds")
    config = registrar_config.load(
        cloud.write_config(
            tmp_path / "c.toml",
            eucarc=eucarc,
            # Eucalyptus 3's Walrus path, explicit keys winning over the eucarc's S3_URL.
            s3_url=cloud.s3_url.replace("objectstorage", "Walrus"),
            s3_signature_version="s3",
            ec2_signature_version="v2",
        )
    )
    assert config.require_cloud().user_key == (tmp_path / "creds").resolve() / "euca2-admin-pk.pem"
    remote = Cloud.from_config(config)
    remote.ensure_bucket()
    remote.ensure_bucket()  # already there and ours: fine
    remote.put_object("f/x.manifest.xml", MINIMAL_MANIFEST, step="manifest upload")
    image_id = remote.register(f"{cloud.bucket}/f/x.manifest.xml", name="sigv2", arch="x86_64")
    remote.wait_available(image_id)
    assert remote.describe([image_id])[image_id].state == "available"
    assert remote.describe(["ami-00000000", image_id]).keys() == {image_id}
    assert remote.describe(["ami-00000000"]) == {}
    remote.cleanup("f", image_id)
    assert cloud.bucket_keys() == [] and cloud.image_ids() == []
    # SigV2 really was used for S3: its Authorization header is "AWS key:signature".
    assert set(cloud.s3_auth_schemes) == {"AWS"}
    assert all(path.startswith("/services/Walrus/") for _, path, _ in cloud.s3_requests)
    # … and for EC2: SigV2 signs in the query parameters.
    assert {call.get("SignatureVersion") for call in cloud.ec2_calls} == {"2"}


def test_unreachable_cloud_names_the_step(cloud: StandInCloud, tmp_path: Path) -> None:
    config = registrar_config.load(
        cloud.write_config(tmp_path / "c.toml", s3_url="http://127.0.0.1:9", request_timeout=2)
    )
    # The first request is the bucket check (HEAD), so that is the step that fails.
    with pytest.raises(CloudError, match="^bucket check: cannot connect to ") as caught:
        Cloud.from_config(config).ensure_bucket()
    assert caught.value.step == "bucket check"
