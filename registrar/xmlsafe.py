"""Parse untrusted XML (SOAP envelopes, image metadata) with every dangerous feature off.

The contract: `parse(data, limit=…, what=…)` returns the root element of a well-formed document
or raises `RequestTooLarge`/`MetadataError`-style errors built by the caller's `error` class. It
never loads a DTD, never expands an entity, never touches the network or the file system, and
refuses any document that carries a DOCTYPE at all — so "billion laughs" and XXE (file:// and
http://) are refused before they can cost memory or leak a byte.
"""

from __future__ import annotations

import logging

from lxml import etree

from registrar.errors import RegistrarError, RequestTooLarge

log = logging.getLogger(__name__)

# A DOCTYPE in any of the encodings an XML declaration may announce (UTF-8/ASCII, UTF-16 LE/BE).
# Checked on the raw bytes so a hostile internal subset is never even handed to libxml2.
_DOCTYPE_MARKERS = tuple("<!DOCTYPE".encode(codec) for codec in ("ascii", "utf-16-le", "utf-16-be"))


def _parser() -> etree.XMLParser:
    # A fresh parser per call: lxml parsers are not thread-safe, and the service parses on
    # worker threads.
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_pis=True,
        remove_comments=True,
        collect_ids=False,
    )


def parse(
    data: bytes,
    *,
    limit: int,
    what: str,
    error: type[RegistrarError],
) -> etree._Element:
    """Parse `data` as one XML document and return its root element.

    `what` names the document in messages ("SOAP request", "metadata at URL"). Raises
    `RequestTooLarge` when `data` is longer than `limit` bytes, and `error` when the document is
    not well-formed or has a DOCTYPE.
    """
    if len(data) > limit:
        raise RequestTooLarge(f"{what} is {len(data)} bytes; the limit is {limit} bytes")
    upper = data[: 64 * 1024].upper()
    if any(marker.upper() in upper for marker in _DOCTYPE_MARKERS):
        raise error(f"{what} has a DOCTYPE; DTDs and entities are not accepted")
    try:
        root = etree.fromstring(data, parser=_parser())
    except etree.XMLSyntaxError as exc:
        raise error(f"{what} is not well-formed XML: {exc}") from exc
    if root is None:
        raise error(f"{what} is empty")
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        # The byte check above misses a DOCTYPE past 64 KiB or in an odd encoding; this does not.
        raise error(f"{what} has a DOCTYPE; DTDs and entities are not accepted")
    return root
