"""docs/imageproxy.example.toml documents every key both daemons accept, and nothing else.

The example is loaded by both real parsers, as is and with every commented-out key switched on
(so a documented key a parser rejects fails here); the documented keys are compared with the
keys the parsers know (so a key added to a parser without documenting it fails here); and the
commented-out lines are checked to show the parsers' real defaults.

The parsers do not export their key sets, so they are derived from their settings dataclasses:
each `StoreConfig`, `RegistrarConfig` and `CloudConfig` field is one key, except the fields
`host` and `port` that `[registrar] listen` is split into, plus `[cloud] eucarc`, which is read
rather than stored.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from imgstore import config as store_config
from imgstore.errors import ConfigError as StoreConfigError
from registrar import config as registrar_config
from registrar.errors import ConfigError as RegistrarConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "imageproxy.example.toml"

# Keys shown commented out because they are an alternative, not a default.
ALTERNATIVES = {("cloud", "eucarc")}

_SECTION = re.compile(r"^\[(\w+)\]")
_COMMENTED_KEY = re.compile(r"^# ([a-z][a-z0-9_]*) = (.+)$")


def known_keys() -> dict[str, set[str]]:
    def fields(cls: type) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    return {
        "store": fields(store_config.StoreConfig),
        "registrar": fields(registrar_config.RegistrarConfig) - {"host", "port"},
        "cloud": fields(registrar_config.CloudConfig) | {"eucarc"},
    }


def commented_keys(text: str) -> dict[tuple[str, str], str]:
    """`# key = value` lines, by (section, key), with their value text."""
    section, found = "", {}
    for line in text.splitlines():
        if match := _SECTION.match(line):
            section = match.group(1)
        elif match := _COMMENTED_KEY.match(line):
            assert section, f"commented key before any section: {line!r}"
            assert (section, match.group(1)) not in found, f"documented twice: {line!r}"
            found[(section, match.group(1))] = match.group(2)
    return found


def uncomment_all(text: str, eucarc: Path) -> str:
    """The example with every `# key = value` line switched on; eucarc pointed at `eucarc`."""
    out = []
    for line in text.splitlines():
        if match := _COMMENTED_KEY.match(line):
            key = match.group(1)
            line = f'{key} = "{eucarc}"' if key == "eucarc" else line[2:]
        out.append(line)
    return "\n".join(out) + "\n"


def write_eucarc(directory: Path) -> Path:
    path = directory / "eucarc"
    path.write_text(
        "EUCA_KEY_DIR=$(cd $(dirname ${BASH_SOURCE:-$0}); pwd -P)\n"
        "export EC2_URL=http://head.example.org:8773/services/compute\n"
        "export S3_URL=http://head.example.org:8773/services/objectstorage\n"
        "export EC2_ACCESS_KEY='AKIFROMEUCARC'\n"
        "export EC2_SECRET_KEY='from-eucarc'\n"
        "export EC2_ACCOUNT_NUMBER='210987654321'\n"
        "export EUCALYPTUS_CERT=${EUCA_KEY_DIR}/cloud-cert.pem\n"
    )
    return path


def test_the_example_loads_with_both_parsers() -> None:
    store = store_config.load(EXAMPLE, {})
    assert store.cache_dir == Path("/var/cache/imageproxy")
    assert store.mountpoint == Path("/var/lib/imageproxy/images")
    config = registrar_config.load(EXAMPLE)
    assert config.cloud is not None
    assert config.registrar.port == 8080


def test_every_key_the_parsers_know_is_documented_and_nothing_else() -> None:
    text = EXAMPLE.read_text()
    data = tomllib.loads(text)
    assert set(data) == {"store", "registrar", "cloud"}
    documented = {section: set(table) for section, table in data.items()}
    for section, key in commented_keys(text):
        assert key not in documented[section], f"[{section}] {key} is both set and commented"
        documented[section].add(key)
    assert documented == known_keys()


def test_every_documented_key_is_accepted_and_commented_lines_show_the_defaults(
    tmp_path: Path,
) -> None:
    variant = tmp_path / "imageproxy.toml"
    variant.write_text(uncomment_all(EXAMPLE.read_text(), write_eucarc(tmp_path)))

    assert store_config.load(variant, {}) == store_config.load(EXAMPLE, {})
    as_is, switched_on = registrar_config.load(EXAMPLE), registrar_config.load(variant)
    assert switched_on.registrar == as_is.registrar
    # The eucarc is an alternative source: every value it could supply is set explicitly in
    # the example, so switching it on changes nothing either.
    assert switched_on.cloud == as_is.cloud
    assert ("cloud", "eucarc") in commented_keys(EXAMPLE.read_text())


def test_the_eucarc_alternative_works_on_its_own(tmp_path: Path) -> None:
    """The example's [cloud] with only `eucarc` (the first of its two ways) is complete."""
    eucarc = write_eucarc(tmp_path)
    text = EXAMPLE.read_text().split("\n[cloud]\n")[0] + f'\n[cloud]\neucarc = "{eucarc}"\n'
    path = tmp_path / "imageproxy.toml"
    path.write_text(text)
    cloud = registrar_config.load(path).require_cloud()
    assert cloud.access_key == "AKIFROMEUCARC"
    assert cloud.cloud_cert == tmp_path.resolve() / "cloud-cert.pem"


@pytest.mark.parametrize(
    ("section", "line", "named"),
    [
        ("store", 'cache_sise = "1G"', "cache_sise"),
        ("registrar", 'listen_on = "0.0.0.0:8080"', "listen_on"),
        ("cloud", "upload_concurency = 4", "upload_concurency"),
    ],
)
def test_a_typo_in_the_example_is_refused_naming_the_key(
    tmp_path: Path, section: str, line: str, named: str
) -> None:
    text = EXAMPLE.read_text().replace(f"[{section}]\n", f"[{section}]\n{line}\n", 1)
    path = tmp_path / "imageproxy.toml"
    path.write_text(text)
    with pytest.raises((StoreConfigError, RegistrarConfigError), match=named):
        store_config.load(path, {})
        registrar_config.load(path)
