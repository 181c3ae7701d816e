"""Settings for the store: the `[store]` TOML section, command-line overrides, size parsing.

Keys of `[store]`:

- `cache_dir` (required somewhere: config, `--cache-dir` or `$IMAGEPROXY_HOME`)
- `mountpoint`
- `cache_size`: hard budget on allocated bytes, e.g. "50G" (default: unlimited)
- `min_free`: keep at least this much free on the cache filesystem (default "1G")
- `chunk_size`: fetch unit, aligned, default "4MiB"
- `readahead_max`: largest readahead window of a sequential reader, default "32MiB" (at 64 MiB
  a cold read ran no faster on loopback and held 25 MiB more chunk buffers)
- `max_requests`: ranged requests in flight per blob, default 8
- `read_deadline`: seconds a read may wait for the origin before failing with EIO, default 60
- `connect_timeout`: seconds, default 10
- `stall_timeout`: seconds a connection may stay silent mid-answer before it is dropped and the
  request retried on a new one (from the byte where it stopped), default 15; at most half of
  `read_deadline`, so that a retry fits in it
- `retries`: attempts per URL per chunk, default 4
- `fs_name`: name shown in /proc/mounts, default "imgstore"
- `allow_other`: let other users read the mount, default false
- `allowed_networks`: CIDRs that URLs from remote users (the registrar's SOAP requests) may reach
  although they are loopback, link-local or this host's (see imgstore/netpolicy.py); default: the
  same file's `[registrar] allowed_networks`, else []
- `http_proxy`: "http://HOST:PORT" of a caching proxy between this site and the origins (see
  README, "Many sites, one origin"); default: `http_proxy`/`https_proxy` from the environment.
  URLs from remote users use only this key (after their name is checked, see netpolicy)
- `metrics_listen`: "HOST:PORT" where the mount answers `GET /metrics` (Prometheus text); default
  "" (off). See imgstore/metrics_listener.py
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from imgstore.errors import ConfigError
from imgstore.netpolicy import parse_networks

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_UNITS = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kb": KiB,
    "kib": KiB,
    "m": MiB,
    "mb": MiB,
    "mib": MiB,
    "g": GiB,
    "gb": GiB,
    "gib": GiB,
    "t": 1024 * GiB,
    "tb": 1024 * GiB,
    "tib": 1024 * GiB,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse "50G", "512M", "4MiB", "1.5G" or a plain byte count; powers of 1024 throughout."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"size must not be negative: {text}")
        return text
    match = _SIZE_RE.match(str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"not a size: {text!r} (use e.g. 50G, 512M, 4MiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def human_size(n: int) -> str:
    """Format a byte count the way `ls -h` does, for tables."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclasses.dataclass
class StoreConfig:
    """Everything the store and the mount need; built by `load()`."""

    cache_dir: Path
    mountpoint: Path | None = None
    cache_size: int | None = None
    min_free: int = 1 * GiB
    chunk_size: int = 4 * MiB
    readahead_max: int = 32 * MiB
    max_requests: int = 8
    read_deadline: float = 60.0
    connect_timeout: float = 10.0
    stall_timeout: float = 15.0
    retries: int = 4
    fs_name: str = "imgstore"
    allow_other: bool = False
    allowed_networks: tuple[str, ...] = ()
    metrics_listen: str = ""
    http_proxy: str = ""

    @property
    def socket_timeout(self) -> float:
        """How long a connection may stay silent: `stall_timeout`, but at most half the read
        deadline. A silent connection that waited the whole deadline (a peer gone without an
        RST reaching us) would turn into EIO without a single retry."""
        return min(self.stall_timeout, self.read_deadline / 2)


_SIZE_KEYS = {"cache_size", "min_free", "chunk_size", "readahead_max"}
_INT_KEYS = {"max_requests", "retries"}
_FLOAT_KEYS = {"read_deadline", "connect_timeout", "stall_timeout"}
_KNOWN = {f.name for f in dataclasses.fields(StoreConfig)}


# The sections of the one file both daemons read; a misspelt section is an error, not ignored.
SECTIONS = ("store", "registrar", "cloud")


def read_store_section(path: Path | None) -> dict[str, Any]:
    """Return the `[store]` table of a TOML file, or {} without a file."""
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from exc
    for name in data:
        if name not in SECTIONS:
            raise ConfigError(f"config {path}: unknown section [{name}]")
    section = data.get("store", {})
    if not isinstance(section, dict):
        raise ConfigError(f"config {path}: [store] must be a table")
    for key in section:
        if key not in _KNOWN:
            raise ConfigError(f"config {path}: unknown key {key!r} in [store]")
    registrar = data.get("registrar", {})
    if "allowed_networks" not in section and isinstance(registrar, dict):
        # One file serves both daemons: the mount enforces what the registrar's operator allowed.
        if "allowed_networks" in registrar:
            section = {**section, "allowed_networks": registrar["allowed_networks"]}
    return section


def build(values: dict[str, Any]) -> StoreConfig:
    """Validate raw values (from TOML and flags) into a StoreConfig."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        try:
            out[key] = _convert(key, value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: {value!r} is not {_EXPECTED.get(key, 'valid')}") from None
        except ConfigError as exc:
            if key in str(exc):
                raise
            raise ConfigError(f"{key}: {exc}") from None
    if "cache_dir" not in out:
        home = os.environ.get("IMAGEPROXY_HOME")
        if not home:
            raise ConfigError(
                "no cache directory: give --cache-dir, [store] cache_dir or set $IMAGEPROXY_HOME"
            )
        out["cache_dir"] = Path(home)
    cfg = StoreConfig(**out)
    if cfg.chunk_size < 64 * KiB or cfg.chunk_size % (64 * KiB):
        raise ConfigError(f"chunk_size must be a multiple of 64 KiB, got {cfg.chunk_size}")
    return cfg


# Where both daemons look when neither --config nor $IMAGEPROXY_CONFIG names a file.
DEFAULT_CONFIG = Path("/etc/imageproxy/imageproxy.toml")


def config_path(explicit: str | os.PathLike[str] | None) -> Path | None:
    """The config file of a command: `--config`, else `$IMAGEPROXY_CONFIG`, else the default.

    A named file is returned even if missing, so that reading it reports the mistake; the
    default is returned only if it exists, since a store run from the command line needs none.
    The registrar imports this too: one rule for both daemons.
    """
    named = explicit or os.environ.get("IMAGEPROXY_CONFIG")
    if named:
        return Path(named)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load(path: Path | None, overrides: dict[str, Any]) -> StoreConfig:
    """Merge the `[store]` section of `path` with command-line `overrides` (which win)."""
    values = read_store_section(path)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return build(values)


def _convert(key: str, value: Any) -> Any:
    """One raw value (TOML or a flag) as the StoreConfig field wants it."""
    if key in _SIZE_KEYS:
        return parse_size(value)
    if key in _INT_KEYS | _FLOAT_KEYS and (isinstance(value, bool) or not _scalar(value)):
        raise TypeError(key)  # `true` would pass as 1; a table or list fails obscurely
    if key in _INT_KEYS:
        return _positive(key, int(value))
    if key in _FLOAT_KEYS:
        return _positive(key, float(value))
    if key in ("cache_dir", "mountpoint"):
        return Path(value).expanduser()
    if key == "allowed_networks":
        return tuple(str(n) for n in parse_networks(value, "[store] allowed_networks"))
    if key == "allow_other":
        if not isinstance(value, bool):
            raise ConfigError("allow_other must be true or false")
        return value
    if key == "metrics_listen" and value:
        parse_listen(str(value))  # checked now: a mount must not fail on it after forking
    return str(value)


def _scalar(value: Any) -> bool:
    return isinstance(value, int | float | str)


# What a value of the wrong type is told it should be.
_EXPECTED = {
    **dict.fromkeys(_INT_KEYS, "a whole number"),
    **dict.fromkeys(_FLOAT_KEYS, "a number of seconds"),
    **dict.fromkeys(_SIZE_KEYS, "a size (e.g. 50G, 512M, 4MiB)"),
    "cache_dir": "a path",
    "mountpoint": "a path",
}


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` (`[V6]:PORT` for IPv6) -> (host, port); ConfigError naming the key."""
    host, sep, port = listen.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"[store] metrics_listen: {listen!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _positive(key: str, value: float) -> Any:
    if value <= 0:
        raise ConfigError(f"{key} must be positive, got {value}")
    return value
