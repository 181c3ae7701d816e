"""The stand-in cloud fixture itself: real S3 and EC2 over HTTP, keys that belong together."""

from __future__ import annotations

import os
import tomllib
import urllib.error
import urllib.request

import botocore.config
import botocore.exceptions
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from tests.support.cloud import StandInCloud


def test_s3_put_and_get_over_http(cloud: StandInCloud) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=cloud.s3_url,
        region_name=cloud.region,
        aws_access_key_id=cloud.access_key,
        aws_secret_access_key=cloud.secret_key,
    )
    s3.create_bucket(Bucket=cloud.bucket)
    body = os.urandom(100_000)
    s3.put_object(Bucket=cloud.bucket, Key="a/b.part.00", Body=body, ACL="aws-exec-read")
    # At Eucalyptus 4's path, which botocore keeps in front of the bucket.
    assert cloud.s3_url.endswith("/services/objectstorage")
    assert (
        "PUT",
        f"/services/objectstorage/{cloud.bucket}/a/b.part.00",
        "aws-exec-read",
    ) in cloud.s3_requests
    assert s3.head_object(Bucket=cloud.bucket, Key="a/b.part.00")["ContentLength"] == len(body)
    got = cloud.s3.get_object(Bucket=cloud.bucket, Key="a/b.part.00")["Body"].read()
    assert got == body
    assert cloud.bucket_keys() == ["a/b.part.00"]
    # It really is an HTTP server, and it keeps the canned ACL: anonymous reads are refused.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{cloud.s3_url}/{cloud.bucket}/a/b.part.00")
    refused.value.close()
    assert refused.value.code == 403


def test_each_test_starts_with_an_empty_cloud(cloud: StandInCloud) -> None:
    assert cloud.image_ids() == []
    assert cloud.s3.list_buckets()["Buckets"] == []
    assert cloud.ec2_calls == []


def test_ec2_register_and_describe_through_the_recording_proxy(cloud: StandInCloud) -> None:
    import boto3

    ec2 = boto3.client(
        "ec2",
        endpoint_url=cloud.ec2_url,
        region_name=cloud.region,
        aws_access_key_id=cloud.access_key,
        aws_secret_access_key=cloud.secret_key,
    )
    image_id = ec2.register_image(
        ImageLocation=f"{cloud.bucket}/x/x.manifest.xml", Name="fixture-test", KernelId="aki-1"
    )["ImageId"]
    images = ec2.describe_images(ImageIds=[image_id])["Images"]
    assert images[0]["State"] == "available"
    assert cloud.image_ids() == [image_id]
    [call] = cloud.calls_of("RegisterImage")
    assert call["ImageLocation"] == f"{cloud.bucket}/x/x.manifest.xml"
    assert call["KernelId"] == "aki-1"

    cloud.hold_pending = True
    assert ec2.describe_images(ImageIds=[image_id])["Images"][0]["State"] == "pending"

    cloud.refuse("RegisterImage", "InvalidManifest", "bad manifest")
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        ec2.register_image(ImageLocation="b/y.manifest.xml", Name="second")
    assert caught.value.response["Error"] == {"Code": "InvalidManifest", "Message": "bad manifest"}
    assert cloud.image_ids() == [image_id]
    # The first call broke Eucalyptus' rules (no manifest there, no Architecture, a kernel id
    # never registered here); the refused one was not looked at.
    assert cloud.take_violations() == [
        f"RegisterImage 'fixture-test': ImageLocation '{cloud.bucket}/x/x.manifest.xml'"
        " names no uploaded manifest",
        "RegisterImage 'fixture-test': Architecture None is not one of"
        " ('i386', 'x86_64', 'arm64', 'armhf')",
        "RegisterImage 'fixture-test': KernelId aki-1 on a None image",
    ]


def _manifest(image_type: str, arch: str = "x86_64", kernel_id: str = "") -> bytes:
    kernel = f"<kernel_id>{kernel_id}</kernel_id>" if kernel_id else ""
    return (
        f"<manifest><machine_configuration><architecture>{arch}</architecture>{kernel}"
        f"</machine_configuration><image><type>{image_type}</type></image></manifest>"
    ).encode()


def test_the_proxy_checks_every_register_image_as_eucalyptus_would(cloud: StandInCloud) -> None:
    import boto3

    ec2 = boto3.client(
        "ec2",
        endpoint_url=cloud.ec2_url,
        region_name=cloud.region,
        aws_access_key_id=cloud.access_key,
        aws_secret_access_key=cloud.secret_key,
        # botocore itself refuses a short Name; the proxy must see what a caller sends.
        config=botocore.config.Config(parameter_validation=False),
    )
    cloud.s3.create_bucket(Bucket=cloud.bucket)
    for folder, image_type in (("k", "kernel"), ("r", "ramdisk"), ("m", "machine")):
        cloud.s3.put_object(
            Bucket=cloud.bucket, Key=f"{folder}/x.manifest.xml", Body=_manifest(image_type)
        )

    def register(folder: str, name: str, **more: str) -> str:
        location = f"{cloud.bucket}/{folder}/x.manifest.xml"
        more.setdefault("Architecture", "x86_64")
        return ec2.register_image(ImageLocation=location, Name=name, **more)["ImageId"]

    kernel, ramdisk = register("k", "kernel-1"), register("r", "ramdisk-1")
    machine = register("m", "machine-1", KernelId=kernel, RamdiskId=ramdisk)
    assert cloud.violations == []

    duplicate = register("m", "machine-1")  # the name is taken
    register("m", "ab")  # too short
    register("m", "has space")
    register("m", "m" * 129)
    register("m", "arch-differs", Architecture="i386")
    register("m", "kernel-swapped", KernelId=ramdisk, RamdiskId=kernel)
    register("m", "kernel-unknown", KernelId="aki-12345678")
    register("k", "kernel-with-kernel", KernelId=kernel)
    other_kernel = register("k", "kernel-2")
    cloud.s3.put_object(
        Bucket=cloud.bucket, Key="n/x.manifest.xml", Body=_manifest("machine", kernel_id=kernel)
    )
    register("n", "kernel-not-the-bundles", KernelId=other_kernel)
    assert cloud.take_violations() == [
        f"RegisterImage 'machine-1': Name 'machine-1' is already {machine}'s",
        "RegisterImage 'ab': Name 'ab' is not 3-128 characters of [A-Za-z0-9()./_-]",
        "RegisterImage 'has space': Name 'has space' is not 3-128 characters of [A-Za-z0-9()./_-]",
        f"RegisterImage '{'m' * 129}': Name '{'m' * 129}' is not 3-128 characters of"
        " [A-Za-z0-9()./_-]",
        "RegisterImage 'arch-differs': Architecture 'i386' differs from the manifest's 'x86_64'",
        f"RegisterImage 'kernel-swapped': KernelId {ramdisk} is not a kernel registered here",
        f"RegisterImage 'kernel-swapped': RamdiskId {kernel} is not a ramdisk registered here",
        "RegisterImage 'kernel-unknown': KernelId aki-12345678 is not a kernel registered here",
        f"RegisterImage 'kernel-with-kernel': KernelId {kernel} on a kernel image",
        f"RegisterImage 'kernel-not-the-bundles': KernelId {other_kernel} differs from the"
        f" manifest's {kernel}",
    ]

    # A deregistered image's name is free again.
    ec2.deregister_image(ImageId=machine)
    ec2.deregister_image(ImageId=duplicate)
    register("m", "machine-1", KernelId=kernel)
    assert cloud.violations == []


def test_certificates_load_and_keys_match(cloud: StandInCloud) -> None:
    for cert_path, key_path in (
        (cloud.cloud_cert, cloud.cloud_key),
        (cloud.user_cert, cloud.user_key),
    ):
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert cert.public_key().public_numbers() == key.public_key().public_numbers()
        secret = b"0123456789abcdef0123456789abcdef"
        assert (
            key.decrypt(cert.public_key().encrypt(secret, padding.PKCS1v15()), padding.PKCS1v15())
            == secret
        )
        signature = key.sign(b"x", padding.PKCS1v15(), hashes.SHA1())
        cert.public_key().verify(signature, b"x", padding.PKCS1v15(), hashes.SHA1())
    cloud_numbers = x509.load_pem_x509_certificate(cloud.cloud_cert.read_bytes()).public_key()
    user_numbers = x509.load_pem_x509_certificate(cloud.user_cert.read_bytes()).public_key()
    assert cloud_numbers.public_numbers() != user_numbers.public_numbers()


def test_config_and_eucarc_writers(cloud: StandInCloud, tmp_path) -> None:
    config = tomllib.loads(cloud.write_config(tmp_path / "c.toml").read_text())
    assert config["registrar"]["bucket"] == cloud.bucket
    assert config["cloud"]["s3_url"] == cloud.s3_url
    assert config["cloud"]["user_key"] == str(cloud.user_key)
    unsigned = tomllib.loads(cloud.write_config(tmp_path / "u.toml", signed=False).read_text())
    assert "user_key" not in unsigned["cloud"]
    full = cloud.write_config(
        tmp_path / "f.toml",
        registrar={"listen": "127.0.0.1:0", "allowed_networks": ["127.0.0.0/8"]},
        store={"cache_dir": tmp_path / "cache", "cache_size": "1G"},
    )
    parsed = tomllib.loads(full.read_text())
    assert parsed["store"] == {"cache_dir": str(tmp_path / "cache"), "cache_size": "1G"}
    assert parsed["registrar"]["allowed_networks"] == ["127.0.0.0/8"]
    assert parsed["registrar"]["bucket"] == cloud.bucket
    eucarc = cloud.write_eucarc(tmp_path / "euca")
    text = eucarc.read_text()
    assert f"export EC2_URL={cloud.ec2_url}" in text
    assert (tmp_path / "euca" / "cloud-cert.pem").read_bytes() == cloud.cloud_cert.read_bytes()


def test_injected_faults_answer_500_or_slowdown_and_botocore_retries_them(
    cloud: StandInCloud,
) -> None:
    import boto3

    def clients(attempts: int) -> tuple:
        session = boto3.session.Session(
            aws_access_key_id=cloud.access_key,
            aws_secret_access_key=cloud.secret_key,
            region_name=cloud.region,
        )
        config = botocore.config.Config(
            retries={"total_max_attempts": attempts, "mode": "standard"},
            s3={"addressing_style": "path"},
        )
        return (
            session.client("s3", endpoint_url=cloud.s3_url, config=config),
            session.client("ec2", endpoint_url=cloud.ec2_url, config=config),
        )

    cloud.s3.create_bucket(Bucket=cloud.bucket)
    s3, ec2 = clients(1)
    cloud.inject_faults(1.0, seed=3)
    codes = set()
    for call in (
        lambda: s3.put_object(Bucket=cloud.bucket, Key="k", Body=b"x"),
        lambda: s3.head_object(Bucket=cloud.bucket, Key="k"),  # no body: the status says it
        lambda: ec2.describe_images(Owners=["self"]),
    ):
        for _ in range(4):
            with pytest.raises(botocore.exceptions.ClientError) as refused:
                call()
            codes.add(refused.value.response["ResponseMetadata"]["HTTPStatusCode"])
    assert codes == {500, 503}
    injected = cloud.injected_faults
    assert len(injected) == 12
    assert {what for what, _, _ in injected} == {"S3 PUT", "S3 HEAD", "DescribeImages"}
    assert {(status, code) for _, status, code in injected} == {
        (500, "InternalError"),
        (503, "SlowDown"),
    }
    assert cloud.bucket_keys() == []  # nothing reached moto

    # At a 30 % rate, botocore's retries get every request through.
    s3, ec2 = clients(10)
    cloud.inject_faults(0.3, seed=5)
    for n in range(20):
        s3.put_object(Bucket=cloud.bucket, Key=f"k{n}", Body=b"x")
    first = cloud.injected_faults[12:]
    assert 1 <= len(first) <= 20
    assert cloud.bucket_keys() == sorted(f"k{n}" for n in range(20))
    cloud.inject_faults(0, seed=5)
    ec2.describe_images(Owners=["self"])
    assert cloud.injected_faults[12:] == first
