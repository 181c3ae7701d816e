"""Moving from the original ImageProxy: take over the images its `imageproxy.db` registered.

The original kept one table, `IMAGE (SIGNATURE STRING, IMAGE_ID STRING)`: a part's SHA-1 and
the `emi-`/`eki-`/`eri-` id it registered, or a marker (`INPROGRESS`, …) for a registration
that never finished. `import_registry` records every id the cloud still has (one
DescribeImages for all of them) in our registry's `imported` table, so a RegisterImage whose
parts the original registered is answered with those ids without fetching or uploading.
Markers, malformed rows and ids the cloud no longer has are skipped and counted. Importing
twice changes nothing: a SHA-1 already imported keeps its first id.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from registrar.clouds import GONE_STATES
from registrar.errors import ConfigError
from registrar.registry import Imported, Registry

log = logging.getLogger(__name__)

_SHA1 = re.compile(r"[0-9a-f]{40}")
# Eucalyptus 3 wrote ids in upper-case hex (emi-1F3B3A9C): matched, and kept, as written.
_IMAGE_ID = re.compile(r"[ae]([mkr])i-[0-9a-f]{8,17}", re.IGNORECASE)
_KINDS = {"m": "machine", "k": "kernel", "r": "ramdisk"}


@dataclass(frozen=True)
class ImportReport:
    """What an import did, counted by outcome."""

    imported: int  # new rows in our registry
    already: int  # SHA-1s imported before (unchanged)
    markers: int  # unfinished registrations (INPROGRESS and other non-ids)
    malformed: int  # a SIGNATURE that is not a SHA-1
    gone: int  # ids the cloud no longer has

    def summary(self, path: Path) -> str:
        return (
            f"imported {self.imported} images from {path} ({self.already} already imported, "
            f"{self.gone} no longer in the cloud, {self.markers} unfinished registrations "
            f"skipped, {self.malformed} malformed rows skipped)"
        )


def read_original(path: Path) -> list[tuple[str, str]]:
    """The (SIGNATURE, IMAGE_ID) rows of an original `imageproxy.db`, read-only."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist or is not a file")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT SIGNATURE, IMAGE_ID FROM IMAGE").fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise ConfigError(
            f"{path} is not the original ImageProxy's registry (imageproxy.db with table "
            f"IMAGE (SIGNATURE, IMAGE_ID)): {exc}"
        ) from exc
    return [(str(sig or ""), str(image_id or "")) for sig, image_id in rows]


def import_registry(
    path: Path,
    registry: Registry,
    states: Callable[[Sequence[str]], Mapping[str, str]],
) -> ImportReport:
    """Import `path` into `registry`; `states(ids)` asks the cloud (one DescribeImages).

    `states` returns the state of each id the cloud knows (a backend's `states`).
    """
    rows = read_original(path)
    candidates: dict[str, Imported] = {}
    markers = malformed = 0
    for signature, image_id in rows:
        sha1, image_id = signature.strip().lower(), image_id.strip()
        kind = _IMAGE_ID.fullmatch(image_id)
        if kind is None:
            markers += 1
            continue
        if not _SHA1.fullmatch(sha1):
            malformed += 1
            continue
        candidates.setdefault(sha1, Imported(sha1, image_id, _KINDS[kind.group(1).lower()]))
    already_known = {i.sha1 for i in registry.all_imported()}
    fresh = [c for sha1, c in candidates.items() if sha1 not in already_known]
    found = states(sorted({c.image_id for c in fresh})) if fresh else {}
    alive = [c for c in fresh if c.image_id in found and found[c.image_id] not in GONE_STATES]
    added = registry.add_imported(alive)
    for entry in alive:
        log.info("imported %s %s for part %s", entry.kind, entry.image_id, entry.sha1)
    return ImportReport(
        imported=added,
        already=len(candidates) - len(fresh),
        markers=markers,
        malformed=malformed,
        gone=len(fresh) - len(alive),
    )
