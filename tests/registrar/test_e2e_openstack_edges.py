"""End to end on OpenStack, the edges: what the user sees when Keystone or Glance says no, and
how a large image travels (streamed from the origin into Glance, in bounded memory, no copy).

The real SOAP service and `registrar install-image`, the real imgstore mount, a real Glance
(alone, or behind a real Keystone). The sites come from test_e2e_openstack.py's fixtures.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zeep.exceptions

from tests.registrar.e2e_stack import Stack
from tests.registrar.script_runs import run_script
from tests.registrar.soap_javaprops import loads
from tests.registrar.test_e2e_openstack import os_stack_factory  # noqa: F401
from tests.registrar.test_install_image_cli import one_line_error
from tests.support.images import ImageFactory, ImageSet, metadata_xml
from tests.support.openstack import GlanceServer, KeystoneGlance, download_image, free_port
from tests.support.origin import Origin
from tests.support.resetproxy import start_reset_proxy

MiB = 1 << 20


def _with_cloud(stack: Stack, **keys: str) -> Stack:
    """Rewrite the site's [cloud] section with `keys` (keeping its name prefix and timeouts).

    The mount, already running, read only [store]; the registrar reads [cloud] when it starts.
    """
    prefix: str = stack.prefix  # type: ignore[attr-defined]
    head, rest = stack.config.read_text().split("[cloud]\n", 1)
    _, store = rest.split("\n[store]\n", 1)
    lines = [f'{k} = "{v}"' for k, v in {"type": "openstack", **keys}.items()]
    lines += [f'name_prefix = "{prefix}"', "register_timeout = 120", "poll_interval = 0.2"]
    stack.config.write_text(head + "[cloud]\n" + "\n".join(lines) + "\n\n[store]\n" + store)
    return stack


def _keystone_keys(kg: KeystoneGlance, **overrides: str) -> dict[str, str]:
    return {
        "auth_url": kg.auth_url,
        "username": kg.username,
        "password": kg.password,
        "project_name": kg.project_name,
        "user_domain_name": kg.user_domain_name,
        "project_domain_name": kg.project_domain_name,
        "region": kg.region,
        **overrides,
    }


def _named(glance_url: str, prefix: str, token: str | None = None) -> list[dict[str, Any]]:
    """The images in a Glance whose names start with `prefix`, any status."""
    headers = {"X-Auth-Token": token} if token else {}
    request = urllib.request.Request(f"{glance_url}/v2/images?limit=1000", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        images = json.loads(response.read())["images"]
    return [i for i in images if i["name"].startswith(prefix)]


def _small_set(origin: Origin, image_factory: ImageFactory, seed: int) -> ImageSet:
    return image_factory.publish(
        origin, size_mib=4, fs_format="raw", seed=seed, kernel=False, ramdisk=False
    )


def _refused_both_ways(stack: Stack, images: ImageSet, kernel: Path, refusal: str) -> None:
    """RegisterImage faults, and `registrar install-image` fails, with `refusal`, one line."""
    registrar = stack.start()
    service = stack.zeep(registrar)
    fs = images.parts["FILESYSTEM"]
    for _ in range(2):  # a retry hears the same: a refusal leaves no job to clean up first
        with pytest.raises(zeep.exceptions.Fault) as caught:
            service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1)
        assert caught.value.message == (
            f"registering the FILESYSTEM image from {fs.url} failed: {refusal}"
        )
    assert "cleanup failed" not in registrar.log_text()
    installed = run_script(
        "install-image", "--config", str(stack.config), "--type", "kernel", str(kernel)
    )
    assert installed.returncode == 1
    assert one_line_error(installed) == f"registrar: error: {refusal}"
    assert installed.stdout == ""


def test_a_wrong_keystone_password_is_one_line_naming_authenticate(
    os_stack_factory: Callable[[str], Stack],  # noqa: F811
    keystone_glance: KeystoneGlance,
    origin: Origin,
    image_factory: ImageFactory,
) -> None:
    kg = keystone_glance
    stack = _with_cloud(os_stack_factory(kg.glance_url), **_keystone_keys(kg, password="wrong"))
    _refused_both_ways(
        stack,
        _small_set(origin, image_factory, 41),
        image_factory.blob(1 << 20, 41, "kernel"),
        f"authenticate: credentials refused by Keystone (HTTP 401) at Keystone {kg.auth_url}",
    )
    assert _named(kg.glance_url, stack.prefix, kg.admin_token()) == []  # type: ignore[attr-defined]


def test_an_unreachable_glance_is_one_line_naming_image_create(
    os_stack_factory: Callable[[str], Stack],  # noqa: F811
    glance_noauth: GlanceServer,
    origin: Origin,
    image_factory: ImageFactory,
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    stack = os_stack_factory(closed)
    _refused_both_ways(
        stack,
        _small_set(origin, image_factory, 42),
        image_factory.blob(1 << 20, 42, "kernel"),
        f"image create: cannot connect to Glance {closed}/v2",
    )
    assert _named(glance_noauth.url, stack.prefix) == []  # type: ignore[attr-defined]


def test_a_policy_refusal_is_one_line_with_403_naming_image_create(
    os_stack_factory: Callable[[str], Stack],  # noqa: F811
    keystone_glance: KeystoneGlance,
    origin: Origin,
    image_factory: ImageFactory,
) -> None:
    """A member may not make a public image (Glance's default policy): Glance says 403."""
    kg = keystone_glance
    keys = _keystone_keys(kg, username=kg.member, password=kg.member_password)
    stack = _with_cloud(os_stack_factory(kg.glance_url), **keys, visibility="public")
    _refused_both_ways(
        stack,
        _small_set(origin, image_factory, 43),
        image_factory.blob(1 << 20, 43, "kernel"),
        f"image create: forbidden (HTTP 403) by Glance {kg.glance_url}/v2: "
        "You are not authorized to complete publicize_image action.",
    )
    assert _named(kg.glance_url, stack.prefix, kg.admin_token()) == []  # type: ignore[attr-defined]


# --- a large image: streamed, in bounded memory, with no temporary copy ---

BIG = 384 * MiB
NEAR_BIG = BIG // 8  # a file this large, or larger, could hold a copy of a good part of it
MAX_PEAK_RSS = 150 * MiB


def _peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def _open_files(pid: int, mountpoint: Path) -> list[tuple[str, int]]:
    """Regular files the process holds open outside the mount (deleted ones too), with sizes."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            if target.startswith(f"{mountpoint}/"):
                continue  # the image itself, read through imgstore
            info = os.stat(fd)  # the open file, even if its name is gone
        except FileNotFoundError:
            continue  # closed since the listing
        if stat.S_ISREG(info.st_mode):
            found.append((target, max(info.st_size, info.st_blocks * 512)))
    return found


def _big_files(roots: list[Path], at_least: int) -> list[tuple[str, int]]:
    """Files under `roots` (symlinks not followed) of at least `at_least` bytes."""
    found = []
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                try:
                    info = os.lstat(path)
                except FileNotFoundError:
                    continue
                size = max(info.st_size, info.st_blocks * 512)
                if stat.S_ISREG(info.st_mode) and size >= at_least:
                    found.append((path, size))
    return found


def test_a_large_image_streams_from_origin_to_glance_in_bounded_memory_without_a_copy(
    os_stack_factory: Callable[[str], Stack],  # noqa: F811
    glance_noauth: GlanceServer,
    origin: Origin,
    image_factory: ImageFactory,
    tmp_path: Path,
) -> None:
    """Both ends metered by byte-counting TCP proxies: the origin's, and Glance's, which looks
    at the registrar (its memory, its open files, its directories) when Glance has had half
    the image, holding the upload there while it looks."""
    image = image_factory.blob(BIG, 44)  # pseudo-random: nothing to gain by compressing
    sha1 = image_factory.sha1(image)
    origin.put("big.img", image)
    with (
        start_reset_proxy(origin.port, after=0, first=0) as origin_meter,
        start_reset_proxy(glance_noauth.port, after=0, first=0) as glance_meter,
    ):
        part_url = origin_meter.url("big.img")
        xml = metadata_xml([("FILESYSTEM", sha1, part_url)])
        meta_url, meta_sha1 = origin.put("big.xml", xml), hashlib.sha1(xml).hexdigest()
        stack = os_stack_factory(glance_meter.url().rstrip("/"))
        tmpdir, cwd = tmp_path / "tmp", tmp_path / "cwd"  # empty, the registrar's own
        tmpdir.mkdir()
        cwd.mkdir()
        registrar = stack.start(env={"TMPDIR": str(tmpdir)}, cwd=cwd)
        pid = registrar.proc.pid
        roots = [tmpdir, stack.state_dir, cwd]
        first: list[tuple[int, int]] = []  # (bytes Glance had, bytes the origin had served)
        halfway: list[dict[str, Any]] = []

        def look(glance_had: int) -> None:
            # Request headers before the upload (a list, the create) are well under 1 MiB.
            if glance_had >= MiB and not first:
                first.append((glance_had, origin_meter.upstream_bytes()))
            if glance_had >= BIG // 2 and not halfway:
                halfway.append(
                    {
                        "origin": origin_meter.upstream_bytes(),
                        "open": _open_files(pid, stack.mountpoint),
                        "files": _big_files(roots, NEAR_BIG),
                    }
                )

        glance_meter.on_request = look
        answer = loads(stack.zeep(registrar).RegisterImage(url=meta_url, signature=meta_sha1))
        served = origin_meter.upstream_bytes()
        peak = _peak_rss(pid)

    assert served >= BIG  # it was all fetched from the origin, through the meter
    # (a) The upload began before the origin had served a quarter of the file (imgstore's
    # readahead is bounded: about 40 MiB here); half way through it, the origin was not done.
    assert first and first[0][1] < BIG // 4, first
    assert halfway and halfway[0]["origin"] < BIG, halfway
    # (b) Memory: a few chunks in flight, not the image.
    assert peak < MAX_PEAK_RSS, f"peak RSS {peak / MiB:.0f} MiB"
    # (c) No copy: nothing near the image's size held open, nor in its directories, during
    # the upload or after it.
    assert all(size < NEAR_BIG for _, size in halfway[0]["open"]), halfway
    assert halfway[0]["files"] == []
    assert _big_files(roots, NEAR_BIG) == []
    # (d) What Glance stores is the source, byte for byte.
    image_id = answer["FILESYSTEM"]
    assert hashlib.sha1(download_image(glance_noauth.url, image_id)).hexdigest() == sha1
