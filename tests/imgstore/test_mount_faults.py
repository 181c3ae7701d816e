"""Wrong bytes, kill -9 mid-fetch, and a dead mount left behind: through a real mount."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import socket
import subprocess

import pytest

from tests.imgstore.helpers import MiB, ls_json, mount_cmd, run, wait_for

CHUNK = 4 * MiB


def test_wrong_bytes_fail_with_eio_and_the_blob_stays_corrupt(store, origin, image_factory):
    good = image_factory.blob(12 * MiB, seed=21)
    sha1 = image_factory.sha1(good)
    bad = bytearray(good.read_bytes())
    bad[7 * MiB] ^= 0xFF  # one flipped byte in the middle
    store.add(sha1, origin.put("wrong.bin", bytes(bad)))
    store.mount()
    f = store.file(sha1)

    cat = subprocess.run(["cat", str(f)], capture_output=True, timeout=120)
    assert cat.returncode != 0
    assert b"Input/output error" in cat.stderr
    # cat got bytes before the last piece, but never the whole blob.
    assert len(cat.stdout) < len(bad)

    assert os.getxattr(f, "user.imgstore.state") == b"corrupt"
    listed = ls_json(store.cache_dir)[sha1]
    assert listed["state"] == "corrupt"
    assert listed["cached_bytes"] == 0
    assert os.stat(store.cache_dir / "blobs" / sha1).st_blocks == 0  # cached data dropped

    origin.reset_counts()
    fd = os.open(f, os.O_RDONLY)
    try:
        for offset in (0, 5 * MiB, len(bad) - 10):
            with pytest.raises(OSError) as exc:
                os.pread(fd, 4096, offset)
            assert exc.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert origin.requests("wrong.bin") == 0  # nothing fetched, nothing served again

    # Re-adding (now with the right bytes) makes it readable again.
    store.add(sha1, origin.put("right.bin", good))
    assert ls_json(store.cache_dir)[sha1]["state"] == "remote"
    assert (
        subprocess.run(["sha1sum", str(f)], capture_output=True, text=True).stdout.split()[0]
        == sha1
    )


def test_tail_of_wrong_blob_is_served_without_forcing_a_full_fetch(store, origin, image_factory):
    blob = image_factory.blob(40 * MiB, seed=22)
    sha1 = image_factory.sha1(blob)
    store.add(sha1, origin.put("tail.bin", blob))
    store.mount()
    origin.reset_counts()
    tail = subprocess.run(["tail", "-c", "1000", str(store.file(sha1))], capture_output=True)
    assert tail.returncode == 0
    assert tail.stdout == blob.read_bytes()[-1000:]
    assert origin.bytes_sent("tail.bin") <= CHUNK
    assert os.getxattr(store.file(sha1), "user.imgstore.state") == b"partial"


def test_kill_9_mid_fetch_then_remount_resumes_and_verifies(store, origin, image_factory):
    image = image_factory.ext4(64, seed=31)
    sha1 = image_factory.sha1(image)
    size = image.stat().st_size
    store.add(sha1, origin.put("fs.img", image))
    # Small readahead and two requests in flight: the kill lands mid-blob.
    conf = store.cache_dir.parent / "store.toml"
    conf.write_text('[store]\nreadahead_max = "8MiB"\nmax_requests = 2\n')
    m = store.mount("--config", str(conf))
    origin.reset_counts()

    fd = os.open(store.file(sha1), os.O_RDONLY)
    assert os.read(fd, 20 * MiB) == image.read_bytes()[: 20 * MiB]
    # Bytes are served before they are durable; the catalog records them a moment later.
    recorded = lambda: ls_json(store.cache_dir)[sha1]["cached_bytes"]  # noqa: E731
    wait_for(lambda: recorded() >= 20 * MiB, what="the bytes read recorded as cached")
    m.kill(signal.SIGKILL)  # with readahead still in flight
    m.wait()
    # The fd is closed either way; whether close() reports the dead daemon depends on
    # whether the kernel still sends it a FLUSH. The listdir below shows it is gone.
    with contextlib.suppress(OSError):
        os.close(fd)
    cached_at_kill = ls_json(store.cache_dir)[sha1]["cached_bytes"]
    sent_before = origin.bytes_sent("fs.img")
    assert 20 * MiB <= cached_at_kill < size
    assert ls_json(store.cache_dir)[sha1]["state"] == "partial"
    with pytest.raises(OSError) as exc:
        os.listdir(store.mountpoint / "by-sha1")
    assert exc.value.errno == errno.ENOTCONN  # the dead mount the next mount must clean up

    # The daemonizing mount cleans up the dead mount itself (the fixture refuses to start on
    # a mountpoint that is still mounted, so this one is ours to stop).
    try:
        run("mount", "--config", conf, "--cache-dir", store.cache_dir, store.mountpoint)
        out = subprocess.run(["sha1sum", str(store.file(sha1))], capture_output=True, text=True)
        assert out.stdout.split()[0] == sha1
        assert os.getxattr(store.file(sha1), "user.imgstore.state") == b"verified"
        run("umount", store.mountpoint)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(store.mountpoint)], capture_output=True)
    total = origin.bytes_sent("fs.img")
    # Chunks recorded before the kill were not fetched again ...
    assert total - sent_before <= size - cached_at_kill
    # ... and all in all, at most the chunks in flight at the kill were fetched twice.
    assert total <= size + 2 * CHUNK


def test_mount_daemonizes_returns_when_usable_and_umount_stops_it(store, origin, image_factory):
    blob = image_factory.blob(1 * MiB, seed=41)
    sha1 = image_factory.sha1(blob)
    store.add(sha1, origin.put("d.bin", blob))
    store.mountpoint.mkdir()
    try:
        run("mount", "--cache-dir", store.cache_dir, store.mountpoint)
        # No waiting: the command returned, so the mount is usable now.
        assert os.listdir(store.mountpoint / "by-sha1") == [sha1]
        assert store.file(sha1).read_bytes() == blob.read_bytes()
        lock = (store.cache_dir / "mount.lock").read_text().split()
        pid = int(lock[1])
        second = run("mount", "--cache-dir", store.cache_dir, store.mountpoint, check=False)
        assert second.returncode == 1
        assert "already mounted" in second.stderr
        # The same cache elsewhere: the daemon finds it locked, and its reason is the one line.
        elsewhere = store.mountpoint.parent / "elsewhere"
        elsewhere.mkdir()
        third = run("mount", "--cache-dir", store.cache_dir, elsewhere, check=False)
        assert third.returncode == 1
        assert third.stderr == (
            f"imgstore mount: cache {store.cache_dir} is already mounted "
            f"(pid {pid} at {store.mountpoint})\n"
        )
        assert not os.path.ismount(elsewhere)
        run("umount", store.mountpoint)
        wait_for(lambda: not _alive(pid), what="the daemon to exit")
        assert not os.path.ismount(store.mountpoint)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(store.mountpoint)], capture_output=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_unmounts_cleanly(store):
    m = store.mount()
    m.kill(signal.SIGTERM)
    assert m.wait() == 0
    assert not os.path.ismount(store.mountpoint)
    assert "unmounted" in m.stderr_text()


def test_json_is_what_ls_prints(store, origin, image_factory):
    blob = image_factory.blob(1 * MiB, seed=42)
    sha1 = image_factory.sha1(blob)
    url = origin.put("j.bin", blob)
    store.add(sha1, url)
    data = json.loads(run("ls", "--json", "--cache-dir", store.cache_dir).stdout)
    assert data == [
        {
            "sha1": sha1,
            "size": MiB,
            "cached_bytes": 0,
            "state": "remote",
            "urls": [url],
            "pins": [],
            "last_used": data[0]["last_used"],
            "error": None,
        }
    ]


def test_foreground_mount_tells_systemd_it_is_ready(store, tmp_path):
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(30)
        m = store._mount(
            mount_cmd(store.cache_dir, store.mountpoint),
            store.mountpoint,
            env={"NOTIFY_SOCKET": address},
        )
        assert sock.recv(4096) == b"READY=1"
        assert os.listdir(store.mountpoint) == ["by-sha1"]
        m.kill(signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
        assert m.wait() == 0


def test_sigterm_with_a_read_stuck_on_a_stalled_origin_still_unmounts(store, faulty_origin):
    from tests.support.faulty import Faults

    data = os.urandom(3 * MiB)
    sha1 = hashlib.sha1(data).hexdigest()
    store.add(sha1, faulty_origin.add("a", data))
    faulty_origin.program("a", then=Faults(stall=120))
    m = store.mount()
    reader = subprocess.Popen(
        ["cat", str(store.file(sha1))], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    faulty_origin.wait_state("a", "paused")  # the read is now provably stuck
    m.kill(signal.SIGTERM)
    assert m.wait(timeout=30) == 0  # within the grace period, not the 60 s read deadline
    _, err = reader.communicate(timeout=30)
    assert reader.returncode != 0 and err
    assert not os.path.ismount(store.mountpoint)
