"""An unbundler of our own for the tests: checks an uploaded bundle the way Eucalyptus would.

moto accepts any bytes, so `check_bundle()` does the cloud's work on what was uploaded:

- the manifest's elements, in euca2ools' order;
- every part listed is downloaded from S3 beside the manifest; its SHA-1 matches the manifest;
  all parts but the last are exactly 10 MiB; `bundled_size` is the sum of the part sizes;
- every uploaded object carried the canned ACL `aws-exec-read` (seen by the recording proxy);
- the AES key and IV are decrypted with the cloud's PRIVATE key (PKCS#1 v1.5), and are the
  32-character hex strings of 16 bytes; the user's copies (if any) decrypt to the same;
- the parts decrypt (AES-128-CBC, PKCS#7 padding checked), gunzip as one gzip member, and the
  SHA-1 of that tar stream equals the manifest's digest;
- the tar holds one regular file of the manifest's `size`; its bytes' SHA-1 is returned (and
  the file written out, sparsely, if asked);
- the signature verifies with the user certificate over the exact bytes of
  `<machine_configuration>…</machine_configuration><image>…</image>` in the uploaded file, or
  is `UNSIGNED`.

It uses only the standard library's zlib/tarfile and `cryptography`, never the registrar's code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from lxml import etree

PART_SIZE = 10 * 1024 * 1024

ROOT_ORDER = ["version", "bundler", "machine_configuration", "image", "signature"]
BUNDLER_ORDER = ["name", "version", "release"]
CONFIG_ORDER = ["architecture", "block_device_mapping", "kernel_id", "ramdisk_id"]
IMAGE_ORDER = [
    "name",
    "user",
    "type",
    "digest",
    "size",
    "bundled_size",
    "ec2_encrypted_key",
    "user_encrypted_key",
    "ec2_encrypted_iv",
    "user_encrypted_iv",
    "parts",
]


class BundleInvalid(AssertionError):
    """A bundle Eucalyptus would refuse; the message says what is wrong."""


def _require(condition: object, message: str) -> None:
    if not condition:
        raise BundleInvalid(message)


@dataclasses.dataclass
class CheckedBundle:
    """What the unbundling found."""

    xml: bytes
    root: Any
    image_sha1: str
    image_size: int
    member_name: str
    part_keys: list[str]
    kernel_id: str | None
    ramdisk_id: str | None
    image_type: str
    name: str


def check_bundle(
    cloud: Any,
    location: str,
    *,
    signed: bool,
    user_copy: bool = True,
    out: Path | None = None,
    acl: bool = True,
) -> CheckedBundle:
    """Check the bundle whose manifest is at `location` ("bucket/folder/x.manifest.xml").

    `acl=False` skips the canned-ACL check, for an S3 that keeps no ACLs (SeaweedFS) and is
    not behind the recording proxy.
    """
    bucket, _, manifest_key = location.partition("/")
    folder = manifest_key.rpartition("/")[0]
    xml = _get(cloud, bucket, manifest_key)
    root = etree.fromstring(xml)
    _check_order(root)
    image = root.find("image")
    config = root.find("machine_configuration")

    _require(root.findtext("version") == "2007-10-10", "manifest version is not 2007-10-10")
    _require(image.findtext("user") == cloud.account_id, "user is not the account id")
    _require(image.find("digest").get("algorithm") == "SHA1", "digest algorithm is not SHA1")
    _require(
        image.find("ec2_encrypted_key").get("algorithm") == "AES-128-CBC",
        "ec2_encrypted_key algorithm is not AES-128-CBC",
    )

    # Parts: listed in order, named <prefix>.part.NN, each beside the manifest.
    prefix = manifest_key.rpartition("/")[2].removesuffix(".manifest.xml")
    parts_el = image.find("parts")
    part_els = parts_el.findall("part")
    _require(int(parts_el.get("count")) == len(part_els), "parts count differs from parts")
    part_keys = []
    for index, part_el in enumerate(part_els):
        _require(
            int(part_el.get("index")) == index, f"part {index} has index {part_el.get('index')}"
        )
        filename = part_el.findtext("filename")
        _require(filename == f"{prefix}.part.{index:02d}", f"part {index} is named {filename}")
        _require(part_el.find("digest").get("algorithm") == "SHA1", "part digest is not SHA1")
        part_keys.append(f"{folder}/{filename}")

    # Keys: the cloud's private key opens the hex strings.
    cloud_key = _private_key(cloud.cloud_key)
    key = _decrypt_hex_string(cloud_key, image.findtext("ec2_encrypted_key"), "key")
    iv = _decrypt_hex_string(cloud_key, image.findtext("ec2_encrypted_iv"), "iv")
    if user_copy:
        user_key = _private_key(cloud.user_key)
        _require(
            _decrypt_hex_string(user_key, image.findtext("user_encrypted_key"), "key") == key,
            "user_encrypted_key differs from the cloud's copy",
        )
        _require(
            _decrypt_hex_string(user_key, image.findtext("user_encrypted_iv"), "iv") == iv,
            "user_encrypted_iv differs from the cloud's copy",
        )
    else:
        for tag in ("user_encrypted_key", "user_encrypted_iv"):
            _require(not (image.findtext(tag) or ""), f"{tag} is not empty without a user cert")

    # Stream: download, digest, decrypt, gunzip, hash the tar, untar.
    sizes: list[int] = []
    tar_sha1 = hashlib.sha1()

    def encrypted() -> Iterator[bytes]:
        for index, (part_el, part_key) in enumerate(zip(part_els, part_keys, strict=True)):
            data = _get(cloud, bucket, part_key)
            digest = hashlib.sha1(data).hexdigest()
            _require(
                digest == part_el.findtext("digest"),
                f"part {index}: SHA-1 {digest} differs from the manifest's",
            )
            sizes.append(len(data))
            yield data

    tar_stream = _Stream(_gunzip(_decrypt(encrypted(), key, iv), tar_sha1))
    with tarfile.open(fileobj=tar_stream, mode="r|") as tar:
        member = tar.next()
        _require(member is not None and member.isfile(), "the tar holds no regular file")
        image_sha1, image_size = _extract(tar.extractfile(member), out)
        _require(tar.next() is None, "the tar holds more than one member")
    while tar_stream.read(1 << 20):  # the tar's end blocks and record padding
        pass

    _require(all(size == PART_SIZE for size in sizes[:-1]), f"parts are not all 10 MiB: {sizes}")
    _require(int(image.findtext("bundled_size")) == sum(sizes), "bundled_size != sum of parts")
    _require(int(image.findtext("size")) == image_size, "size != the unbundled image's size")
    _require(member.size == image_size, "tar member size != bytes extracted")
    _require(
        tar_sha1.hexdigest() == image.findtext("digest"),
        f"tar stream SHA-1 {tar_sha1.hexdigest()} != manifest digest",
    )

    # ACL: every object PUT under this bundle's folder carried aws-exec-read.
    puts = [(path, canned) for method, path, canned in cloud.s3_requests if method == "PUT"]
    keys_put = {path.partition(f"/{bucket}/")[2]: canned for path, canned in puts}
    for key in [*part_keys, manifest_key] if acl else []:
        _require(keys_put.get(key) == "aws-exec-read", f"{key} was not put with aws-exec-read")

    _check_signature(xml, root, cloud, signed)
    return CheckedBundle(
        xml=xml,
        root=root,
        image_sha1=image_sha1,
        image_size=image_size,
        member_name=member.name,
        part_keys=part_keys,
        kernel_id=config.findtext("kernel_id"),
        ramdisk_id=config.findtext("ramdisk_id"),
        image_type=image.findtext("type"),
        name=image.findtext("name"),
    )


def _get(cloud: Any, bucket: str, key: str) -> bytes:
    return cloud.s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def _check_order(root: Any) -> None:
    def tags(element: Any) -> list[str]:
        return [child.tag for child in element]

    _require(root.tag == "manifest", "root is not <manifest>")
    _require(tags(root) == ROOT_ORDER, f"manifest children {tags(root)}")
    _require(tags(root.find("bundler")) == BUNDLER_ORDER, "bundler children out of order")
    config_tags = tags(root.find("machine_configuration"))
    _require(
        config_tags == [t for t in CONFIG_ORDER if t in config_tags]
        and config_tags[:1] == ["architecture"],
        f"machine_configuration children {config_tags}",
    )
    _require(tags(root.find("image")) == IMAGE_ORDER, f"image children {tags(root.find('image'))}")
    for mapping in root.iterfind("machine_configuration/block_device_mapping/mapping"):
        _require(tags(mapping) == ["virtual", "device"], "mapping children out of order")
    for part in root.iterfind("image/parts/part"):
        _require(tags(part) == ["filename", "digest"], "part children out of order")


def _private_key(path: Path) -> Any:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def _decrypt_hex_string(private_key: Any, hex_text: str | None, what: str) -> bytes:
    _require(hex_text, f"no encrypted {what}")
    plain = private_key.decrypt(bytes.fromhex(hex_text), padding.PKCS1v15())
    _require(re.fullmatch(rb"[0-9a-f]{32}", plain), f"the {what} is not a 32-character hex string")
    return bytes.fromhex(plain.decode("ascii"))


def _decrypt(chunks: Iterator[bytes], key: bytes, iv: bytes) -> Iterator[bytes]:
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    held = b""  # the last block, which carries the padding
    for chunk in chunks:
        out = held + decryptor.update(chunk)
        held, out = out[-16:], out[:-16]
        yield out
    held += decryptor.finalize()
    _require(len(held) == 16, "ciphertext is not a whole number of AES blocks")
    pad = held[-1]
    _require(1 <= pad <= 16 and held[-pad:] == bytes([pad]) * pad, "bad PKCS#7 padding")
    yield held[:-pad]


def _gunzip(chunks: Iterator[bytes], tar_sha1: Any) -> Iterator[bytes]:
    inflater = zlib.decompressobj(wbits=31)  # gzip wrapper, CRC-32 and length checked
    for chunk in chunks:
        if not chunk:
            continue
        _require(not inflater.eof, "data after the end of the gzip member")
        out = inflater.decompress(chunk)
        tar_sha1.update(out)
        yield out
    _require(inflater.eof, "the gzip stream is truncated")
    _require(not inflater.unused_data, "more than one gzip member, or trailing bytes")


class _Stream(io.RawIOBase):
    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._buffer:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._buffer = chunk
        n = min(len(buffer), len(self._buffer))
        buffer[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


def _extract(member: Any, out: Path | None) -> tuple[str, int]:
    """SHA-1 and size of a member; written to `out` with zero 64 KiB blocks left as holes."""
    sha1 = hashlib.sha1()
    size = 0
    sink = open(out, "wb") if out else None  # noqa: SIM115
    try:
        while block := member.read(64 * 1024):
            sha1.update(block)
            size += len(block)
            if sink is not None:
                if block.count(0) == len(block):
                    sink.seek(len(block), io.SEEK_CUR)
                else:
                    sink.write(block)
        if sink is not None:
            sink.truncate(size)
    finally:
        if sink is not None:
            sink.close()
    return sha1.hexdigest(), size


def _check_signature(xml: bytes, root: Any, cloud: Any, signed: bool) -> None:
    signature = root.findtext("signature")
    if not signed:
        _require(signature == "UNSIGNED", f"signature is {signature!r}, not UNSIGNED")
        return
    # The exact bytes as uploaded: the cloud verifies over these, not over a re-serialization.
    match = re.search(rb"<machine_configuration>.*</image>", xml, re.S)
    _require(match, "no machine_configuration…image span in the manifest")
    signed_bytes = match.group(0)
    _require(
        signed_bytes.startswith(etree.tostring(root.find("machine_configuration"))),
        "the signed span does not start with the machine_configuration element",
    )
    cert = x509.load_pem_x509_certificate(cloud.user_cert.read_bytes())
    cert.public_key().verify(
        bytes.fromhex(signature), signed_bytes, padding.PKCS1v15(), hashes.SHA1()
    )
