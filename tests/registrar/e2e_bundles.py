"""Open a registered image's bundle the way the cloud does, to prove what was uploaded.

moto checks nothing about bundles, so the tests do: fetch the manifest named by the image's
ImageLocation, check each part's SHA-1 and the bundled size, decrypt the key and IV with the
stand-in cloud's private key, decrypt and gunzip the parts, untar the one member, and return
its SHA-1 and size for comparison with the source image.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from dataclasses import dataclass

from cryptography.hazmat.primitives import padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as rsa_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from lxml import etree

from tests.support.cloud import StandInCloud


@dataclass(frozen=True)
class Unbundled:
    """What a bundle holds: the image's SHA-1 and size, and the manifest's facts."""

    sha1: str
    size: int
    image_type: str
    kernel_id: str | None
    ramdisk_id: str | None
    location: str


def unbundle(cloud: StandInCloud, image_id: str) -> Unbundled:
    (image,) = cloud.ec2.describe_images(ImageIds=[image_id])["Images"]
    # moto does not keep ImageLocation: find it in the recorded RegisterImage call of that name.
    (location,) = [
        call["ImageLocation"]
        for call in cloud.calls_of("RegisterImage")
        if call.get("Name") == image["Name"]
    ]
    bucket, key = location.split("/", 1)
    folder = key.rsplit("/", 1)[0]
    manifest = etree.fromstring(cloud.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    private = serialization.load_pem_private_key(cloud.cloud_key.read_bytes(), password=None)

    def decrypt_hex(tag: str) -> bytes:
        text = private.decrypt(  # type: ignore[union-attr]
            bytes.fromhex(manifest.findtext(f"image/{tag}")), rsa_padding.PKCS1v15()
        )
        return bytes.fromhex(text.decode())

    key_bytes, iv = decrypt_hex("ec2_encrypted_key"), decrypt_hex("ec2_encrypted_iv")
    encrypted = bytearray()
    for part in manifest.iterfind("image/parts/part"):
        data = cloud.s3.get_object(Bucket=bucket, Key=f"{folder}/{part.findtext('filename')}")[
            "Body"
        ].read()
        assert hashlib.sha1(data).hexdigest() == part.findtext("digest"), "part digest"
        encrypted += data
    assert int(manifest.findtext("image/bundled_size")) == len(encrypted)
    decryptor = Cipher(algorithms.AES(key_bytes), modes.CBC(iv)).decryptor()
    padded = decryptor.update(bytes(encrypted)) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    tar_bytes = gzip.decompress(unpadder.update(padded) + unpadder.finalize())
    assert hashlib.sha1(tar_bytes).hexdigest() == manifest.findtext("image/digest")
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        (member,) = tar.getmembers()
        data = tar.extractfile(member).read()  # type: ignore[union-attr]
    assert len(data) == int(manifest.findtext("image/size"))
    return Unbundled(
        sha1=hashlib.sha1(data).hexdigest(),
        size=len(data),
        image_type=manifest.findtext("image/type"),
        kernel_id=manifest.findtext("machine_configuration/kernel_id"),
        ramdisk_id=manifest.findtext("machine_configuration/ramdisk_id"),
        location=location,
    )
