"""One open file: the byte ranges it has read, and its sequential-read state for readahead.

The ranges decide the gate (docs/imgstore-design.md, "The gate"): a read that would make them
cover the whole blob is answered only after the SHA-1 matched.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging

from imgstore.blob import Blob

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Handle:
    """One open file: what it has read, and its sequential-read state for readahead."""

    blob: Blob
    # Disjoint, sorted spans this handle has read, and their total: a random reader makes
    # thousands, so each read costs a bisect, not a sort of them all.
    covered: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    covered_bytes: int = 0
    # Reads of this handle still in progress count as covered when deciding whether a read
    # completes the handle: of two concurrent reads, the later one is gated.
    pending: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    next_off: int = 0
    window: int = 0
    advised: int = 0  # the page cache was asked to read the data file up to here

    def would_complete(self, start: int, end: int) -> bool:
        """True if reading [start, end) makes this handle's reads cover the whole blob."""
        extra = end - start + sum(e - s for s, e in self.pending)
        if self.covered_bytes + extra < self.blob.size:
            return False  # too few bytes, whatever they are
        return _covers(_merge([*self.covered, *self.pending, (start, end)]), self.blob.size)

    def add(self, start: int, end: int) -> None:
        spans = self.covered
        i = bisect.bisect_left(spans, (start,))
        if i and spans[i - 1][1] >= start:
            i -= 1
            start = spans[i][0]
        j = i
        while j < len(spans) and spans[j][0] <= end:
            end = max(end, spans[j][1])
            j += 1
        self.covered_bytes += end - start - sum(e - s for s, e in spans[i:j])
        spans[i:j] = [(start, end)]


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _covers(spans: list[tuple[int, int]], size: int) -> bool:
    return size == 0 or (len(spans) == 1 and spans[0][0] <= 0 and spans[0][1] >= size)
