"""`[cloud] type = "openstack"`: what openstacksdk needs to reach Glance.

Credentials come from explicit keys, which override an `openrc`'s `OS_*` exports, which
override the `os_cloud` entry of a clouds.yaml (resolved by openstacksdk in its usual places).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from registrar.config_keys import Keys, check_url, read_env_file
from registrar.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class OpenStackConfig:
    """The `[cloud]` section for OpenStack: what openstacksdk needs to reach Glance.

    `auth` holds the openstacksdk settings (auth_url, username, password, project_name, …)
    merged from explicit keys and the openrc; `os_cloud` names a clouds.yaml entry under them.
    `sources` says where credentials came from, for error messages.
    """

    auth: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)
    os_cloud: str | None = None
    clouds_yaml: Path | None = None
    glance_url: str | None = None
    visibility: str = "private"
    name_prefix: str = "imageproxy/"
    register_timeout: float = 1800.0  # the original's imageproxy.registrationTimeout
    poll_interval: float = 2.0
    request_timeout: float = 120.0
    sources: tuple[str, ...] = ()
    type: str = "openstack"


# [cloud] key → openrc variables (the first one set wins); all are openstacksdk settings.
_OPENRC_KEYS = {
    "auth_url": ("OS_AUTH_URL",),
    "auth_type": ("OS_AUTH_TYPE",),
    "username": ("OS_USERNAME",),
    "user_id": ("OS_USER_ID",),
    "password": ("OS_PASSWORD",),
    "project_name": ("OS_PROJECT_NAME", "OS_TENANT_NAME"),
    "project_id": ("OS_PROJECT_ID", "OS_TENANT_ID"),
    "user_domain_name": ("OS_USER_DOMAIN_NAME",),
    "user_domain_id": ("OS_USER_DOMAIN_ID",),
    "project_domain_name": ("OS_PROJECT_DOMAIN_NAME",),
    "project_domain_id": ("OS_PROJECT_DOMAIN_ID",),
    "region": ("OS_REGION_NAME",),
    "interface": ("OS_INTERFACE", "OS_ENDPOINT_TYPE"),
    "application_credential_id": ("OS_APPLICATION_CREDENTIAL_ID",),
    "application_credential_secret": ("OS_APPLICATION_CREDENTIAL_SECRET",),
    "cacert": ("OS_CACERT",),
}
OPENSTACK_KEYS = {
    "type",
    "openrc",
    "os_cloud",
    "clouds_yaml",
    "glance_url",
    "visibility",
    "name_prefix",
    "register_timeout",
    "poll_interval",
    "request_timeout",
    *_OPENRC_KEYS,
}
_AUTH_TYPES = ("password", "v3applicationcredential", "none")
_VISIBILITIES = ("private", "shared", "community", "public")


def parse_openstack(section: dict[str, Any], base_dir: Path) -> OpenStackConfig:
    """Explicit keys > `openrc` exports > `os_cloud` (left to openstacksdk to resolve).

    Keys: the `_OPENRC_KEYS` above; `openrc` (path), `os_cloud` (name) and `clouds_yaml` (its
    file, default openstacksdk's usual places); `glance_url` (use this
    Glance endpoint instead of the catalog's: with `auth_type = "none"`, a Glance without
    Keystone); `visibility`; `name_prefix`; `register_timeout`, `poll_interval`,
    `request_timeout` (seconds).
    """
    keys = Keys("cloud", section, OPENSTACK_KEYS)
    auth: dict[str, str] = {}
    sources: list[str] = []
    if (os_cloud := section.get("os_cloud")) is not None:
        os_cloud = keys.string("os_cloud", "")
        sources.append(f"clouds.yaml cloud {os_cloud!r}")
    if (openrc := keys.path("openrc", base_dir)) is not None:
        env = read_env_file(openrc, "openrc")
        for key, names in _OPENRC_KEYS.items():
            found = next((env[n] for n in names if env.get(n)), None)
            if found:
                auth[key] = found
        sources.append(f"openrc {openrc}")
    explicit = {key: keys.string(key, "") for key in _OPENRC_KEYS if key in section}
    if explicit:
        sources.append("[cloud]")
    auth.update(explicit)
    if "cacert" in auth:
        auth["cacert"] = str(base_dir / Path(auth["cacert"]).expanduser())
    glance_url = keys.string("glance_url", "", check=check_url) or None
    _check_openstack_auth(auth, os_cloud, glance_url, openrc)
    prefix = keys.string("name_prefix", OpenStackConfig.name_prefix)
    if len(prefix) > 100 or not prefix.isprintable():
        raise ConfigError("[cloud] name_prefix: must be at most 100 printable characters")
    return OpenStackConfig(
        auth=auth,
        os_cloud=os_cloud,
        clouds_yaml=keys.path("clouds_yaml", base_dir),
        glance_url=glance_url.rstrip("/") if glance_url else None,
        visibility=keys.choice("visibility", _VISIBILITIES, "private"),
        name_prefix=prefix,
        register_timeout=keys.number("register_timeout", OpenStackConfig.register_timeout),
        poll_interval=keys.number("poll_interval", OpenStackConfig.poll_interval),
        request_timeout=keys.number("request_timeout", OpenStackConfig.request_timeout),
        sources=tuple(sources),
    )


def _check_openstack_auth(
    auth: dict[str, str], os_cloud: str | None, glance_url: str | None, openrc: Path | None
) -> None:
    """Refuse, with one line, credentials that cannot work whatever the servers say."""
    auth_type = auth.get("auth_type")
    if auth_type is not None and auth_type not in _AUTH_TYPES:
        choices = ", ".join(_AUTH_TYPES)
        raise ConfigError(f"[cloud] auth_type: {auth_type!r} is not one of {choices}")
    if auth_type == "none":
        if not glance_url:
            raise ConfigError('[cloud] glance_url: required with auth_type = "none"')
        return
    if os_cloud is not None:
        return  # openstacksdk fills in the rest from clouds.yaml, and says what is missing
    where = f" (nor in {openrc})" if openrc else ""
    if not auth.get("auth_url"):
        if not auth and not openrc:
            raise ConfigError(
                '[cloud] type = "openstack" needs credentials: auth_url and the rest, '
                "openrc, or os_cloud"
            )
        raise ConfigError(f"[cloud] auth_url: required but not set{where}")
    if problem := check_url(auth["auth_url"]):
        raise ConfigError(f"[cloud] auth_url: {auth['auth_url']!r} {problem}")
    if auth_type == "v3applicationcredential" or "application_credential_id" in auth:
        for key in ("application_credential_id", "application_credential_secret"):
            if not auth.get(key):
                raise ConfigError(f"[cloud] {key}: required but not set{where}")
        return
    if not (auth.get("username") or auth.get("user_id")):
        raise ConfigError(f"[cloud] username: required but not set{where}")
    if not auth.get("password"):
        # Horizon's openrc asks for the password at run time (read -sr OS_PASSWORD_INPUT).
        raise ConfigError(f"[cloud] password: required but not set{where}")
