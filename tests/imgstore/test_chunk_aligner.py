"""ChunkAligner: a whole body, in pieces of any size and restarted from 0, cut into chunks."""

from __future__ import annotations

import os

from imgstore.chunks import ChunkAligner


def _feed_all(aligner: ChunkAligner, body: bytes, offset: int, piece: int) -> list[int]:
    got = []
    for at in range(offset, len(body), piece):
        got += [idx for idx, _ in aligner.feed(at, body[at : at + piece])]
    return got


def test_pieces_of_any_size_give_every_chunk_once_with_its_bytes():
    body = os.urandom(10 * 1000 + 7)
    for piece in (1, 999, 1000, 1001, 4096, len(body)):
        aligner = ChunkAligner(len(body), 1000)
        chunks = []
        for at in range(0, len(body), piece):
            chunks += aligner.feed(at, body[at : at + piece])
        assert [idx for idx, _ in chunks] == list(range(11))
        assert b"".join(data for _, data in chunks) == body


def test_a_restarted_body_drops_the_broken_pending_bytes_and_goes_on():
    body = os.urandom(5000)
    aligner = ChunkAligner(len(body), 1000)
    assert _feed_all(aligner, body[:2500], 0, 700) == [0, 1]
    # The answer broke at 2500 and a new one starts from 0: chunks 0 and 1 come again, and
    # the 500 bytes pending from the broken answer are not joined to the new bytes.
    chunks = list(aligner.feed(0, body))
    assert [idx for idx, _ in chunks] == [0, 1, 2, 3, 4]
    assert b"".join(data for _, data in chunks) == body


def test_a_body_resumed_mid_chunk_is_realigned_on_the_next_chunk():
    body = os.urandom(3000)
    aligner = ChunkAligner(len(body), 1000)
    chunks = list(aligner.feed(1500, body[1500:]))
    assert chunks == [(2, body[2000:])]
