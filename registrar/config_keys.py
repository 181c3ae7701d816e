"""Reading the config file's sections: typed keys, URL checks, and eucarc/openrc files.

`Keys` wraps one TOML table: it refuses unknown keys up front and raises ConfigError naming
`[section] key` for a value of the wrong type or range. `read_env_file` reads the `NAME=value`
assignments of a eucarc or an openrc without running the shell.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from registrar.errors import ConfigError


def check_url(url: str) -> str | None:
    """What is wrong with `url` as a cloud endpoint (to follow the quoted value), or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "is not an http(s) URL"
    return None


def read_env_file(path: Path, key: str = "eucarc") -> dict[str, str]:
    """Read the `NAME=value` assignments of a eucarc or an openrc (`key` names which, for the
    error), expanding `${VAR}` from earlier lines.

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


class Keys:
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
