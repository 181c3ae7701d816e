"""The bundler on its own: parts, digests, the encrypted stream, verification in one pass."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from lxml import etree

from registrar import bundle
from registrar.bundle import PART_SIZE, Part, bundle_image
from registrar.errors import BundleError, ImageChecksumMismatch
from registrar.manifest import BundleKeys
from tests.support.cloud import make_key_and_cert


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[BundleKeys, Path]:
    directory = tmp_path_factory.mktemp("keys")
    cloud_key, cloud_cert = make_key_and_cert(directory, "cloud", "cloud")
    return BundleKeys.load(cloud_cert), cloud_key


def unbundle(xml: bytes, parts: list[Part], cloud_key: Path) -> tuple[bytes, bytes]:
    """Decrypt, gunzip (one member) and untar; return (tar stream, image bytes)."""
    private = serialization.load_pem_private_key(cloud_key.read_bytes(), password=None)
    image = etree.fromstring(xml).find("image")

    def hex_string(tag: str) -> bytes:
        text = private.decrypt(bytes.fromhex(image.findtext(tag)), padding.PKCS1v15())
        return bytes.fromhex(text.decode("ascii"))

    decryptor = Cipher(
        algorithms.AES(hex_string("ec2_encrypted_key")), modes.CBC(hex_string("ec2_encrypted_iv"))
    ).decryptor()
    padded = decryptor.update(b"".join(p.data for p in parts)) + decryptor.finalize()
    assert 1 <= padded[-1] <= 16 and padded.endswith(bytes([padded[-1]]) * padded[-1])
    inflater = zlib.decompressobj(wbits=31)
    tar = inflater.decompress(padded[: -padded[-1]])
    assert inflater.eof and not inflater.unused_data
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        [member] = archive.getmembers()
        data = archive.extractfile(member).read()
    return tar, data


def run(data: bytes, keys: BundleKeys, **kwargs: object) -> tuple[object, list[Part]]:
    parts: list[Part] = []
    options = dict(
        name="test-image",
        image_type="machine",
        arch="x86_64",
        expected_sha1=hashlib.sha1(data).hexdigest(),
        keys=keys,
        account_id="1234-5678-9012",
        part_sink=parts.append,
    )
    options.update(kwargs)
    manifest = bundle_image(io.BytesIO(data), **options)  # type: ignore[arg-type]
    return manifest, parts


@pytest.mark.parametrize("size", [0, 1, 511, 512, 4 * 1024 * 1024 + 17])
def test_round_trip_of_small_and_odd_sizes(size: int, keys: tuple[BundleKeys, Path]) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    manifest, parts = run(data, keys[0])
    tar, image = unbundle(manifest.xml, parts, keys[1])
    assert image == data
    assert manifest.size == size
    assert manifest.tar_sha1 == hashlib.sha1(tar).hexdigest()
    assert len(tar) % 10240 == 0  # padded to whole tar records, as GNU tar does


def test_parts_are_10_mib_named_in_order_with_their_digests(keys: tuple[BundleKeys, Path]) -> None:
    import os

    data = os.urandom(23 * 1024 * 1024)  # incompressible: three parts
    manifest, parts = run(data, keys[0], threads=2)
    assert [p.filename for p in parts] == [f"test-image.part.0{i}" for i in range(3)]
    assert [p.size for p in parts[:-1]] == [PART_SIZE, PART_SIZE]
    assert all(p.sha1 == hashlib.sha1(p.data).hexdigest() for p in parts)
    assert manifest.bundled_size == sum(p.size for p in parts)
    assert [(i.filename, i.sha1, i.size) for i in manifest.parts] == [
        (p.filename, p.sha1, p.size) for p in parts
    ]
    assert unbundle(manifest.xml, parts, keys[1])[1] == data


def test_wrong_sha1_raises_before_the_last_part(keys: tuple[BundleKeys, Path]) -> None:
    import os

    data = os.urandom(23 * 1024 * 1024)
    parts: list[Part] = []
    with pytest.raises(ImageChecksumMismatch) as caught:
        run(data, keys[0], expected_sha1="f" * 40, part_sink=parts.append)
    assert hashlib.sha1(data).hexdigest() in str(caught.value)
    # Full parts may stream out before the end; the third, last one is never made.
    assert [p.index for p in parts] in ([], [0], [0, 1])


def test_progress_counts_every_source_byte(keys: tuple[BundleKeys, Path]) -> None:
    data = b"x" * 3_000_001
    seen: list[int] = []
    run(data, keys[0], progress=seen.append)
    assert sum(seen) == len(data)


def test_prefix_names_files_and_name_goes_into_the_manifest(keys: tuple[BundleKeys, Path]) -> None:
    manifest, parts = run(b"abc", keys[0], name="dir/name", prefix="pfx-1")
    assert parts[0].filename == "pfx-1.part.00"
    assert manifest.filename == "pfx-1.manifest.xml"
    assert etree.fromstring(manifest.xml).findtext("image/name") == "dir/name"
    assert etree.fromstring(manifest.xml).findtext("image/user") == "123456789012"


def test_compression_levels_all_round_trip(keys: tuple[BundleKeys, Path]) -> None:
    data = (b"text line %d\n" * 5000) % tuple(range(5000)) + bytes(2_000_000)
    sizes = []
    for level in range(4):
        manifest, parts = run(data, keys[0], compression_level=level)
        assert unbundle(manifest.xml, parts, keys[1])[1] == data
        sizes.append(manifest.bundled_size)
    assert sizes[3] < sizes[0]


def test_the_tar_header_carries_sizes_past_8_gib() -> None:
    header = bundle._tar_header("big", 9 * 1024**3 + 5)  # noqa: SLF001
    member = tarfile.TarInfo.frombuf(header, "utf-8", "strict")
    assert (member.name, member.size, member.isfile()) == ("big", 9 * 1024**3 + 5, True)


def test_a_read_error_becomes_a_bundle_error(keys: tuple[BundleKeys, Path]) -> None:
    class Failing(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            if self.tell() >= 1024 * 1024:
                raise OSError(5, "Input/output error")
            return super().read(n)

    with pytest.raises(BundleError, match="Input/output error"):
        bundle_image(
            Failing(bytes(8 * 1024 * 1024)),
            name="x",
            image_type="machine",
            arch="x86_64",
            expected_sha1=None,
            keys=keys[0],
            account_id="123456789012",
            part_sink=lambda p: None,
        )


def test_a_sink_failure_stops_bundling(keys: tuple[BundleKeys, Path]) -> None:
    import os

    calls = []

    def sink(part: Part) -> None:
        calls.append(part.index)
        raise RuntimeError("upload failed")

    with pytest.raises(RuntimeError, match="upload failed"):
        run(os.urandom(25 * 1024 * 1024), keys[0], part_sink=sink)
    assert calls == [0]


def test_the_euca2ools_unbundle_pipeline_accepts_the_bundle(
    keys: tuple[BundleKeys, Path], tmp_path: Path
) -> None:
    """openssl decrypts the hex key and the stream, gzip -d and tar -x do the rest."""
    import os
    import subprocess

    data = os.urandom(3 * 1024 * 1024) + bytes(9 * 1024 * 1024)
    manifest, parts = run(data, keys[0], name="fs.img")
    image = etree.fromstring(manifest.xml).find("image")

    def rsa_decrypt(hex_text: str) -> str:
        out = subprocess.run(
            ["openssl", "pkeyutl", "-decrypt", "-inkey", str(keys[1])],
            input=bytes.fromhex(hex_text),
            capture_output=True,
            check=True,
        )
        return out.stdout.decode("ascii")

    key = rsa_decrypt(image.findtext("ec2_encrypted_key"))
    iv = rsa_decrypt(image.findtext("ec2_encrypted_iv"))
    for part in parts:
        (tmp_path / part.filename).write_bytes(part.data)
    out = tmp_path / "out"
    out.mkdir()
    script = (
        'cat "$1"/fs.img.part.* | openssl enc -d -aes-128-cbc -K "$2" -iv "$3" '
        '| gzip -d | tar -x -C "$4"'
    )
    subprocess.run(
        ["bash", "-o", "pipefail", "-c", script, "bash", str(tmp_path), key, iv, str(out)],
        check=True,
    )
    assert [p.name for p in out.iterdir()] == ["fs.img"]
    assert (out / "fs.img").read_bytes() == data
