from __future__ import annotations
import subprocess, time
import pytest
from tests.imgstore.helpers import MiB
from tests.support.origin import start_origin

@pytest.mark.timeout(100)
def test_norange(store, tmp_path, image_factory):
    blob = image_factory.blob(32 * MiB, seed=5)
    sha1 = image_factory.sha1(blob)
    with start_origin(tmp_path / "ng", "max_ranges 0;") as origin:
        url = origin.put("b.img", blob)
        store.add(sha1, url)
        print("add cost", origin.bytes_sent() / (32 * MiB), origin.log())
        origin.reset_counts()
        m = store.mount()
        out = subprocess.run(f"sha1sum {store.file(sha1)}", shell=True, capture_output=True, text=True)
        assert out.stdout.split()[0] == sha1
        print("read cost", origin.bytes_sent() / (32 * MiB), origin.log())
