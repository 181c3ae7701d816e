"""The catalog is shared: `imgstore add` and `ls` in other processes while a mount streams."""

from __future__ import annotations

import json
import os
import subprocess
import threading

from imgstore import client
from tests.imgstore.helpers import MiB, run


def test_add_and_ls_from_other_processes_while_a_mount_streams(store, origin, image_factory):
    image = image_factory.ext4(64, seed=51)
    sha1 = image_factory.sha1(image)
    store.add(sha1, origin.put("fs.img", image))
    # Small blobs to add while streaming: distinct content, so distinct SHA-1s.
    extra = {}
    for i in range(8):
        blob = image_factory.blob(64 * 1024, seed=500 + i)
        extra[image_factory.sha1(blob)] = origin.put(f"x{i}.bin", blob)
    m = store.mount("--chunk-size", "1MiB")  # many chunk records while streaming

    reader = subprocess.Popen(["sha1sum", str(store.file(sha1))], stdout=subprocess.PIPE, text=True)
    failures: list[str] = []
    items = list(extra.items())

    def worker(k: int) -> None:
        for j in range(k, len(items), 4):
            x_sha1, url = items[j]
            for cmd in (["add", x_sha1, url], ["ls", "--json"], ["ls"]):
                res = run(cmd[0], "--cache-dir", store.cache_dir, *cmd[1:], check=False)
                if res.returncode != 0:
                    failures.append(f"{cmd}: {res.returncode} {res.stderr}")
                elif cmd[:2] == ["ls", "--json"]:
                    json.loads(res.stdout)
            # The registrar's way in, from a thread of another process.
            client.pin(store.cache_dir, x_sha1, f"t{k}")
            client.list_blobs(store.cache_dir)
            client.unpin(store.cache_dir, x_sha1, f"t{k}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out, _ = reader.communicate(timeout=120)

    assert failures == []
    assert out.split()[0] == sha1
    assert set(os.listdir(store.mountpoint / "by-sha1")) == {sha1, *extra}
    assert "locked" not in m.stderr_text()
    assert "Traceback" not in m.stderr_text()
    assert client.info(store.cache_dir, sha1).state == "verified"
    assert client.info(store.cache_dir, sha1).cached_bytes == 64 * MiB


def test_fetch_and_evict_beside_a_running_mount(store, origin, image_factory):
    blob = image_factory.blob(6 * MiB, seed=52)
    sha1 = image_factory.sha1(blob)
    store.add(sha1, origin.put("f.bin", blob))
    store.mount()
    # An operator pre-fetches while the mount is up: the mount then serves it without fetching.
    out = run("fetch", "--cache-dir", store.cache_dir, sha1, check=False)
    assert out.returncode == 0, out.stderr
    origin.reset_counts()
    assert store.file(sha1).read_bytes() == blob.read_bytes()
    assert origin.bytes_sent() == 0
    # Evicting a blob that a reader holds open is refused; once closed it works.
    with open(store.file(sha1), "rb"):
        res = run("evict", "--cache-dir", store.cache_dir, sha1, check=False)
        assert res.returncode == 1 and "open" in res.stderr
    res = run("evict", "--cache-dir", store.cache_dir, sha1, check=False)
    assert res.returncode == 0, res.stderr
    assert client.info(store.cache_dir, sha1).cached_bytes == 0
    assert store.file(sha1).read_bytes() == blob.read_bytes()  # fetched again, correctly


def test_verify_leaves_a_blob_that_a_mount_has_open(store, origin, image_factory):
    blob = image_factory.blob(2 * MiB, seed=53)
    sha1 = image_factory.sha1(blob)
    store.add(sha1, origin.put("v.bin", blob))
    store.mount()
    with open(store.file(sha1), "rb") as f:
        assert f.read() == blob.read_bytes()
        res = run("verify", "--cache-dir", store.cache_dir, sha1, check=False)
        assert res.returncode == 1 and "not verified now" in res.stdout
    res = run("verify", "--cache-dir", store.cache_dir, sha1, check=False)
    assert res.returncode == 0 and f"{sha1} verified" in res.stdout
