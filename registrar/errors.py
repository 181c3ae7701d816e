"""The registrar's exceptions: one hierarchy, translated to SOAP faults or CLI errors at the edge."""

from __future__ import annotations


class RegistrarError(Exception):
    """Raised when a registration cannot be done; the message says what failed and why."""


# --- SOAP requests and caller input (registrar/soap.py, metadata.py, service.py) ---


class RequestError(RegistrarError):
    """Raised when a SOAP request is malformed or asks for something this service does not offer."""


class RequestTooLarge(RequestError):
    """Raised when a request body or a metadata file exceeds its size limit."""


class SoapVersionMismatch(RequestError):
    """Raised when the envelope is neither SOAP 1.1 nor SOAP 1.2."""


class MustUnderstandError(RequestError):
    """Raised when a SOAP header marked mustUnderstand is one this service does not understand."""


class InputError(RegistrarError):
    """Raised when the caller's URL, signature or metadata cannot be used; the caller can fix it."""


class InvalidSignature(InputError):
    """Raised when a signature is not a SHA-1 written as 40 hexadecimal digits."""


class InvalidURL(InputError):
    """Raised when a URL is not an acceptable http(s) URL (scheme, credentials, length)."""


class MetadataError(InputError):
    """Raised when the metadata file is not well-formed XML or does not describe a usable image."""


class SignatureMismatch(InputError):
    """Raised when downloaded bytes do not have the SHA-1 the caller or metadata promised."""


class FetchError(RegistrarError):
    """Raised when a blob cannot be fetched through imgstore (origin down, cache full, …)."""
