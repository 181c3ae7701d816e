"""An origin that ignores Range (nginx `max_ranges 0`) costs at most 1.05x the blob's bytes.

Counted in nginx's access log ($body_bytes_sent), from `imgstore add` on: the probe included.
The ranged GET probe used to cost a whole socket buffer's worth of body (3.75 MiB of 32 MiB
here) before it hung up; the HEAD in front of it tells such an origin for nothing.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.imgstore.helpers import MiB, ls_json
from tests.support.origin import start_origin

SIZE = 32 * MiB


@pytest.mark.parametrize("readers", [1, 4])
def test_an_origin_ignoring_range_costs_at_most_5_percent_more(
    store, image_factory, tmp_path, readers
):
    blob = image_factory.blob(SIZE, seed=17)
    sha1 = image_factory.sha1(blob)
    with start_origin(tmp_path / "norange", "max_ranges 0;") as origin:
        store.add(sha1, origin.put("b.img", blob))
        assert ls_json(store.cache_dir)[sha1]["size"] == SIZE
        store.mount()

        procs = [
            subprocess.Popen(["sha1sum", str(store.file(sha1))], stdout=subprocess.PIPE, text=True)
            for _ in range(readers)
        ]
        outputs = [p.communicate(timeout=60)[0] for p in procs]

        assert [o.split()[0] for o in outputs] == [sha1] * readers
        sent = origin.bytes_sent("b.img")
        assert sent <= 1.05 * SIZE, f"{sent / SIZE:.3f}x the blob"
        # The probe's HEAD, then one whole body for every reader.
        assert [(e["method"], e["status"]) for e in origin.log("b.img")] == [
            ("HEAD", 200),
            ("GET", 200),
        ]
