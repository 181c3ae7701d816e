"""Any S3 region, and any answer that is not the cloud's XML, through `registrar.clouds.euca_api`.

moto's S3 behaves as AWS does: outside us-east-1 a CreateBucket must name its region
(IllegalLocationConstraintException otherwise). SeaweedFS accepts a bucket with or without one
(tests/registrar/test_seaweed_s3.py); Eucalyptus takes none, so the first CreateBucket is
always sent without one. An HTML page from a reverse proxy in front of the cloud must give the
same one-line error, naming the step, as any refusal.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from registrar import config as registrar_config
from registrar.clouds.euca_api import Cloud
from registrar.errors import CloudError
from tests.registrar.test_install_image_cli import install_image, one_line_error
from tests.support.cloud import S3_PATH, StandInCloud
from tests.support.images import ImageFactory


def _bucket_puts(cloud: StandInCloud) -> list[str]:
    """The CreateBucket requests the proxy saw (PUT of the bucket itself)."""
    bucket_path = f"{S3_PATH}/{cloud.bucket}"
    return [p for m, p, _ in cloud.s3_requests if m == "PUT" and p.rstrip("/") == bucket_path]


@pytest.mark.parametrize(
    ("region", "creates"),
    [("us-east-1", 1), ("us-west-2", 2), ("eucalyptus", 2)],
)
def test_the_bucket_is_created_in_any_region(
    cloud: StandInCloud, tmp_path: Path, region: str, creates: int
) -> None:
    config = registrar_config.load(cloud.write_config(tmp_path / "c.toml", region=region))
    remote = Cloud.from_config(config)
    remote.ensure_bucket()
    remote.ensure_bucket()  # there and ours now: no second CreateBucket
    # First as Eucalyptus wants it (no location constraint); moto, like AWS, refuses that
    # outside us-east-1, and the second names the region.
    assert len(_bucket_puts(cloud)) == creates
    location = cloud.s3.get_bucket_location(Bucket=cloud.bucket)["LocationConstraint"]
    assert (location or "us-east-1") == region


def test_a_region_outside_us_east_1_installs_an_image(
    cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory
) -> None:
    config = cloud.write_config(tmp_path / "c.toml", region="us-west-2")
    kernel = image_factory.blob(1024 * 1024, seed=3, kind="kernel")
    done = install_image("--config", config, "--type", "kernel", kernel)
    assert done.returncode == 0, done.stderr
    ec2 = boto3.client(
        "ec2",
        endpoint_url=cloud.endpoint_url,
        region_name="us-west-2",
        aws_access_key_id=cloud.access_key,
        aws_secret_access_key=cloud.secret_key,
    )
    images = ec2.describe_images(ImageIds=[done.stdout.strip()])["Images"]
    assert images[0]["State"] == "available"
    assert any(key.endswith(".manifest.xml") for key in cloud.bucket_keys())


def test_the_default_region_creates_the_bucket_and_moto_ec2_refuses_it_in_one_line(
    cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory
) -> None:
    # `region` left out: "eucalyptus". moto's S3 takes it as a location constraint; its EC2
    # knows only AWS region names, and the registrar must say so in one line.
    config = cloud.write_config(tmp_path / "c.toml", region=None)
    assert registrar_config.load(config).require_cloud().region == "eucalyptus"
    kernel = image_factory.blob(1024 * 1024, seed=4, kind="kernel")
    done = install_image("--config", config, "--type", "kernel", kernel)
    assert done.returncode == 1, done.stderr
    line = one_line_error(done)
    assert line.startswith("registrar: error: RegisterImage: "), line
    assert len(_bucket_puts(cloud)) == 2
    assert cloud.s3.get_bucket_location(Bucket=cloud.bucket)["LocationConstraint"] == "eucalyptus"
    assert cloud.bucket_keys() == []  # the bundle was removed again
    assert len(cloud.calls_of("RegisterImage")) >= 1


class HtmlPages:
    """An HTTP server answering every request with one HTML error page, as nginx does."""

    def __init__(self, status: int, title: str) -> None:
        self.requests = 0
        owner = self
        page = (
            f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
            f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n"
            "</body>\r\n</html>\r\n"
        ).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                owner.requests += 1
                self.send_response(status)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(page)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def html_pages() -> Iterator[list[HtmlPages]]:
    servers: list[HtmlPages] = []
    yield servers
    for server in servers:
        server.close()


@pytest.mark.parametrize(
    ("status", "title", "ec2_says"),
    [
        # botocore reads a 5xx as a ClientError (after its retries) …
        (502, "502 Bad Gateway", "502: Bad Gateway"),
        # … and fails to parse any other status's HTML as EC2's XML (ResponseParserError).
        (403, "403 Forbidden", "the cloud sent an HTML page that is not its API's XML: "),
        (200, "Welcome to nginx!", "the cloud sent an HTML page that is not its API's XML: "),
    ],
)
def test_an_html_page_instead_of_the_cloud_is_a_one_line_error_naming_the_step(
    cloud: StandInCloud,
    tmp_path: Path,
    html_pages: list[HtmlPages],
    status: int,
    title: str,
    ec2_says: str,
) -> None:
    pages = HtmlPages(status, title)
    html_pages.append(pages)
    config = registrar_config.load(cloud.write_config(tmp_path / "c.toml", ec2_url=pages.url))
    remote = Cloud.from_config(config)
    for step, call in (
        ("RegisterImage", lambda: remote.register("b/f/x.manifest.xml", name="abc", arch="i386")),
        ("DescribeImages", lambda: remote.describe(["ami-12345678"])),
        ("DeregisterImage", lambda: remote.deregister("ami-12345678")),
        ("DescribeImages", lambda: remote.images_named("abc")),
    ):
        with pytest.raises(CloudError) as caught:
            call()
        message = str(caught.value)
        assert caught.value.step == step
        assert message.startswith(f"{step}: {ec2_says}"), message
        if status != 502:
            assert message.endswith(f"{title!r}"), message
        assert "\n" not in message
    assert pages.requests >= 4


def test_an_html_page_from_the_ec2_endpoint_fails_install_image_in_one_line(
    cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory, html_pages: list[HtmlPages]
) -> None:
    # The bucket is there (moto); the EC2 endpoint is a reverse proxy's error page.
    pages = HtmlPages(404, "404 Not Found")
    html_pages.append(pages)
    config = cloud.write_config(tmp_path / "c.toml", ec2_url=pages.url)
    kernel = image_factory.blob(1024 * 1024, seed=5, kind="kernel")
    done = install_image("--config", config, "--type", "kernel", kernel)
    assert done.returncode == 1, done.stderr
    # RegisterImage got no answer, so the cleanup looks for the image by name (a lost answer
    # may hide a registration); that look meets the same page, and the line says so.
    page = "the cloud sent an HTML page that is not its API's XML: '404 Not Found'"
    assert one_line_error(done) == (
        f"registrar: error: RegisterImage: {page}; cleanup failed too: DescribeImages: {page}"
    )
    assert cloud.bucket_keys() == []


def test_an_html_page_from_the_s3_endpoint_names_the_bucket_step(
    cloud: StandInCloud, tmp_path: Path, html_pages: list[HtmlPages]
) -> None:
    pages = HtmlPages(403, "403 Forbidden")
    html_pages.append(pages)
    s3_url = pages.url + S3_PATH
    config = registrar_config.load(cloud.write_config(tmp_path / "c.toml", s3_url=s3_url))
    with pytest.raises(CloudError) as caught:
        Cloud.from_config(config).ensure_bucket()
    # HEAD says 403 with no body; the listing that follows gets the page's status only.
    assert str(caught.value) == "bucket check: 403: Forbidden"
