"""The registrar's exceptions: one hierarchy, turned into SOAP faults or CLI errors at the edge."""

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


class UnsupportedImage(InputError):
    """Raised when the metadata lists only images this site's cloud cannot register (a QCOW2
    alone, on Eucalyptus)."""


class FetchError(RegistrarError):
    """Raised when a blob cannot be fetched through imgstore (origin down, cache full, …)."""


# --- configuration, bundling and the clouds (registrar/config.py, bundle.py, clouds/) ---


class ConfigError(RegistrarError):
    """Raised when the config file or a eucarc is missing, unreadable, or has a bad key or value."""


class CredentialError(ConfigError):
    """Raised when a certificate or private key file cannot be loaded, or a key and its
    certificate do not belong together."""


class InvalidImageName(InputError):
    """Raised when an image name is not 3–128 characters of [A-Za-z0-9()./_-]."""


class BundleError(RegistrarError):
    """Raised when an image cannot be bundled (read error, bad input, wrong size)."""


class ImageChecksumMismatch(SignatureMismatch):
    """Raised when the bytes read for bundling do not have the expected SHA-1; nothing of the
    bundle is finalized (no last part, no manifest)."""


class DecompressError(BundleError):
    """Raised when a ZFILESYSTEM image is corrupt, truncated, or in a format not supported."""


class CloudError(RegistrarError):
    """Raised when a cloud request fails; `step` names what was being done (for example
    "part upload") and the message keeps the cloud's own error code and message."""

    def __init__(self, step: str, message: str, *, code: str | None = None) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.code = code
        self.cloud_message = message


class RegistrationTimeout(CloudError):
    """Raised when a registered image does not become available within the configured time."""


class ImageFailed(CloudError):
    """Raised when the cloud reports a registered image as failed or deregistered."""


class RegistrationFailed(RegistrarError):
    """Raised when bundling, uploading or registering one image of a set fails; the message
    names the image and its URL, then the cause (a BundleError or CloudError, kept as
    `__cause__`, whose own message names the step)."""


# --- image owners' commands (registrar/publish.py, imagefile.py, check.py) ---


class PublishError(InputError):
    """Raised when files cannot be published because the registrar would refuse them (an
    unknown compression, a tar without a usable member, an empty or corrupt file)."""


class PublishUsage(InputError):
    """Raised when `registrar publish`'s arguments make no metadata file (no image, two files
    with one name, a bad base URL or name)."""
