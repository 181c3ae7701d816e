"""Names Eucalyptus accepts for images and for bundle prefixes.

Eucalyptus wants image names of 3–128 characters from ``[A-Za-z0-9()./_-]``, unique per account.
A re-registration of the same bytes (after a deregistration, or on a second site sharing an
account) must not collide with an earlier name, so every generated name carries the image's
SHA-1 prefix, a UTC timestamp and a random suffix:

    ``unique_name("centos-6", "ab12…")`` → ``centos-6-ab12cd34ef56-20261123T192500Z-1f3a9c``

Bundle prefixes (the part and manifest file names, and the S3 folder) follow the same rule but
never contain ``/``: a part's file name in the manifest must be a plain name beside the manifest.
"""

from __future__ import annotations

import logging
import re
import secrets
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit

from registrar.errors import InvalidImageName

log = logging.getLogger(__name__)

MIN_LENGTH = 3
MAX_LENGTH = 128
_VALID = re.compile(r"[A-Za-z0-9()./_-]{3,128}")
_INVALID_CHARS = re.compile(r"[^A-Za-z0-9()._-]+")
# Room for "-<12 hex>-<16 char timestamp>-<6 hex>" after the label.
_LABEL_MAX = MAX_LENGTH - 1 - 12 - 1 - 16 - 1 - 6


def validate(name: str) -> str:
    """Return `name` unchanged if Eucalyptus accepts it; else raise InvalidImageName."""
    if not _VALID.fullmatch(name):
        raise InvalidImageName(
            f"image name {name!r} must be {MIN_LENGTH}–{MAX_LENGTH} characters of [A-Za-z0-9()./_-]"
        )
    return name


def sanitize(label: str) -> str:
    """Turn any text (a file name, a URL's last segment) into a safe label without ``/``.

    Runs of other characters become one ``-``; an empty result becomes ``image``.
    """
    cleaned = _INVALID_CHARS.sub("-", label).strip("-.")
    return cleaned[:_LABEL_MAX].rstrip("-.") or "image"


def label_from_url(url: str, fallback: str) -> str:
    """A readable label for an image from its URL's last path segment (`fallback` if none)."""
    segment = unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
    return sanitize(segment or fallback)


def unique_name(label: str, sha1: str | None = None, *, now: datetime | None = None) -> str:
    """Return a fresh name: sanitized `label`, SHA-1 prefix (if known), UTC timestamp, random.

    The result never contains ``/``, so it also serves as a bundle prefix.
    """
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    digest = f"-{sha1[:12].lower()}" if sha1 else ""
    name = f"{sanitize(label)}{digest}-{stamp}-{secrets.token_hex(3)}"
    return validate(name)
