"""`[cloud] type = "openstack"`: keys, openrc, os_cloud, their precedence, and one-line errors.

The same settings against the real Keystone and Glance: tests/registrar/test_openstack_backend.py.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from registrar import config as config_module
from registrar.config import CloudConfig, OpenStackConfig, parse
from registrar.errors import ConfigError

AUTH = {
    "auth_url": "https://keystone.example:5000/v3",
    "username": "imageproxy",
    "password": "s3cret",
    "project_name": "orca",
    "user_domain_name": "Default",
    "project_domain_name": "Default",
}

OPENRC = """\
#!/usr/bin/env bash
# from the install guide
export OS_PROJECT_DOMAIN_NAME=Default
export OS_USER_DOMAIN_NAME="Default"
export OS_PROJECT_NAME='admin'
export OS_USERNAME=admin
export OS_PASSWORD=from-openrc
export OS_AUTH_URL=http://controller:5000/v3   # keystone
export OS_IDENTITY_API_VERSION=3
export OS_IMAGE_API_VERSION=2
export OS_REGION_NAME=${REGION:-RegionOne}
export OS_INTERFACE=internal
"""

# What Horizon's "OpenStack RC file" download looks like: the password is asked for.
HORIZON_OPENRC = """\
export OS_AUTH_URL=https://cloud.example:5000
export OS_PROJECT_ID=0123456789abcdef
export OS_PROJECT_NAME="orca"
export OS_USER_DOMAIN_NAME="Default"
export OS_USERNAME="imageproxy"
echo "Please enter your OpenStack Password for project $OS_PROJECT_NAME as user $OS_USERNAME: "
read -sr OS_PASSWORD_INPUT
export OS_PASSWORD=$OS_PASSWORD_INPUT
export OS_REGION_NAME="RegionOne"
"""


def _cloud(section: dict, base_dir: Path = Path("/")) -> OpenStackConfig:
    cloud = parse({"cloud": {"type": "openstack", **section}}, base_dir=base_dir).cloud
    assert isinstance(cloud, OpenStackConfig)
    return cloud


def _error(section: dict, base_dir: Path = Path("/")) -> str:
    with pytest.raises(ConfigError) as caught:
        _cloud(section, base_dir)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_explicit_keys_and_defaults() -> None:
    cloud = _cloud({**AUTH, "region": "RegionTwo"})
    assert cloud.auth == {**AUTH, "region": "RegionTwo"}
    assert cloud.os_cloud is None and cloud.glance_url is None
    assert (cloud.visibility, cloud.name_prefix) == ("private", "imageproxy/")
    assert cloud.register_timeout == 1800 and cloud.sources == ("[cloud]",)  # the original's
    assert "s3cret" not in repr(cloud)


def test_the_default_type_is_still_eucalyptus_and_a_bad_type_is_named() -> None:
    section = {
        "ec2_url": "http://h:8773/services/compute",
        "s3_url": "http://h:8773/services/objectstorage",
        "access_key": "a",
        "secret_key": "s",
        "account_id": "123456789012",
        "cloud_cert": "/c.pem",
    }
    assert isinstance(parse({"cloud": section}, base_dir=Path("/")).cloud, CloudConfig)
    typed = parse({"cloud": {**section, "type": "eucalyptus"}}, base_dir=Path("/")).cloud
    assert isinstance(typed, CloudConfig)
    with pytest.raises(ConfigError, match=r"^\[cloud\] type: 'aws' is not one of eucalyptus, "):
        parse({"cloud": {**section, "type": "aws"}}, base_dir=Path("/"))


def test_an_openrc_is_read_like_a_eucarc(tmp_path: Path) -> None:
    (tmp_path / "admin-openrc.sh").write_text(OPENRC)
    cloud = _cloud({"openrc": "admin-openrc.sh"}, tmp_path)
    assert cloud.auth == {
        "auth_url": "http://controller:5000/v3",
        "username": "admin",
        "password": "from-openrc",
        "project_name": "admin",
        "user_domain_name": "Default",
        "project_domain_name": "Default",
        "region": "RegionOne",
        "interface": "internal",
    }
    assert cloud.sources == (f"openrc {tmp_path / 'admin-openrc.sh'}",)


def test_explicit_keys_override_the_openrc_which_overrides_os_cloud(tmp_path: Path) -> None:
    (tmp_path / "openrc").write_text(OPENRC)
    cloud = _cloud({"os_cloud": "site", "openrc": "openrc", "password": "explicit"}, tmp_path)
    assert cloud.auth["password"] == "explicit"
    assert cloud.auth["username"] == "admin"  # from the openrc, over whatever clouds.yaml says
    assert cloud.os_cloud == "site"  # the base layer, resolved by openstacksdk
    assert cloud.sources == ("clouds.yaml cloud 'site'", f"openrc {tmp_path / 'openrc'}", "[cloud]")


def test_os_cloud_alone_leaves_the_rest_to_clouds_yaml(tmp_path: Path) -> None:
    cloud = _cloud({"os_cloud": "site", "clouds_yaml": "etc/clouds.yaml"}, tmp_path)
    assert cloud.auth == {} and cloud.os_cloud == "site"
    assert cloud.clouds_yaml == tmp_path / "etc/clouds.yaml"


def test_a_horizon_openrc_that_asks_for_the_password_needs_it_in_the_config(
    tmp_path: Path,
) -> None:
    (tmp_path / "orca-openrc.sh").write_text(HORIZON_OPENRC)
    assert _error({"openrc": "orca-openrc.sh"}, tmp_path) == (
        f"[cloud] password: required but not set (nor in {tmp_path / 'orca-openrc.sh'})"
    )
    cloud = _cloud({"openrc": "orca-openrc.sh", "password": "typed"}, tmp_path)
    assert cloud.auth["password"] == "typed" and cloud.auth["project_id"] == "0123456789abcdef"


def test_glance_without_keystone() -> None:
    cloud = _cloud({"auth_type": "none", "glance_url": "http://127.0.0.1:9292/"})
    assert cloud.glance_url == "http://127.0.0.1:9292" and cloud.auth == {"auth_type": "none"}
    assert _error({"auth_type": "none"}) == '[cloud] glance_url: required with auth_type = "none"'


def test_application_credentials() -> None:
    section = {"auth_url": AUTH["auth_url"], "application_credential_id": "abc"}
    assert _error(section) == "[cloud] application_credential_secret: required but not set"
    cloud = _cloud({**section, "application_credential_secret": "xyz"})
    assert cloud.auth["application_credential_id"] == "abc"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({}, '[cloud] type = "openstack" needs credentials: auth_url and the rest, openrc, '
             "or os_cloud"),
        ({"username": "u", "password": "p"}, "[cloud] auth_url: required but not set"),
        ({**AUTH, "auth_url": "keystone:5000"}, "[cloud] auth_url: 'keystone:5000' is not an "
                                                "http(s) URL"),
        ({**AUTH, "password": ""}, "[cloud] password: must be a non-empty string"),
        ({**AUTH, "username": None}, "[cloud] username: required but not set"),
        ({**AUTH, "visibility": "everyone"}, "[cloud] visibility: 'everyone' is not one of "
                                              "private, shared, community, public"),
        ({**AUTH, "auth_type": "token"}, "[cloud] auth_type: 'token' is not one of password, "
                                         "v3applicationcredential, none"),
        ({**AUTH, "ec2_url": "http://h/"}, "[cloud] ec2_url: unknown key"),
        ({**AUTH, "register_timeout": 0}, "[cloud] register_timeout: 0 is not a positive number"),
        ({"auth_type": "none", "glance_url": "glance"}, "[cloud] glance_url: 'glance' is not an "
                                                        "http(s) URL"),
        ({**AUTH, "name_prefix": "a\nb"}, "[cloud] name_prefix: must be at most 100 printable "
                                          "characters"),
    ],
)  # fmt: skip
def test_bad_settings_are_one_line(section: dict, message: str) -> None:
    section = {k: v for k, v in section.items() if v is not None}
    assert _error(section) == message


def test_a_missing_openrc_is_one_line(tmp_path: Path) -> None:
    assert _error({"openrc": "nope.sh"}, tmp_path).startswith(
        f"[cloud] openrc: cannot read {tmp_path / 'nope.sh'}: "
    )


EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "imageproxy.example.toml"


def test_the_example_documents_every_openstack_key_and_it_parses(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().split("# --- OpenStack ---", 1)[1]
    block = "\n".join(line[4:] for line in text.splitlines() if line.startswith("#   "))
    data = tomllib.loads(block)
    assert set(data["cloud"]) == config_module._OPENSTACK_KEYS
    (tmp_path / "openrc").write_text(OPENRC)
    data["cloud"]["openrc"] = str(tmp_path / "openrc")
    cloud = parse(data, base_dir=tmp_path).cloud
    assert isinstance(cloud, OpenStackConfig)
    assert cloud.auth["username"] == "imageproxy"  # the explicit key, over the openrc's
    assert (cloud.visibility, cloud.name_prefix) == (
        OpenStackConfig.visibility,
        OpenStackConfig.name_prefix,
    )
    assert (cloud.register_timeout, cloud.poll_interval, cloud.request_timeout) == (
        OpenStackConfig.register_timeout,
        OpenStackConfig.poll_interval,
        OpenStackConfig.request_timeout,
    )
