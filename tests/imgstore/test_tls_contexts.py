"""Declaring blobs loads the TLS trust stores once per process, not once per blob.

`client.add` probes each blob's URLs with a short-lived Origin (the registrar calls it for every
part of an image); building its three TLS contexts loaded a trust store each time, about 75 ms
of CPU per part before the part's first request.
"""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

import pytest

from imgstore import client
from tests.imgstore.plainhttp import no_range_origin


def test_declaring_five_blobs_loads_each_trust_store_at_most_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "blob").write_bytes(b"x" * 4096)
    loads: list[str] = []
    for method in ("load_verify_locations", "load_default_certs"):
        original = getattr(ssl.SSLContext, method)

        def counted(self, *args, _original=original, _name=method, **kwargs):  # type: ignore[no-untyped-def]
            loads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(ssl.SSLContext, method, counted)
    with no_range_origin(www) as origin:
        for i in range(5):
            sha1 = hashlib.sha1(b"blob %d" % i).hexdigest()
            info = client.add(tmp_path / "cache", sha1, [origin.url("blob")])
            assert info.size == 4096
    # At most one load for httpx's context and one for the thread transport's (none if an
    # earlier test in this process built them); before, three per blob.
    assert len(loads) <= 2, loads
