"""The 2007-10-10 manifest: element order, encrypted hex-string keys, signature, credentials."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from lxml import etree

from registrar.errors import CredentialError
from registrar.manifest import BundleKeys, PartInfo, build_manifest
from tests.registrar.bundle_check import CONFIG_ORDER, IMAGE_ORDER, ROOT_ORDER
from tests.support.cloud import make_key_and_cert

KEY_HEX = "00112233445566778899aabbccddeeff"
IV_HEX = "0f0e0d0c0b0a09080706050403020100"
PARTS = [PartInfo("img.part.00", "a" * 40, 10485760), PartInfo("img.part.01", "b" * 40, 123)]


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pems")
    cloud_key, cloud_cert = make_key_and_cert(directory, "cloud", "cloud")
    user_key, user_cert = make_key_and_cert(directory, "user", "user")
    return {
        "cloud_key": cloud_key,
        "cloud_cert": cloud_cert,
        "user_key": user_key,
        "user_cert": user_cert,
    }


def build(keys: BundleKeys, **kwargs: object) -> bytes:
    options: dict[str, object] = dict(
        name="img",
        account_id="1234-5678-9012",
        image_type="machine",
        arch="x86_64",
        tar_sha1="c" * 40,
        size=20000000,
        parts=PARTS,
        key_hex=KEY_HEX,
        iv_hex=IV_HEX,
        keys=keys,
    )
    options.update(kwargs)
    return build_manifest(**options)  # type: ignore[arg-type]


def decrypt(pem: Path, hex_text: str) -> str:
    key = serialization.load_pem_private_key(pem.read_bytes(), password=None)
    return key.decrypt(bytes.fromhex(hex_text), padding.PKCS1v15()).decode("ascii")


def test_machine_manifest_in_euca2ools_order(pems: dict[str, Path]) -> None:
    keys = BundleKeys.load(pems["cloud_cert"], pems["user_cert"], pems["user_key"])
    xml = build(keys, kernel_id="eki-1", ramdisk_id="eri-2")
    assert xml.startswith(b"<?xml version='1.0' encoding='UTF-8'?>\n<manifest>")
    root = etree.fromstring(xml)
    assert [c.tag for c in root] == ROOT_ORDER
    assert [c.tag for c in root.find("machine_configuration")] == CONFIG_ORDER
    assert [c.tag for c in root.find("image")] == IMAGE_ORDER
    mappings = {
        m.findtext("virtual"): m.findtext("device")
        for m in root.iterfind("machine_configuration/block_device_mapping/mapping")
    }
    assert mappings == {"ami": "sda1", "root": "/dev/sda1", "ephemeral0": "sda2", "swap": "sda3"}
    image = root.find("image")
    assert image.findtext("user") == "123456789012"
    assert image.findtext("size") == "20000000"
    assert image.findtext("bundled_size") == str(10485760 + 123)
    assert image.find("parts").get("count") == "2"
    assert [
        (p.get("index"), p.findtext("filename"), p.findtext("digest"))
        for p in image.iterfind("parts/part")
    ] == [("0", "img.part.00", "a" * 40), ("1", "img.part.01", "b" * 40)]
    assert root.findtext("machine_configuration/kernel_id") == "eki-1"


def test_keys_are_hex_strings_encrypted_for_cloud_and_user(pems: dict[str, Path]) -> None:
    keys = BundleKeys.load(pems["cloud_cert"], pems["user_cert"], pems["user_key"])
    image = etree.fromstring(build(keys)).find("image")
    assert decrypt(pems["cloud_key"], image.findtext("ec2_encrypted_key")) == KEY_HEX
    assert decrypt(pems["cloud_key"], image.findtext("ec2_encrypted_iv")) == IV_HEX
    assert decrypt(pems["user_key"], image.findtext("user_encrypted_key")) == KEY_HEX
    assert decrypt(pems["user_key"], image.findtext("user_encrypted_iv")) == IV_HEX
    assert image.find("ec2_encrypted_key").get("algorithm") == "AES-128-CBC"


def test_signature_covers_the_exact_serialized_bytes(pems: dict[str, Path]) -> None:
    keys = BundleKeys.load(pems["cloud_cert"], pems["user_cert"], pems["user_key"])
    xml = build(keys)
    signed = re.search(rb"<machine_configuration>.*</image>", xml, re.S).group(0)
    signature = bytes.fromhex(etree.fromstring(xml).findtext("signature"))
    cert = x509.load_pem_x509_certificate(pems["user_cert"].read_bytes())
    cert.public_key().verify(signature, signed, padding.PKCS1v15(), hashes.SHA1())
    tampered = signed.replace(b"<size>20000000</size>", b"<size>20000001</size>")
    with pytest.raises(InvalidSignature):
        cert.public_key().verify(signature, tampered, padding.PKCS1v15(), hashes.SHA1())


def test_unsigned_and_empty_user_copies_without_user_credentials(pems: dict[str, Path]) -> None:
    root = etree.fromstring(build(BundleKeys.load(pems["cloud_cert"])))
    assert root.findtext("signature") == "UNSIGNED"
    image = root.find("image")
    # Present but empty: Eucalyptus answers InvalidManifest when they are absent.
    for tag in ("user_encrypted_key", "user_encrypted_iv"):
        assert image.find(tag) is not None and not image.findtext(tag)
    assert image.find("user_encrypted_key").get("algorithm") == "AES-128-CBC"


def test_signed_without_user_cert(pems: dict[str, Path]) -> None:
    keys = BundleKeys.load(pems["cloud_cert"], user_key=pems["user_key"])
    root = etree.fromstring(build(keys))
    assert re.fullmatch(r"[0-9a-f]{512}", root.findtext("signature"))
    assert not root.findtext("image/user_encrypted_key")


@pytest.mark.parametrize("image_type", ["kernel", "ramdisk"])
def test_kernel_and_ramdisk_have_no_block_device_mapping(
    image_type: str, pems: dict[str, Path]
) -> None:
    root = etree.fromstring(build(BundleKeys.load(pems["cloud_cert"]), image_type=image_type))
    assert [c.tag for c in root.find("machine_configuration")] == ["architecture"]
    assert root.findtext("image/type") == image_type


def test_mismatched_user_key_and_cert_are_refused(pems: dict[str, Path]) -> None:
    with pytest.raises(CredentialError, match="does not match"):
        BundleKeys.load(pems["cloud_cert"], pems["cloud_cert"], pems["user_key"])


def test_unusable_credential_files_are_named(pems: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="missing.pem"):
        BundleKeys.load(tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(CredentialError, match="garbage.pem is not a PEM X.509 certificate"):
        BundleKeys.load(garbage)
    with pytest.raises(CredentialError, match="not an unencrypted PEM private key"):
        BundleKeys.load(pems["cloud_cert"], user_key=pems["cloud_cert"])


def test_rebind_names_another_kernel_keeps_the_parts_and_signs_again(
    pems: dict[str, Path],
) -> None:
    from registrar.manifest import rebind_manifest

    keys = BundleKeys.load(pems["cloud_cert"], pems["user_cert"], pems["user_key"])
    old = build(keys, kernel_id="eki-1", ramdisk_id="eri-1")
    new = rebind_manifest(old, name="img2", keys=keys, kernel_id="eki-2")
    old_root, root = etree.fromstring(old), etree.fromstring(new)
    assert [e.tag for e in root] == ROOT_ORDER
    assert [e.tag for e in root.find("machine_configuration")][-1] == "kernel_id"
    assert root.findtext("machine_configuration/kernel_id") == "eki-2"
    assert root.find("machine_configuration/ramdisk_id") is None
    assert root.findtext("image/name") == "img2"
    for tag in ("digest", "size", "bundled_size", "ec2_encrypted_key", "ec2_encrypted_iv"):
        assert root.findtext(f"image/{tag}") == old_root.findtext(f"image/{tag}")
    assert etree.tostring(root.find("image/parts")) == etree.tostring(old_root.find("image/parts"))
    signed = re.search(rb"<machine_configuration>.*</image>", new, re.S).group(0)
    cert = x509.load_pem_x509_certificate(pems["user_cert"].read_bytes())
    signature = bytes.fromhex(root.findtext("signature"))
    cert.public_key().verify(signature, signed, padding.PKCS1v15(), hashes.SHA1())
    with pytest.raises(ValueError, match="not a machine image"):
        rebind_manifest(build(keys, image_type="kernel"), name="k", keys=keys)
