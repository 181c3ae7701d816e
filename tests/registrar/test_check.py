"""`registrar check`: each publishing mistake is caught with its message; a good image passes.

Images are served by a real nginx (tests/support/origin.py); one started with `max_ranges 0`
plays a server that ignores Range. The command runs in this process (`registrar.cli.main`),
except where a test needs a process of its own (a terminal, its peak memory, its environment):
there it is the installed console script.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from registrar.publish import Published
from tests.registrar.owner_support import (
    bars_on_a_terminal,
    publish_to,
    qcow2_image,
    run,
    run_measured,
    undrawn,
)
from tests.registrar.script_runs import run_script
from tests.support.images import ImageFactory, metadata_xml
from tests.support.nginxproc import free_port
from tests.support.origin import Origin, start_origin

FS_MIB = 8


def _kernel_ramdisk(image_factory: ImageFactory) -> dict[str, Path]:
    return {
        "kernel": image_factory.blob(1 << 20, 7, "kernel"),
        "ramdisk": image_factory.blob(1 << 19, 7, "ramdisk"),
    }


def _named(tmp_path: Path, files: dict[str, Path]) -> dict[str, Path]:
    """The factory's cached files under the names an owner would give them (hard links)."""
    (tmp_path / "files").mkdir(exist_ok=True)
    named = {}
    for name, source in files.items():
        named[name] = tmp_path / "files" / name
        os.link(source, named[name])
    return named


def _owners_set(origin: Origin, image_factory: ImageFactory, tmp_path: Path) -> Published:
    """An image, kernel and ramdisk under the names an owner gives them, published."""
    files = _named(
        tmp_path,
        {
            "centos7.img": image_factory.ext4(FS_MIB),
            "vmlinuz": image_factory.blob(1 << 20, 7, "kernel"),
            "initrd.img": image_factory.blob(1 << 19, 7, "ramdisk"),
        },
    )
    return publish_to(
        origin,
        tmp_path / "img",
        files["centos7.img"],
        kernel=files["vmlinuz"],
        ramdisk=files["initrd.img"],
    )


def _table(out: str) -> list[dict[str, str]]:
    """The rows of the table `check` prints through a pipe: columns aligned under the header."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("type  "))
    header = list(re.finditer(r"\S+", lines[start]))
    names = [m.group() for m in header]
    columns: list[int | None] = [m.start() for m in header] + [None]
    rows = []
    for line in lines[start + 1 :]:
        if not line[:1].strip():
            break  # the blank line or the indented notes after the table
        cells = [line[a:b].strip() for a, b in zip(columns, columns[1:], strict=False)]
        rows.append(dict(zip(names, cells, strict=True)))
    return rows


def _etag(url: str) -> str | None:
    """The ETag the server sends for `url`, asked with a HEAD request."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("HEAD", parts.path)
        return conn.getresponse().getheader("ETag")
    finally:
        conn.close()


def _put_metadata(
    origin: Origin, name: str, entries: list[tuple[str, str, str]]
) -> tuple[str, str]:
    xml = metadata_xml(entries)
    return origin.put(name, xml), hashlib.sha1(xml).hexdigest()


def test_a_good_image_passes_with_every_file_downloaded_once(
    capsys: pytest.CaptureFixture[str], origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    image = image_factory.sparse_tar_gz(FS_MIB)
    published = publish_to(origin, tmp_path / "good", image, **_kernel_ramdisk(image_factory))
    origin.reset_counts()

    code, out, err = run(capsys, "check", published.metadata_url, published.metadata_sha1)

    assert (code, err) == (0, ""), out
    assert f"SHA-1 {published.metadata_sha1} (ok)" in out
    assert "verdict: OK - every site would register it (3 file(s) downloaded and verified)" in out
    for f in published.files:
        line = next(row for row in out.splitlines() if row.startswith(f"{f.type} "))
        assert line.split()[1] == "yes" and " ok " in line and line.endswith(f.url)
    assert "gzip tar (member 'filesystem', sparse), 8.0 MiB raw" in out
    # The owner's server is on loopback: worth a note (once: every URL has that host), no more.
    loopback = (
        "  note: 127.0.0.1 is a loopback address (127.0.0.1): no other machine reaches it, and "
        "sites refuse loopback URLs"
    )
    assert loopback in out.splitlines() and out.count("is a loopback address") == 1
    # One ranged probe and one full download per file; the metadata once.
    for f in published.files:
        name = f"good/{f.path.name}"
        assert [e["range"] for e in origin.log(name)] == ["bytes=0-0", ""]
        assert origin.bytes_sent(name) == 1 + f.size
    assert origin.requests(f"good/{published.metadata_path.name}") == 1


def test_a_wrong_metadata_sha1_is_refused(
    capsys: pytest.CaptureFixture[str], origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    published = publish_to(origin, tmp_path / "img", image_factory.ext4(FS_MIB))
    wrong = "0" * 40

    code, out, _ = run(capsys, "check", published.metadata_url, wrong)

    assert code == 1
    assert (
        f"problem: the metadata's SHA-1 is {published.metadata_sha1}, not {wrong}: every site "
        "refuses it" in out
    )
    assert "verdict: NOT READY - 1 problem(s) above" in out


def test_a_part_whose_sha1_does_not_match_is_refused(
    capsys: pytest.CaptureFixture[str], origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    files = _kernel_ramdisk(image_factory)
    published = publish_to(origin, tmp_path / "img", image_factory.ext4(FS_MIB), **files)
    # The owner rebuilt the kernel after publishing, and uploaded only the kernel.
    other = image_factory.blob(1 << 20, 8, "kernel")
    origin.put(f"img/{files['kernel'].name}", other)

    code, out, _ = run(capsys, "check", published.metadata_url, published.metadata_sha1)

    assert code == 1
    declared = image_factory.sha1(files["kernel"])
    assert (
        f"problem: KERNEL: the file's SHA-1 is {image_factory.sha1(other)}, the metadata says "
        f"{declared}: every site refuses it" in out
    )
    assert out.count("problem:") == 1


@pytest.mark.parametrize("fmt", ["gz", "bz2", "xz"])
def test_a_compressed_image_declared_filesystem_is_refused(
    capsys: pytest.CaptureFixture[str], origin: Origin, image_factory: ImageFactory, fmt: str
) -> None:
    image = image_factory.compressed(fmt, FS_MIB)
    url = origin.put(f"fs.img.{fmt}", image)
    meta_url, meta_sha1 = _put_metadata(
        origin, "m.xml", [("FILESYSTEM", image_factory.sha1(image), url)]
    )

    code, out, _ = run(capsys, "check", meta_url, meta_sha1)

    assert code == 1
    name = {"gz": "gzip", "bz2": "bzip2", "xz": "xz"}[fmt]
    assert (
        f"problem: FILESYSTEM: declared FILESYSTEM, but the file is compressed ({name}, "
        f"8.0 MiB raw): declare it ZFILESYSTEM" in out
    )


def test_a_raw_image_declared_zfilesystem_is_refused_even_by_quick(
    capsys: pytest.CaptureFixture[str], origin: Origin, image_factory: ImageFactory
) -> None:
    image = image_factory.blob(32 << 20, 3)  # raw bytes, big beside what sockets buffer
    url = origin.put("fs.img", image)
    meta_url, meta_sha1 = _put_metadata(
        origin, "m.xml", [("ZFILESYSTEM", image_factory.sha1(image), url)]
    )
    origin.reset_counts()

    code, out, _ = run(capsys, "check", "--quick", meta_url, meta_sha1)

    assert code == 1
    assert (
        "problem: ZFILESYSTEM: declared ZFILESYSTEM, but the file is not compressed: declare it "
        "FILESYSTEM" in out
    )
    # --quick read the start only (nginx may have sent a little more before the hang-up).
    origin.wait_idle()
    assert origin.bytes_sent("fs.img") < image.stat().st_size // 2


def test_a_corrupt_zfilesystem_is_refused(
    capsys: pytest.CaptureFixture[str], origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    whole = image_factory.compressed("gz", FS_MIB).read_bytes()
    truncated = tmp_path / "cut.img.gz"
    truncated.write_bytes(whole[: len(whole) * 2 // 3])  # its SHA-1 is right: the file is not
    url = origin.put("cut.img.gz", truncated)
    meta_url, meta_sha1 = _put_metadata(
        origin, "m.xml", [("ZFILESYSTEM", image_factory.sha1(truncated), url)]
    )

    code, out, _ = run(capsys, "check", meta_url, meta_sha1)

    assert code == 1
    assert "problem: ZFILESYSTEM: gzip data is corrupt or truncated" in out


def test_a_server_ignoring_range_is_caught(
    capsys: pytest.CaptureFixture[str],
    image_factory: ImageFactory,
    tmp_path: Path,
) -> None:
    with start_origin(tmp_path / "norange", extra_http="max_ranges 0;") as origin:
        published = publish_to(origin, tmp_path / "img", image_factory.ext4(FS_MIB))

        code, out, _ = run(capsys, "check", published.metadata_url, published.metadata_sha1)

    assert code == 1
    assert (
        "problem: FILESYSTEM: the server ignores Range requests (it answered 200 to "
        "`Range: bytes=0-0`)" in out
    )
    assert "NO" in next(line for line in out.splitlines() if line.startswith("FILESYSTEM"))


@pytest.mark.parametrize("where", ["unresolvable host", "refused connection"])
def test_a_url_only_the_owner_can_reach_is_caught(
    capsys: pytest.CaptureFixture[str], origin: Origin, image_factory: ImageFactory, where: str
) -> None:
    image = image_factory.ext4(FS_MIB)
    if where == "unresolvable host":
        url = "http://images.internal.invalid/fs.img"  # .invalid never resolves (RFC 2606)
    else:
        url = f"http://127.0.0.1:{free_port()}/fs.img"  # nothing listens there
    meta_url, meta_sha1 = _put_metadata(
        origin, "m.xml", [("FILESYSTEM", image_factory.sha1(image), url)]
    )

    code, out, _ = run(capsys, "check", meta_url, meta_sha1)

    assert code == 1
    assert "problem: FILESYSTEM: unreachable from here (" in out
    assert "a URL must work from every site's head node, not only from your own network" in out
    assert next(line for line in out.splitlines() if line.startswith("FILESYSTEM")).split()[1] == (
        "NO"
    )


def test_metadata_the_service_would_refuse_is_refused_with_its_message(
    capsys: pytest.CaptureFixture[str], origin: Origin, image_factory: ImageFactory
) -> None:
    kernel = image_factory.blob(1 << 20, 7, "kernel")
    url = origin.put("vmlinuz", kernel)
    meta_url, meta_sha1 = _put_metadata(
        origin, "m.xml", [("KERNEL", image_factory.sha1(kernel), url)]
    )

    code, out, _ = run(capsys, "check", meta_url, meta_sha1)

    assert code == 1
    assert f"problem: metadata at {meta_url} lists no FILESYSTEM, ZFILESYSTEM or QCOW2 image" in out


@pytest.mark.parametrize(
    ("url", "signature", "message"),
    [
        ("http://example.org/m.xml", "not-a-sha1", "is not a SHA-1"),
        ("ftp://example.org/m.xml", "0" * 40, "only http and https are accepted"),
    ],
)
def test_bad_usage_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], url: str, signature: str, message: str
) -> None:
    code, out, err = run(capsys, "check", url, signature)

    assert (code, out) == (2, "")
    assert err.startswith("registrar check: ") and message in err
    assert err.count("\n") == 1


def test_a_qcow2_declared_filesystem_is_refused(
    capsys: pytest.CaptureFixture[str], origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    image = qcow2_image(tmp_path / "disk.qcow2")
    url = origin.put("disk.qcow2", image)
    meta_url, meta_sha1 = _put_metadata(
        origin, "m.xml", [("FILESYSTEM", image_factory.sha1(image), url)]
    )

    code, out, _ = run(capsys, "check", meta_url, meta_sha1)

    assert code == 1
    assert "problem: FILESYSTEM: declared FILESYSTEM, but the file is a qcow2 image" in out


def test_unreachable_metadata_is_caught(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}/centos7.xml"  # nothing listens there

    code, out, err = run(capsys, "check", url, "0" * 40)

    assert (code, err) == (1, "")
    assert f"problem: metadata at {url}: unreachable from here (" in out
    assert "verdict: NOT READY - 1 problem(s) above" in out


def test_a_file_not_uploaded_is_caught(
    capsys: pytest.CaptureFixture[str], origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    files = _kernel_ramdisk(image_factory)
    published = publish_to(origin, tmp_path / "img", image_factory.ext4(FS_MIB), **files)
    origin.remove(f"img/{files['ramdisk'].name}")

    code, out, _ = run(capsys, "check", published.metadata_url, published.metadata_sha1)

    assert code == 1
    assert "problem: RAMDISK: HTTP 404 Not Found (is the file uploaded under this name?)" in out
    assert out.count("problem:") == 1


def test_the_table_shows_each_files_size_and_the_servers_etag(
    capsys: pytest.CaptureFixture[str], origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    published = _owners_set(origin, image_factory, tmp_path)

    code, out, _ = run(capsys, "check", published.metadata_url, published.metadata_sha1)

    assert code == 0, out
    etags = {f.type: _etag(f.url) for f in published.files}
    assert None not in etags.values()
    assert [(r["type"], r["size"], r["etag"]) for r in _table(out)] == [
        ("FILESYSTEM", "8.0 MiB", etags["FILESYSTEM"]),
        ("KERNEL", "1.0 MiB", etags["KERNEL"]),
        ("RAMDISK", "512.0 KiB", etags["RAMDISK"]),
    ]


def test_a_server_without_etags_gets_a_note_and_the_image_still_passes(
    capsys: pytest.CaptureFixture[str], image_factory: ImageFactory, tmp_path: Path
) -> None:
    with start_origin(tmp_path / "noetag", extra_http="etag off;") as origin:
        published = publish_to(origin, tmp_path / "img", image_factory.ext4(FS_MIB))
        assert _etag(published.files[0].url) is None

        code, out, _ = run(capsys, "check", published.metadata_url, published.metadata_sha1)

    assert code == 0, out
    assert [(r["type"], r["etag"]) for r in _table(out)] == [("FILESYSTEM", "-")]
    assert (
        "  note: FILESYSTEM: no ETag: a site cannot tell if the file changes while it reads it"
        in out.splitlines()
    )
    assert "verdict: OK - every site would register it (1 file(s) downloaded and verified)" in out


def test_progress_shows_on_a_terminal_and_stdout_is_what_a_pipe_gets(
    origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    published = _owners_set(origin, image_factory, tmp_path)
    argv = ["check", published.metadata_url, published.metadata_sha1]

    shown = bars_on_a_terminal(*argv, workdir=tmp_path)

    assert "verdict:" not in shown
    bars = {
        "FILESYSTEM centos7.img": "8.4/8.4 MB",
        "KERNEL vmlinuz": "1.0/1.0 MB",
        "RAMDISK initrd.img": "524.3/524.3 kB",
    }
    assert undrawn(shown, bars) == [], shown


def test_check_writes_no_file_it_could_cache(
    origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    # A ZFILESYSTEM: decompressing it is where a temporary file would be most tempting.
    image = image_factory.sparse_tar_gz(FS_MIB)
    published = publish_to(origin, tmp_path / "img", image, **_kernel_ramdisk(image_factory))
    places = ["HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME", "TMPDIR"]
    places += ["IMAGEPROXY_HOME", "cwd"]
    dirs = {place: tmp_path / "empty" / place for place in places}
    for d in dirs.values():
        d.mkdir(parents=True)
    env = {**os.environ, **{place: str(d) for place, d in dirs.items() if place != "cwd"}}

    done = run_script(
        "check", published.metadata_url, published.metadata_sha1, cwd=dirs["cwd"], env=env
    )

    assert (done.returncode, done.stderr) == (0, ""), done.stdout
    assert "(3 file(s) downloaded and verified)" in done.stdout
    assert {place: list(d.iterdir()) for place, d in dirs.items()} == {p: [] for p in places}


# `truncate -s 1G f; sha1sum f`: a sparse file reads as zeros.
GIB_OF_ZEROS_SHA1 = "2a492f15396a6768bcbca016993f4b4c8b0b5307"


@pytest.mark.slow
def test_a_large_file_is_downloaded_as_a_stream_not_held_whole(
    origin: Origin, tmp_path: Path
) -> None:
    image = tmp_path / "big.img"
    image.touch()
    os.truncate(image, 1 << 30)  # sparse: no disk space, and nginx sends it fast
    url = origin.put("big.img", image)
    meta_url, meta_sha1 = _put_metadata(origin, "m.xml", [("FILESYSTEM", GIB_OF_ZEROS_SHA1, url)])
    origin.reset_counts()

    done = run_measured("check", meta_url, meta_sha1, workdir=tmp_path)

    assert (done.code, done.stderr) == (0, ""), done.stdout
    assert [(r["size"], r["sha1"]) for r in _table(done.stdout)] == [("1.0 GiB", "ok")]
    assert origin.bytes_sent("big.img") == 1 + (1 << 30)  # the probe's byte, then all of it
    # The interpreter and its imports take about 60 MiB; holding the body would take 1 GiB more.
    assert done.peak_rss < 200 << 20, f"peak RSS {done.peak_rss >> 20} MiB"
