"""The registrar's settings: the `[registrar]` and `[cloud]` sections of the shared TOML file.

One file serves both daemons; `[store]` belongs to imgstore and is ignored here. Unknown keys
and bad values in our two sections are refused with a ConfigError naming the key.

`[registrar]`:

- `listen`: "HOST:PORT" of the SOAP service (default "127.0.0.1:8080"; IPv6 as "[::1]:8080")
- `bucket`: S3 bucket that receives the bundles (default "imageproxy.bukkit")
- `state_dir`: where the registry lives (default "/var/lib/imageproxy")
- `allowed_networks`: CIDRs exempt from the refusal of loopback, link-local and own
  addresses for URLs that arrive by SOAP (default [])
- `allowed_clients`, `tls_cert`, `tls_key`, `auth_user`, `auth_password`: who may use the
  listener (see registrar/access.py)

`[cloud]` (explicit keys override what a `eucarc` gives):

- `eucarc`: a Eucalyptus credentials file; supplies `EC2_URL`, `S3_URL`, `EC2_ACCESS_KEY`,
  `EC2_SECRET_KEY`, `EC2_ACCOUNT_NUMBER` (or `EC2_USER_ID`), `EUCALYPTUS_CERT`, `EC2_CERT`,
  `EC2_PRIVATE_KEY`; relative paths and `${EUCA_KEY_DIR}` resolve to the eucarc's directory
- `ec2_url`, `s3_url`, `access_key`, `secret_key`, `account_id` (required, from either source)
- `cloud_cert` (required): the cloud certificate that encrypts the bundle key
- `user_cert`, `user_key` (optional): the user's copy of the key; the manifest signature
- `region` (default "eucalyptus"): the SigV4 region name
- `s3_signature_version`: "s3v4" (default) or "s3" (SigV2, Eucalyptus before 4.4)
- `s3_addressing_style`: "path" (default), "virtual" or "auto"
- `ec2_signature_version`: "v4" (default) or "v2"
- `register_timeout`: seconds to wait for an image to become available (default 1800, the
  original ImageProxy's `imageproxy.registrationTimeout`)
- `poll_interval`: seconds between DescribeImages polls (default 5)
- `upload_concurrency`: parts uploaded in parallel (default 4)
- `request_timeout`: seconds for one HTTP request to the cloud (default 120)
- `compression_level`: 0–3, ISA-L deflate level of the bundle's gzip stream (default 3)

`[cloud] type = "openstack"` (the default `type` is "eucalyptus") gives an OpenStackConfig:
credentials from explicit keys, which override an `openrc`'s `OS_*` exports, which override
the `os_cloud` entry of a clouds.yaml (resolved by openstacksdk in its usual places); see
`_parse_openstack` for the keys.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from imgstore.config import SECTIONS
from registrar.access import ACCESS_KEYS, Access, parse_access
from registrar.errors import ConfigError

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclasses.dataclass(frozen=True)
class RegistrarConfig:
    """The `[registrar]` section."""

    listen: str = "127.0.0.1:8080"
    host: str = "127.0.0.1"
    port: int = 8080
    bucket: str = "imageproxy.bukkit"
    state_dir: Path = Path("/var/lib/imageproxy")
    allowed_networks: tuple[IPNetwork, ...] = ()
    # Who may use the listener; the same fields as registrar.access.Access.
    allowed_clients: tuple[IPNetwork, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    auth_user: str = ""
    auth_password: str = dataclasses.field(default="", repr=False)

    @property
    def access(self) -> Access:
        return Access(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Access)})


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


@dataclasses.dataclass(frozen=True)
class Config:
    """The registrar's whole configuration; `cloud` is None when the file has no `[cloud]`."""

    registrar: RegistrarConfig
    cloud: CloudConfig | OpenStackConfig | None
    path: Path | None = None

    def require_cloud(self) -> CloudConfig | OpenStackConfig:
        """Return the `[cloud]` settings or raise ConfigError saying they are missing."""
        if self.cloud is None:
            where = f" in {self.path}" if self.path else ""
            raise ConfigError(f"no [cloud] section{where}: the cloud endpoints are not configured")
        return self.cloud


def load(path: str | Path) -> Config:
    """Read and check the TOML file at `path`."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return parse(data, base_dir=path.parent, path=path)


def parse(data: dict[str, Any], *, base_dir: Path, path: Path | None = None) -> Config:
    """Check an already-parsed TOML document; relative paths resolve against `base_dir`."""
    for name in data:
        if name not in SECTIONS:
            raise ConfigError(f"unknown section [{name}]")
    registrar = _parse_registrar(_section(data, "registrar"), base_dir)
    cloud_section = data.get("cloud")
    if cloud_section is None:
        cloud: CloudConfig | OpenStackConfig | None = None
    elif _section(data, "cloud").get("type", "eucalyptus") == "openstack":
        cloud = _parse_openstack(_section(data, "cloud"), base_dir)
    else:
        cloud = _parse_cloud(_section(data, "cloud"), base_dir)
    return Config(registrar=registrar, cloud=cloud, path=path)


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    section = data.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"[{name}] must be a table")
    return section


# --- [registrar] ---


def _parse_registrar(section: dict[str, Any], base_dir: Path) -> RegistrarConfig:
    known = {"listen", "bucket", "state_dir", "allowed_networks", *ACCESS_KEYS}
    keys = _Keys("registrar", section, known)
    listen = keys.string("listen", RegistrarConfig.listen)
    host, port = _parse_listen(listen)
    networks = keys.get("allowed_networks", [])
    if not isinstance(networks, list):
        raise ConfigError("[registrar] allowed_networks: must be a list of CIDR strings")
    parsed: list[IPNetwork] = []
    for item in networks:
        try:
            parsed.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise ConfigError(f"[registrar] allowed_networks: {item!r} is not a CIDR") from None
    return RegistrarConfig(
        listen=listen,
        host=host,
        port=port,
        bucket=keys.string("bucket", RegistrarConfig.bucket, check=_check_bucket),
        state_dir=keys.path("state_dir", base_dir) or RegistrarConfig.state_dir,
        allowed_networks=tuple(parsed),
        **dataclasses.asdict(parse_access(section, base_dir)),
    )


def _parse_listen(listen: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", listen)
    if not match:
        raise ConfigError(f'[registrar] listen: {listen!r} is not "HOST:PORT"')
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        raise ConfigError(f"[registrar] listen: port {port} is out of range")
    return host, port


def _check_bucket(name: str) -> str | None:
    if re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]", name):
        return None
    return "must be 3–63 characters of lowercase letters, digits, '.', '_' and '-'"


# --- [cloud] ---

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


def _parse_cloud(section: dict[str, Any], base_dir: Path) -> CloudConfig:
    keys = _Keys("cloud", section, _CLOUD_KEYS)
    keys.choice("type", ("eucalyptus", "openstack"), "eucalyptus")
    values: dict[str, Any] = {}
    eucarc = keys.path("eucarc", base_dir)
    if eucarc is not None:
        env = read_eucarc(eucarc)
        for key, names in _EUCARC_KEYS.items():
            found = next((env[n] for n in names if env.get(n)), None)
            if found is not None:
                values[key] = (eucarc.parent / found) if key in _PATH_KEYS else found
    for key in ("ec2_url", "s3_url"):
        if key in section:
            values[key] = keys.string(key, "", check=_check_url)
        elif key in values and (problem := _check_url(values[key])):
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


def _check_url(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "is not an http(s) URL"
    return None


def read_eucarc(path: Path, key: str = "eucarc") -> dict[str, str]:
    """Read the `NAME=value` assignments of a eucarc, expanding `${VAR}` from earlier lines.

    Shell we do not run: `EUCA_KEY_DIR=$(cd $(dirname …); pwd -P)` stands for the file's own
    directory, and any other command substitution is skipped.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"[cloud] {key}: cannot read {path}: {exc.strerror}") from None
    env: dict[str, str] = {}
    line_re = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)")
    for line in text.splitlines():
        match = line_re.fullmatch(line)
        if not match:
            continue
        name, raw = match.group(1), match.group(2).strip()
        if name == "EUCA_KEY_DIR" and raw.startswith("$("):
            env[name] = str(path.parent.resolve())
            continue
        if "$(" in raw or "`" in raw:
            continue
        env[name] = _expand(_unquote(raw), env)
    return env


def _unquote(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    return raw.split(" #")[0].strip()


def _expand(value: str, env: dict[str, str]) -> str:
    """Expand `$VAR`, `${VAR}` and `${VAR:-default}` (openrc files use the last)."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        return env.get(name) or (match.group(2) or "")

    return re.sub(
        r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)", sub, value
    )


class _Keys:
    """Typed access to one section's keys; refuses unknown keys up front."""

    def __init__(self, section: str, data: dict[str, Any], known: set[str]) -> None:
        self.section = section
        self.data = data
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"[{section}] {unknown[0]}: unknown key")

    def _bad(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"[{self.section}] {key}: {what}")

    def get(self, key: str, default: Any) -> Any:
        return self.data.get(key, default)

    def string(
        self, key: str, default: str, *, check: Callable[[str], str | None] | None = None
    ) -> str:
        value = self.data.get(key, default)
        if not isinstance(value, str) or (key in self.data and not value.strip()):
            raise self._bad(key, "must be a non-empty string")
        value = value.strip()
        if check and key in self.data and (problem := check(value)):
            raise self._bad(key, f"{value!r} {problem}")
        return value

    def path(self, key: str, base_dir: Path) -> Path | None:
        if key not in self.data:
            return None
        return base_dir / Path(self.string(key, "")).expanduser()

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.data.get(key, default)
        if value not in choices:
            raise self._bad(key, f"{value!r} is not one of {', '.join(choices)}")
        return str(value)

    def number(self, key: str, default: float) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise self._bad(key, f"{value!r} is not a positive number")
        return float(value)

    def integer(self, key: str, default: int, *, low: int, high: int) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self._bad(key, f"{value!r} is not an integer from {low} to {high}")
        return value


# --- [cloud] type = "openstack" ---


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
_OPENSTACK_KEYS = {
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


def _parse_openstack(section: dict[str, Any], base_dir: Path) -> OpenStackConfig:
    """Explicit keys > `openrc` exports > `os_cloud` (left to openstacksdk to resolve).

    Keys: the `_OPENRC_KEYS` above; `openrc` (path), `os_cloud` (name) and `clouds_yaml` (its
    file, default openstacksdk's usual places); `glance_url` (use this
    Glance endpoint instead of the catalog's: with `auth_type = "none"`, a Glance without
    Keystone); `visibility`; `name_prefix`; `register_timeout`, `poll_interval`,
    `request_timeout` (seconds).
    """
    keys = _Keys("cloud", section, _OPENSTACK_KEYS)
    auth: dict[str, str] = {}
    sources: list[str] = []
    if (os_cloud := section.get("os_cloud")) is not None:
        os_cloud = keys.string("os_cloud", "")
        sources.append(f"clouds.yaml cloud {os_cloud!r}")
    if (openrc := keys.path("openrc", base_dir)) is not None:
        env = read_eucarc(openrc, "openrc")
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
    glance_url = keys.string("glance_url", "", check=_check_url) or None
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
    if problem := _check_url(auth["auth_url"]):
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
