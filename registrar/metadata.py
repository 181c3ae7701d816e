"""The image metadata file: parse it safely, check it, and choose the parts to register.

The format and rules are the original ImageProxy's. Names are case-sensitive:

    <images>
      <image><type>FILESYSTEM</type><signature>SHA-1</signature><url>http://…</url></image>
      <image><type>KERNEL</type>…</image>
    </images>

- Types are FILESYSTEM, ZFILESYSTEM (compressed; its signature is the compressed file's SHA-1),
  KERNEL, RAMDISK and QCOW2 (added by the original for OpenStack). Unknown types are ignored with
  a log line.
- A filesystem (FILESYSTEM or ZFILESYSTEM) or a QCOW2 is required; FILESYSTEM wins over
  ZFILESYSTEM; a later entry of a type replaces an earlier one.
- An entry whose type, url or signature is missing or empty is skipped with a log line, as the
  original did; a value that is present but malformed is an error.
- URLs and signatures are trimmed of surrounding whitespace (a known pain of the original);
  signatures are lowercased and must be 40 hex digits; URLs must be plain http(s) without
  credentials.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from registrar import xmlsafe
from registrar.errors import InvalidSignature, InvalidURL, MetadataError

log = logging.getLogger(__name__)

# A metadata file is a few hundred bytes; these bound what a hostile one can cost.
MAX_METADATA_BYTES = 256 * 1024
MAX_IMAGES = 64
MAX_URL_LENGTH = 2048

FILESYSTEM = "FILESYSTEM"
ZFILESYSTEM = "ZFILESYSTEM"
KERNEL = "KERNEL"
RAMDISK = "RAMDISK"
QCOW2 = "QCOW2"
KNOWN_TYPES = (FILESYSTEM, ZFILESYSTEM, KERNEL, RAMDISK, QCOW2)

_SHA1 = re.compile(r"[0-9a-f]{40}")
_BAD_URL_CHARS = re.compile(r"[\x00-\x20\x7f]")


@dataclass(frozen=True)
class Part:
    """One image file the metadata lists: its type keyword, URL and SHA-1 (lowercase hex)."""

    type: str
    url: str
    sha1: str

    @property
    def compressed(self) -> bool:
        """Whether the file must be decompressed before bundling (ZFILESYSTEM)."""
        return self.type == ZFILESYSTEM


@dataclass(frozen=True)
class ImageSet:
    """What to register: a filesystem and/or a QCOW2, and optionally a kernel and a ramdisk."""

    filesystem: Part | None
    kernel: Part | None = None
    ramdisk: Part | None = None
    qcow2: Part | None = None

    def parts(self) -> list[Part]:
        """Kernel and ramdisk first (the machine image refers to them), then the filesystem."""
        order = (self.kernel, self.ramdisk, self.filesystem, self.qcow2)
        return [p for p in order if p is not None]


def _shown(value: str, limit: int = 80) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "…")


def check_signature(value: str, what: str = "signature") -> str:
    """Return `value` trimmed and lowercased, or raise InvalidSignature if it is not a SHA-1."""
    signature = value.strip().lower()
    if not _SHA1.fullmatch(signature):
        raise InvalidSignature(
            f"{what} {_shown(value.strip())} is not a SHA-1 (40 hexadecimal digits)"
        )
    return signature


def check_url(value: str, what: str = "URL") -> str:
    """Return `value` trimmed, or raise InvalidURL unless it is a plain http(s) URL."""
    url = value.strip()
    if len(url) > MAX_URL_LENGTH:
        raise InvalidURL(f"{what} is {len(url)} characters long; at most {MAX_URL_LENGTH} allowed")
    if _BAD_URL_CHARS.search(url):
        raise InvalidURL(f"{what} {_shown(url)} contains spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError as exc:
        raise InvalidURL(f"{what} {_shown(url)} is not a valid URL: {exc}") from exc
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidURL(
            f"{what} {_shown(url)} has scheme {parts.scheme or 'none'!r}; only http and https "
            "are accepted"
        )
    if parts.username is not None or parts.password is not None:
        raise InvalidURL(f"{what} {_shown(url.split('@')[-1])} must not carry credentials")
    if not parts.hostname:
        raise InvalidURL(f"{what} {_shown(url)} has no host")
    return url


def _field(entry: object, name: str, index: int, source: str) -> str:
    """The trimmed text of `<name>`, "" when it is missing or empty; an error if not text."""
    element = entry.find(name)  # type: ignore[attr-defined]
    if element is None:
        return ""
    if len(element):
        raise MetadataError(f"image entry {index} in metadata at {source} has no <{name}> text")
    return (element.text or "").strip()


def parse(data: bytes, source: str) -> ImageSet:
    """Parse metadata bytes fetched from `source` (its URL, for messages) into an ImageSet.

    Raises RequestTooLarge for an oversized file, MetadataError for XML that is malformed, has a
    DTD, lists too many entries or no filesystem, InvalidSignature/InvalidURL for bad entries.
    """
    root = xmlsafe.parse(
        data, limit=MAX_METADATA_BYTES, what=f"metadata at {source}", error=MetadataError
    )
    chosen: dict[str, Part] = {}
    for index, entry in enumerate(root.iter("image"), start=1):
        if index > MAX_IMAGES:
            raise MetadataError(
                f"metadata at {source} lists more than {MAX_IMAGES} images; it is not a usable "
                "image description"
            )
        fields = {name: _field(entry, name, index, source) for name in ("type", "url", "signature")}
        empty = [name for name, value in fields.items() if not value]
        if empty:
            # The original skipped such entries; publishers rely on it to leave a slot blank.
            log.warning(
                "metadata at %s: skipping image entry %d, whose %s %s empty",
                source,
                index,
                " and ".join(f"<{name}>" for name in empty),
                "is" if len(empty) == 1 else "are",
            )
            continue
        kind = fields["type"]
        if kind not in KNOWN_TYPES:
            log.info(
                "metadata at %s: ignoring image entry %d of unknown type %r",
                source,
                index,
                kind[:40],
            )
            continue
        what = f"{kind} image in metadata at {source}:"
        url = check_url(fields["url"], f"{what} URL")
        sha1 = check_signature(fields["signature"], f"{what} signature")
        if kind in chosen:
            log.info("metadata at %s: a later %s entry replaces an earlier one", source, kind)
        chosen[kind] = Part(kind, url, sha1)
    filesystem = chosen.get(FILESYSTEM) or chosen.get(ZFILESYSTEM)
    if filesystem is None and QCOW2 not in chosen:
        raise MetadataError(
            f"metadata at {source} lists no FILESYSTEM, ZFILESYSTEM or QCOW2 image; a "
            "filesystem or a QCOW2 is required"
        )
    if FILESYSTEM in chosen and ZFILESYSTEM in chosen:
        log.info("metadata at %s: FILESYSTEM preferred over ZFILESYSTEM", source)
    return ImageSet(filesystem, chosen.get(KERNEL), chosen.get(RAMDISK), chosen.get(QCOW2))
