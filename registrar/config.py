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
`parse_openstack` for the keys.

Modules: this one reads the file and `[registrar]`; registrar/config_eucalyptus.py and
registrar/config_openstack.py the two kinds of `[cloud]`; registrar/config_keys.py the typed
keys and the eucarc/openrc reader they share.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
import tomllib
from pathlib import Path
from typing import Any

from imgstore.config import DEFAULT_CONFIG, SECTIONS, config_path
from registrar.access import ACCESS_KEYS, Access, parse_access
from registrar.config_eucalyptus import CloudConfig, parse_cloud
from registrar.config_keys import Keys
from registrar.config_openstack import OPENSTACK_KEYS, OpenStackConfig, parse_openstack
from registrar.errors import ConfigError

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

NO_CONFIG = f"no config file: give --config FILE, set $IMAGEPROXY_CONFIG or write {DEFAULT_CONFIG}"
# The keys `[cloud] type = "openstack"` takes; the tests hold the example config to them.
_OPENSTACK_KEYS = OPENSTACK_KEYS


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


def config_file(given: str | None) -> Path:
    """The config file a command reads: `given` (its --config), else $IMAGEPROXY_CONFIG, else
    the default if it exists (imgstore's rule: one for both daemons); ConfigError if none."""
    path = config_path(given)
    if path is None:
        raise ConfigError(NO_CONFIG)
    return path


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
        cloud = parse_openstack(_section(data, "cloud"), base_dir)
    else:
        cloud = parse_cloud(_section(data, "cloud"), base_dir)
    return Config(registrar=registrar, cloud=cloud, path=path)


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    section = data.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"[{name}] must be a table")
    return section


# --- [registrar] ---


def _parse_registrar(section: dict[str, Any], base_dir: Path) -> RegistrarConfig:
    known = {"listen", "bucket", "state_dir", "allowed_networks", *ACCESS_KEYS}
    keys = Keys("registrar", section, known)
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
