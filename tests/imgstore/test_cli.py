"""The `imgstore` command line without a mount: errors, add, ls, fetch, verify, evict."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess

import pytest

from tests.imgstore.helpers import IMGSTORE, MiB, ls_json, run, write_config


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "xyz", "http://127.0.0.1:1/a"], "not a SHA-1"),
        (["add", "a" * 39, "http://127.0.0.1:1/a"], "not a SHA-1"),
        (["add", "a" * 40, "ftp://example.org/a"], "not an http(s) URL"),
        (["add", "a" * 40, "file:///etc/passwd"], "not an http(s) URL"),
        (["add", "a" * 40, "http:///nohost"], "no host"),
        (["fetch", "b" * 40], "unknown blob"),
        (["verify", "b" * 40], "unknown blob"),
        (["evict", "b" * 40], "unknown blob"),
        (["mount", "--cache-size", "lots", "/nonexistent"], "not a size"),
        (["evict"], "or --all"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(cache, args, message):
    res = run(*args, "--cache-dir", cache, check=False)
    assert res.returncode in (1, 2)
    assert message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr


def test_a_url_with_credentials_is_refused_without_echoing_them(cache):
    res = run("add", "--cache-dir", cache, "c" * 40, "http://ops:s3cret@127.0.0.1:9/x", check=False)
    assert (res.returncode, res.stderr) == (
        2,
        "imgstore add: URL must not carry credentials (user:password@): http://***@127.0.0.1:9/x\n",
    )
    assert ls_json(cache) == {}


def test_unreachable_url_is_an_error(cache):
    res = run("add", "--cache-dir", cache, "c" * 40, "http://127.0.0.1:9/x.img", check=False)
    assert res.returncode == 1
    assert res.stderr.startswith("imgstore add: http://127.0.0.1:9/x.img: ")
    assert len(res.stderr.splitlines()) == 1  # no "mirror unusable" warning before it
    assert ls_json(cache) == {}


def test_missing_file_on_origin_is_an_error(cache, origin):
    res = run("add", "--cache-dir", cache, "c" * 40, origin.url("nothing.img"), check=False)
    assert res.returncode == 1
    assert "404" in res.stderr and len(res.stderr.splitlines()) == 1


def test_a_dead_mirror_beside_a_live_one_is_a_warning(cache, origin):
    data = os.urandom(1000)
    sha1 = hashlib.sha1(data).hexdigest()
    res = run("add", "--cache-dir", cache, sha1, "http://127.0.0.1:9/x", origin.put("a", data))
    assert "WARNING imgstore.client: mirror unusable: http://127.0.0.1:9/x:" in res.stderr
    assert ls_json(cache)[sha1]["state"] == "remote"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_requests", "abc", "max_requests: 'abc' is not a whole number"),
        ("retries", True, "retries: True is not a whole number"),
        ("read_deadline", [1], "read_deadline: [1] is not a number of seconds"),
        ("cache_size", "50X", "cache_size: not a size: '50X' (use e.g. 50G, 512M, 4MiB)"),
        ("connect_timeout", "soon", "connect_timeout: 'soon' is not a number of seconds"),
        ("metrics_listen", "nonsense", "[store] metrics_listen: 'nonsense' is not HOST:PORT"),
    ],
)
def test_a_bad_config_value_is_named_in_one_line(tmp_path, cache, key, value, message):
    conf = write_config(tmp_path / "c.toml", cache, **{key: value})
    for command in (["ls"], ["mount", "--foreground", str(tmp_path / "mnt")]):
        res = run(*command, "--config", conf, check=False)
        assert (res.returncode, res.stderr) == (2, f"imgstore {command[0]}: {message}\n")
    assert not (tmp_path / "mnt").exists() or not os.path.ismount(tmp_path / "mnt")


def test_unknown_config_key_is_named(tmp_path, cache):
    conf = tmp_path / "c.toml"
    conf.write_text(f'[store]\ncache_dir = "{cache}"\ncache_sise = "1G"\n')
    res = run("ls", "--config", conf, check=False)
    assert res.returncode == 2
    assert "cache_sise" in res.stderr


def test_cache_dir_from_config_and_from_imageproxy_home(tmp_path, cache, origin):
    data = os.urandom(1000)
    sha1 = hashlib.sha1(data).hexdigest()
    url = origin.put("a.bin", data)
    conf = write_config(tmp_path / "c.toml", cache)
    run("add", "--config", conf, sha1, url)
    assert sha1 in ls_json(cache)
    home = tmp_path / "home"
    env = dict(os.environ, IMAGEPROXY_HOME=str(home))
    env.pop("IMAGEPROXY_CONFIG", None)
    subprocess.run([*IMGSTORE, "add", sha1, url], env=env, check=True, capture_output=True)
    assert (home / "catalog.sqlite").exists()
    env.pop("IMAGEPROXY_HOME")
    res = subprocess.run([*IMGSTORE, "ls"], env=env, capture_output=True, text=True)
    assert res.returncode == 2
    assert "IMAGEPROXY_HOME" in res.stderr


def test_add_learns_exact_size_downloads_nothing_and_ls_shows_it(cache, origin):
    data = os.urandom(3 * MiB + 17)
    sha1 = hashlib.sha1(data).hexdigest()
    url = origin.put("a.bin", data)
    mirror = origin.put("mirror/a.bin", data)
    out = run("add", "--cache-dir", cache, sha1.upper(), f"  {url} ", mirror).stdout
    assert out.split() == [sha1, str(len(data)), "remote"]
    assert origin.bytes_sent() <= 2  # a one-byte ranged probe per URL
    blob = ls_json(cache)[sha1]
    assert blob["size"] == len(data)
    assert blob["urls"] == [url, mirror]
    table = run("ls", "--cache-dir", cache).stdout
    assert sha1 in table and "3.0 MiB" in table and "remote" in table and "(+1)" in table
    # Files and directories are private to the owner.
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert stat.S_IMODE((cache / "catalog.sqlite").stat().st_mode) == 0o600


def test_fetch_verify_evict_without_a_mount(cache, origin):
    data = os.urandom(9 * MiB)
    sha1 = hashlib.sha1(data).hexdigest()
    run("add", "--cache-dir", cache, sha1, origin.put("a.bin", data))
    origin.reset_counts()
    out = run("fetch", "--cache-dir", cache, sha1).stdout
    assert f"{sha1} verified" in out
    assert origin.bytes_sent("a.bin") == len(data)
    blob = ls_json(cache)[sha1]
    assert (blob["state"], blob["cached_bytes"]) == ("verified", len(data))
    assert (cache / "blobs" / sha1).read_bytes() == data
    assert stat.S_IMODE((cache / "blobs" / sha1).stat().st_mode) == 0o600

    assert f"{sha1} verified" in run("verify", "--cache-dir", cache).stdout
    # Damage the cache behind the store's back: verify notices and drops the blob.
    with open(cache / "blobs" / sha1, "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"\0garbage")
    res = run("verify", "--cache-dir", cache, sha1, check=False)
    assert res.returncode == 1
    assert f"{sha1} corrupt" in res.stdout
    assert ls_json(cache)[sha1]["state"] == "corrupt"

    res = run("fetch", "--cache-dir", cache, sha1, check=False)
    assert res.returncode == 1
    damaged = data[: 5 * MiB] + b"\0garbage" + data[5 * MiB + 8 :]
    got = hashlib.sha1(damaged).hexdigest()
    assert res.stderr == (
        f"imgstore fetch: blob {sha1} failed verification (content has SHA-1 {got}); re-add it\n"
    )
    run("add", "--cache-dir", cache, sha1, origin.url("a.bin"))  # re-add makes it fetchable
    assert run("fetch", "--cache-dir", cache, sha1).returncode == 0

    out = run("evict", "--cache-dir", cache, sha1).stdout
    assert "evicted" in out and "9.0 MiB freed" in out
    blob = ls_json(cache)[sha1]
    assert (blob["state"], blob["cached_bytes"]) == ("remote", 0)
    assert (cache / "blobs" / sha1).stat().st_blocks == 0


def test_fetch_of_wrong_bytes_fails(cache, origin):
    data = os.urandom(2 * MiB)
    sha1 = hashlib.sha1(b"something else").hexdigest()
    run("add", "--cache-dir", cache, sha1, origin.put("a.bin", data))
    other = os.urandom(MiB)
    good = hashlib.sha1(other).hexdigest()
    run("add", "--cache-dir", cache, good, origin.put("b.bin", other))
    res = run("fetch", "--cache-dir", cache, sha1, good, check=False)
    assert res.returncode == 1
    # One line for the failure, with the SHA-1 the bytes have; the other blob is still fetched.
    got = hashlib.sha1(data).hexdigest()
    assert res.stderr == (
        f"imgstore fetch: blob {sha1} failed verification (content has SHA-1 {got}); re-add it\n"
    )
    assert res.stdout == f"{good} verified\n"
    assert ls_json(cache)[sha1]["state"] == "corrupt"
    assert ls_json(cache)[good]["state"] == "verified"


def test_evict_refuses_pinned(cache, origin):
    from imgstore import client

    data = os.urandom(1000)
    sha1 = hashlib.sha1(data).hexdigest()
    run("add", "--cache-dir", cache, sha1, origin.put("a.bin", data))
    run("fetch", "--cache-dir", cache, sha1)
    client.pin(cache, sha1, "someone")
    res = run("evict", "--cache-dir", cache, sha1, check=False)
    assert res.returncode == 1 and "pinned by someone" in res.stderr
    assert ls_json(cache)[sha1]["cached_bytes"] == 1000


def test_every_subcommand_explains_itself():
    for cmd in ("mount", "add", "ls", "fetch", "verify", "evict", "umount"):
        res = run(cmd, "--help")
        assert res.stdout.startswith(f"usage: imgstore {cmd}")
        assert "--config" in res.stdout


def test_fetch_shows_a_progress_bar_on_a_terminal(cache, origin):
    data = os.urandom(5 * MiB)
    sha1 = hashlib.sha1(data).hexdigest()
    run("add", "--cache-dir", cache, sha1, origin.put("a.bin", data))
    cmd = " ".join([*IMGSTORE, "fetch", "--cache-dir", str(cache), sha1])
    res = subprocess.run(
        ["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout
    assert f"{sha1} verified" in res.stdout
    assert "100%" in res.stdout and "5.2 MB" in res.stdout  # rich's bar, decimal units


def test_changed_origin_content_is_refused_not_mixed(cache, origin):
    old = os.urandom(3 * MiB)
    sha1 = hashlib.sha1(old).hexdigest()
    run("add", "--cache-dir", cache, sha1, origin.put("a.bin", old))
    origin.put("a.bin", os.urandom(3 * MiB))  # same size, new content, new ETag
    res = run("fetch", "--cache-dir", cache, sha1, check=False)
    assert res.returncode == 1
    assert "ETag changed" in res.stderr
    assert ls_json(cache)[sha1]["cached_bytes"] == 0
