"""The service's side of imgstore: declare a blob, read it through the mount, say why not.

    blobs = Blobs(settings)
    info = blobs.add(sha1, url, "FILESYSTEM image", trusted=False)
    with blobs.open(sha1, url, "FILESYSTEM image") as stream: ...
    images = blobs.read_metadata(url, sha1, trusted)

A read through the mount fails with OSError; here it becomes our error: SignatureMismatch when
imgstore's verdict is that the bytes are wrong (with the SHA-1 they have), FetchError otherwise.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from imgstore import client as imgstore
from imgstore.errors import BadUrl, OriginError, StoreError
from registrar.errors import (
    FetchError,
    ImageChecksumMismatch,
    InvalidURL,
    RegistrarError,
    RequestTooLarge,
    SignatureMismatch,
)
from registrar.metadata import MAX_METADATA_BYTES, ImageSet
from registrar.metadata import parse as parse_metadata

_READ_BUFFER = 1024 * 1024
_SHA1_IN_TEXT = re.compile(r"\b[0-9a-f]{40}\b")
_STATE_XATTR = "user.imgstore.state"


def _mount_state(path: Path) -> str | None:
    """A blob file's `user.imgstore.state`; None where it has none (not imgstore's mount)."""
    try:
        return os.getxattr(path, _STATE_XATTR).decode()
    except OSError:
        return None


class StoreSettings(Protocol):
    """What Blobs needs of the service's settings."""

    cache_dir: Path
    mountpoint: Path
    allowed_networks: tuple[str, ...]
    http_proxy: str


class MountFile(io.RawIOBase):
    """A blob read through the imgstore mount; a failed read raises our error, not OSError.

    The bundler turns OSError into a generic BundleError; a registrar error passes through it
    unchanged, so the caller learns that the bytes did not match or could not be fetched.
    """

    def __init__(self, path: Path, on_error: Callable[[OSError], RegistrarError]) -> None:
        super().__init__()
        self._on_error = on_error
        try:
            self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise on_error(exc) from exc

    def readinto(self, buffer: Any) -> int:
        try:
            return self._file.readinto(buffer)  # type: ignore[no-any-return]
        except OSError as exc:
            raise self._on_error(exc) from exc

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


class MountReader(io.BufferedReader):
    """A blob read through the imgstore mount, buffered, that can say the mount verified it.

    The mount answers the read that completes a handle's reading of a blob only once the
    blob's SHA-1 matched (DESIGN, "The filesystem"), so once this reader has been read to its
    end, the mount's `verified` state is the SHA-1 check: `source.HashingReader` asks for it
    instead of hashing the bytes a second time (about 1 CPU-s per GiB, on the cores that
    imgstore and the cloud share with the registrar).
    """

    def __init__(self, path: Path, sha1: str, raw: MountFile) -> None:
        super().__init__(raw, buffer_size=_READ_BUFFER)
        self._path = path
        self._sha1 = sha1

    def verified_sha1(self) -> str:
        """The blob's SHA-1, once the mount has verified it; else ImageChecksumMismatch."""
        try:
            state = os.getxattr(self._path, _STATE_XATTR).decode()
        except OSError as exc:
            state = f"unknown: {exc.strerror or exc}"
        if state != "verified":
            raise ImageChecksumMismatch(
                f"imgstore has not verified {self._sha1} after it was read whole "
                f"(its state is {state}); nothing was registered"
            )
        return self._sha1


class Blobs:
    """imgstore as the service uses it: the catalog for declaring, the mount for reading."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings

    def add(self, sha1: str, url: str, what: str, trusted: bool) -> imgstore.BlobInfo:
        try:
            known = imgstore.info(self.settings.cache_dir, sha1)
        except StoreError:
            known = None
        if known is not None and known.state in ("complete", "verified") and url in known.urls:
            # Cached whole from this URL: nothing to fetch, so no probe (works without the origin).
            return known
        try:
            return imgstore.add(
                self.settings.cache_dir,
                sha1,
                [url],
                trusted=trusted,
                allowed_networks=self.settings.allowed_networks,
                http_proxy=self.settings.http_proxy,
            )
        except BadUrl as exc:
            raise InvalidURL(f"{what} URL {url} cannot be used: {exc}") from exc
        except OriginError as exc:
            # imgstore's message starts with the URL, which ours has just named.
            reason = str(exc).removeprefix(f"{url}: ")
            raise FetchError(f"cannot fetch {what} at {url}: {reason}") from exc
        except StoreError as exc:
            raise FetchError(f"imgstore cannot take {what} at {url}: {exc}") from exc

    def _state(self, sha1: str, blob: imgstore.BlobInfo | None) -> str:
        """The blob's state as the mount sees it now (its xattr), else as the catalog has it.

        The mount records a failed verdict in the catalog before any read fails with it
        (`imgstore.hashing.Hashing.corrupt`), so either answers `corrupt` once a read got EIO
        for it; the xattr is the mount's own view, and the catalog the fallback without one.
        """
        state = _mount_state(self.settings.mountpoint / "by-sha1" / sha1)
        if state is not None:
            return state
        return blob.state if blob is not None else "unknown"

    def _read_error(self, sha1: str, url: str, what: str) -> Callable[[OSError], RegistrarError]:
        def translate(exc: OSError) -> RegistrarError:
            try:
                blob = imgstore.info(self.settings.cache_dir, sha1)
            except StoreError:
                blob = None
            reason = (blob.error if blob is not None else None) or ""  # imgstore's verdict
            if self._state(sha1, blob) == "corrupt":
                computed = _SHA1_IN_TEXT.search(reason)
                got = (
                    f"computed signature {computed.group(0)}"
                    if computed
                    else "the SHA-1 of the bytes downloaded"
                )
                return SignatureMismatch(
                    f"signature {sha1} does not match {got} for {what} at {url}"
                )
            detail = f" ({reason})" if reason else ""
            return FetchError(
                f"cannot read {what} at {url} through imgstore: {exc.strerror or exc}{detail}"
            )

        return translate

    @contextmanager
    def open(self, sha1: str, url: str, what: str) -> Iterator[io.BufferedReader]:
        """The blob through the mount; a MountReader when the mount is imgstore's (it has
        the state attribute; a plain directory standing in for it gets a plain reader)."""
        path = self.settings.mountpoint / "by-sha1" / sha1
        raw = MountFile(path, self._read_error(sha1, url, what))
        source = (
            io.BufferedReader(raw, buffer_size=_READ_BUFFER)
            if _mount_state(path) is None
            else MountReader(path, sha1, raw)
        )
        with source:
            yield source

    def read_metadata(self, url: str, sha1: str, trusted: bool) -> ImageSet:
        blob = self.add(sha1, url, "metadata", trusted)
        if blob.size > MAX_METADATA_BYTES:
            raise RequestTooLarge(
                f"metadata at {url} is {blob.size} bytes; the limit is {MAX_METADATA_BYTES} bytes"
            )
        with self.open(sha1, url, "metadata") as source:
            data = source.read()
        return parse_metadata(data, url)
