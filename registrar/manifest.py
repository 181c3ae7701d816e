"""The bundle manifest (version 2007-10-10), as euca2ools and ec2-ami-tools write it.

`build_manifest()` returns the document's bytes and is pure apart from the RSA operations.
Elements come in euca2ools' order, because Eucalyptus reads some of them by position:

    manifest/version, bundler(name, version, release),
    machine_configuration(architecture, [block_device_mapping(mapping(virtual, device)…)],
                          [kernel_id], [ramdisk_id]),
    image(name, user, type, digest, size, bundled_size, ec2_encrypted_key, user_encrypted_key,
          ec2_encrypted_iv, user_encrypted_iv, parts(part(filename, digest)…)),
    signature

The AES key and IV travel as 32-character lowercase hex *strings*; those ASCII strings are
RSA-encrypted (PKCS#1 v1.5) for the cloud certificate and, when configured, the user
certificate, and written as hex. The signature is RSA-SHA1 over the exact serialized bytes of
`<machine_configuration>…</machine_configuration>` followed by `<image>…</image>`, as hex, or
the literal `UNSIGNED` without a user key. The document is serialized without pretty-printing,
so those bytes appear verbatim in the uploaded file.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from lxml import etree

import registrar
from registrar.errors import CredentialError

log = logging.getLogger(__name__)

MANIFEST_VERSION = "2007-10-10"
BUNDLER_NAME = "imageproxy"
BUNDLER_VERSION = "0.1.0"
IMAGE_TYPES = ("machine", "kernel", "ramdisk")
# What ec2-ami-tools and euca2ools 1.x wrote for machine images when given no mapping; the
# Eucalyptus node controller lays out the instance's disks from it.
DEFAULT_BLOCK_DEVICE_MAPPING: Mapping[str, str] = {
    "ami": "sda1",
    "root": "/dev/sda1",
    "ephemeral0": "sda2",
    "swap": "sda3",
}


@dataclasses.dataclass(frozen=True)
class BundleKeys:
    """The certificates and key a bundle needs: cloud cert (required), user cert and key."""

    cloud_cert: x509.Certificate
    user_cert: x509.Certificate | None = None
    user_key: rsa.RSAPrivateKey | None = None

    @classmethod
    def load(
        cls, cloud_cert: Path, user_cert: Path | None = None, user_key: Path | None = None
    ) -> BundleKeys:
        """Load PEM files; raise CredentialError naming the file that is unusable.

        A user key without its certificate (or the other way round) is allowed: the key signs,
        the certificate receives a copy of the bundle key. Given both, they must match.
        """
        keys = cls(
            cloud_cert=_load_cert(cloud_cert),
            user_cert=_load_cert(user_cert) if user_cert else None,
            user_key=_load_key(user_key) if user_key else None,
        )
        if keys.user_cert and keys.user_key:
            if keys.user_cert.public_key().public_numbers() != (
                keys.user_key.public_key().public_numbers()
            ):
                raise CredentialError(f"user key {user_key} does not match user cert {user_cert}")
        return keys


def _load_cert(path: Path) -> x509.Certificate:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise CredentialError(f"cannot read certificate {path}: {exc.strerror}") from None
    except ValueError:
        raise CredentialError(f"{path} is not a PEM X.509 certificate") from None
    if not isinstance(cert.public_key(), rsa.RSAPublicKey):
        raise CredentialError(f"certificate {path} does not hold an RSA key")
    return cert


def _load_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise CredentialError(f"cannot read private key {path}: {exc.strerror}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CredentialError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CredentialError(f"private key {path} is not an RSA key")
    return key


@dataclasses.dataclass(frozen=True)
class PartInfo:
    """One uploaded part: its file name (beside the manifest), SHA-1 of its bytes, size."""

    filename: str
    sha1: str
    size: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A finished bundle: what the manifest says, and the manifest document itself."""

    prefix: str
    name: str
    image_type: str
    arch: str
    size: int
    bundled_size: int
    tar_sha1: str
    parts: tuple[PartInfo, ...]
    xml: bytes
    kernel_id: str | None = None
    ramdisk_id: str | None = None
    source_sha1: str = ""  # SHA-1 of the file as read (compressed, for a ZFILESYSTEM)

    @property
    def filename(self) -> str:
        """The manifest's file name: `<prefix>.manifest.xml`."""
        return manifest_filename(self.prefix)


def manifest_filename(prefix: str) -> str:
    """The manifest file name of the bundle with this prefix."""
    return f"{prefix}.manifest.xml"


def part_filename(prefix: str, index: int) -> str:
    """The name of part `index`: `<prefix>.part.NN`, two digits at least."""
    return f"{prefix}.part.{index:02d}"


def encrypt_hex(text: str, cert: x509.Certificate) -> str:
    """RSA-encrypt (PKCS#1 v1.5) the ASCII `text` for `cert`, returned as hex."""
    public_key = cert.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)  # checked when loaded
    return public_key.encrypt(text.encode("ascii"), padding.PKCS1v15()).hex()


def build_manifest(
    *,
    name: str,
    account_id: str,
    image_type: str,
    arch: str,
    tar_sha1: str,
    size: int,
    parts: Sequence[PartInfo],
    key_hex: str,
    iv_hex: str,
    keys: BundleKeys,
    kernel_id: str | None = None,
    ramdisk_id: str | None = None,
    block_device_mapping: Mapping[str, str] | None = None,
) -> bytes:
    """Return the manifest document (UTF-8, with an XML declaration, not pretty-printed).

    `block_device_mapping` applies to machine images only; None means the default mapping.
    """
    if image_type not in IMAGE_TYPES:
        raise ValueError(f"image type must be one of {IMAGE_TYPES}, not {image_type!r}")
    root = etree.Element("manifest")
    _text(root, "version", MANIFEST_VERSION)
    bundler = etree.SubElement(root, "bundler")
    _text(bundler, "name", BUNDLER_NAME)
    _text(bundler, "version", getattr(registrar, "__version__", BUNDLER_VERSION))
    _text(bundler, "release", "0")

    config = _machine_configuration(
        root, image_type, arch, kernel_id, ramdisk_id, block_device_mapping
    )
    image = etree.SubElement(root, "image")
    _text(image, "name", name)
    _text(image, "user", account_id.replace("-", ""))
    _text(image, "type", image_type)
    _text(image, "digest", tar_sha1, algorithm="SHA1")
    _text(image, "size", str(size))
    _text(image, "bundled_size", str(sum(p.size for p in parts)))
    _encrypted_key(image, key_hex, iv_hex, keys)
    parts_el = etree.SubElement(image, "parts", count=str(len(parts)))
    for index, part in enumerate(parts):
        part_el = etree.SubElement(parts_el, "part", index=str(index))
        _text(part_el, "filename", part.filename)
        _text(part_el, "digest", part.sha1, algorithm="SHA1")

    _text(root, "signature", _sign(config, image, keys))
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def _machine_configuration(
    root: etree._Element,
    image_type: str,
    arch: str,
    kernel_id: str | None,
    ramdisk_id: str | None,
    block_device_mapping: Mapping[str, str] | None,
) -> etree._Element:
    config = etree.SubElement(root, "machine_configuration")
    _text(config, "architecture", arch)
    if image_type == "machine":
        mapping = block_device_mapping
        if mapping is None:
            mapping = DEFAULT_BLOCK_DEVICE_MAPPING
        if mapping:
            bdm = etree.SubElement(config, "block_device_mapping")
            for virtual, device in sorted(mapping.items()):
                entry = etree.SubElement(bdm, "mapping")
                _text(entry, "virtual", virtual)
                _text(entry, "device", device)
    if kernel_id:
        _text(config, "kernel_id", kernel_id)
    if ramdisk_id:
        _text(config, "ramdisk_id", ramdisk_id)
    return config


def _encrypted_key(image: etree._Element, key_hex: str, iv_hex: str, keys: BundleKeys) -> None:
    """The bundle's AES key and IV, encrypted for the cloud and (if given) the user."""
    _text(
        image, "ec2_encrypted_key", encrypt_hex(key_hex, keys.cloud_cert), algorithm="AES-128-CBC"
    )
    user_key = encrypt_hex(key_hex, keys.user_cert) if keys.user_cert else None
    _text(image, "user_encrypted_key", user_key, algorithm="AES-128-CBC")
    _text(image, "ec2_encrypted_iv", encrypt_hex(iv_hex, keys.cloud_cert))
    user_iv = encrypt_hex(iv_hex, keys.user_cert) if keys.user_cert else None
    # An absent user_encrypted_* element makes Eucalyptus answer 400 InvalidManifest: keep it
    # present and empty.
    _text(image, "user_encrypted_iv", user_iv)


def _sign(config: etree._Element, image: etree._Element, keys: BundleKeys) -> str:
    """The manifest signature over the exact bytes of machine_configuration then image."""
    if keys.user_key is None:
        return "UNSIGNED"
    signed = etree.tostring(config, with_tail=False) + etree.tostring(image, with_tail=False)
    return keys.user_key.sign(signed, padding.PKCS1v15(), hashes.SHA1()).hex()


def rebind_manifest(
    xml: bytes,
    *,
    name: str,
    keys: BundleKeys,
    kernel_id: str | None = None,
    ramdisk_id: str | None = None,
) -> bytes:
    """A copy of a machine image's manifest naming another kernel and ramdisk, re-signed.

    The parts, their digests and the encrypted key stay as they are, so the new manifest goes
    beside the old one and registers the same uploaded parts: a new kernel/ramdisk combination
    costs a manifest, not a bundle. Raises ValueError if `xml` is not such a manifest.
    """
    root = etree.fromstring(xml, etree.XMLParser(resolve_entities=False, no_network=True))
    config = root.find("machine_configuration")
    image = root.find("image")
    signature = root.find("signature")
    if root.tag != "manifest" or config is None or image is None or signature is None:
        raise ValueError("not a bundle manifest")
    if image.findtext("type") != "machine":
        raise ValueError("not a machine image manifest")
    for tag in ("kernel_id", "ramdisk_id"):
        for old in config.findall(tag):
            config.remove(old)
    if kernel_id:
        _text(config, "kernel_id", kernel_id)
    if ramdisk_id:
        _text(config, "ramdisk_id", ramdisk_id)
    image_name = image.find("name")
    if image_name is None:
        raise ValueError("manifest has no image name")
    image_name.text = name
    signature.text = _sign(config, image, keys)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def _text(parent: etree._Element, tag: str, text: str | None, **attrib: str) -> etree._Element:
    element = etree.SubElement(parent, tag, attrib)
    element.text = text
    return element
