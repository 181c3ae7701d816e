"""Both daemons find their one config file the same way: --config, $IMAGEPROXY_CONFIG, /etc."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from imgstore import config


def test_explicit_then_environment_then_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = tmp_path / "etc" / "imageproxy.toml"
    monkeypatch.setattr(config, "DEFAULT_CONFIG", default)
    monkeypatch.delenv("IMAGEPROXY_CONFIG", raising=False)

    assert config.config_path(None) is None  # no default file: command-line use needs none
    default.parent.mkdir()
    default.write_text("[store]\n")
    assert config.config_path(None) == default

    monkeypatch.setenv("IMAGEPROXY_CONFIG", str(tmp_path / "env.toml"))
    assert config.config_path(None) == tmp_path / "env.toml"  # named even if missing
    assert config.config_path(str(tmp_path / "cli.toml")) == tmp_path / "cli.toml"


@pytest.mark.skipif(config.DEFAULT_CONFIG.exists(), reason="this host has a real config")
def test_registrar_without_any_config_says_where_it_looked() -> None:
    env = {k: v for k, v in os.environ.items() if k != "IMAGEPROXY_CONFIG"}
    done = subprocess.run(
        ["registrar", "serve"], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "registrar serve: no config file: give --config FILE, set $IMAGEPROXY_CONFIG or write "
        "/etc/imageproxy/imageproxy.toml"
    ]


def test_imgstore_reads_the_file_imageproxy_config_names(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    conf = tmp_path / "imageproxy.toml"
    conf.write_text(f'[store]\ncache_dir = "{cache}"\n')
    env = {**os.environ, "IMAGEPROXY_CONFIG": str(conf)}
    done = subprocess.run(
        ["imgstore", "ls", "--json"], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert (cache / "catalog.sqlite").exists()


def test_imgstore_options_before_the_subcommand_count(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    conf = tmp_path / "imageproxy.toml"
    conf.write_text(f'[store]\ncache_dir = "{cache}"\n')
    env = {k: v for k, v in os.environ.items() if k != "IMAGEPROXY_CONFIG"}
    done = subprocess.run(
        ["imgstore", "--config", str(conf), "ls", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (cache / "catalog.sqlite").exists()


def test_a_misspelt_section_is_refused_by_both_daemons(tmp_path: Path) -> None:
    from registrar import config as registrar_config
    from registrar.errors import ConfigError as RegistrarConfigError

    conf = tmp_path / "imageproxy.toml"
    conf.write_text(f'[stroe]\ncache_dir = "{tmp_path}"\n')
    with pytest.raises(config.ConfigError, match=r"unknown section \[stroe\]"):
        config.load(conf, {})
    with pytest.raises(RegistrarConfigError, match=r"unknown section \[stroe\]"):
        registrar_config.load(conf)
