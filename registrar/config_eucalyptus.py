"""`[cloud]` for Eucalyptus (the default `type`): endpoints, credentials and bundle settings.

Explicit keys override what the `eucarc` gives; relative paths and `${EUCA_KEY_DIR}` in the
eucarc resolve to its directory. The keys are listed in registrar/config.py.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from registrar.config_keys import Keys, check_url, read_env_file
from registrar.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class CloudConfig:
    """The `[cloud]` section, with the eucarc (if any) already merged in."""

    ec2_url: str
    s3_url: str
    access_key: str
    secret_key: str
    account_id: str
    cloud_cert: Path
    user_cert: Path | None = None
    user_key: Path | None = None
    region: str = "eucalyptus"
    s3_signature_version: str = "s3v4"
    s3_addressing_style: str = "path"
    ec2_signature_version: str = "v4"
    register_timeout: float = 1800.0  # the original's imageproxy.registrationTimeout
    poll_interval: float = 5.0
    upload_concurrency: int = 4
    request_timeout: float = 120.0
    compression_level: int = 3


_CLOUD_KEYS = {
    "type",
    "eucarc",
    "ec2_url",
    "s3_url",
    "access_key",
    "secret_key",
    "account_id",
    "cloud_cert",
    "user_cert",
    "user_key",
    "region",
    "s3_signature_version",
    "s3_addressing_style",
    "ec2_signature_version",
    "register_timeout",
    "poll_interval",
    "upload_concurrency",
    "request_timeout",
    "compression_level",
}

# eucarc variable → [cloud] key; the first name found wins.
_EUCARC_KEYS = {
    "ec2_url": ("EC2_URL",),
    "s3_url": ("S3_URL",),
    "access_key": ("EC2_ACCESS_KEY", "AWS_ACCESS_KEY"),
    "secret_key": ("EC2_SECRET_KEY", "AWS_SECRET_KEY"),
    "account_id": ("EC2_ACCOUNT_NUMBER", "EC2_USER_ID"),
    "cloud_cert": ("EUCALYPTUS_CERT",),
    "user_cert": ("EC2_CERT",),
    "user_key": ("EC2_PRIVATE_KEY",),
}
_PATH_KEYS = ("cloud_cert", "user_cert", "user_key")


def parse_cloud(section: dict[str, Any], base_dir: Path) -> CloudConfig:
    keys = Keys("cloud", section, _CLOUD_KEYS)
    keys.choice("type", ("eucalyptus", "openstack"), "eucalyptus")
    values: dict[str, Any] = {}
    eucarc = keys.path("eucarc", base_dir)
    if eucarc is not None:
        env = read_env_file(eucarc)
        for key, names in _EUCARC_KEYS.items():
            found = next((env[n] for n in names if env.get(n)), None)
            if found is not None:
                values[key] = (eucarc.parent / found) if key in _PATH_KEYS else found
    for key in ("ec2_url", "s3_url"):
        if key in section:
            values[key] = keys.string(key, "", check=check_url)
        elif key in values and (problem := check_url(values[key])):
            raise ConfigError(f"{eucarc}: {key} {values[key]!r} {problem}")
    for key in ("access_key", "secret_key"):
        if key in section:
            values[key] = keys.string(key, "")
    if "account_id" in section:
        values["account_id"] = keys.string("account_id", "")
    if "account_id" in values:
        values["account_id"] = _account_id(str(values["account_id"]))
    for key in _PATH_KEYS:
        if key in section:
            values[key] = keys.path(key, base_dir)
    missing = [
        k
        for k in ("ec2_url", "s3_url", "access_key", "secret_key", "account_id", "cloud_cert")
        if not values.get(k)
    ]
    if missing:
        source = f" (nor in {eucarc})" if eucarc else ""
        raise ConfigError(f"[cloud] {missing[0]}: required but not set{source}")
    return CloudConfig(
        **values,
        region=keys.string("region", CloudConfig.region),
        s3_signature_version=keys.choice("s3_signature_version", ("s3v4", "s3"), "s3v4"),
        s3_addressing_style=keys.choice("s3_addressing_style", ("path", "virtual", "auto"), "path"),
        ec2_signature_version=keys.choice("ec2_signature_version", ("v4", "v2"), "v4"),
        register_timeout=keys.number("register_timeout", CloudConfig.register_timeout),
        poll_interval=keys.number("poll_interval", CloudConfig.poll_interval),
        upload_concurrency=keys.integer("upload_concurrency", 4, low=1, high=32),
        request_timeout=keys.number("request_timeout", CloudConfig.request_timeout),
        compression_level=keys.integer("compression_level", 3, low=0, high=3),
    )


def _account_id(text: str) -> str:
    digits = text.replace("-", "").strip()
    if not re.fullmatch(r"\d{12}", digits):
        raise ConfigError(f"[cloud] account_id: {text!r} is not a 12-digit account number")
    return digits
