"""The cloud: Eucalyptus' S3 (Walrus / objectstorage) and EC2 APIs through boto3.

This is the only module that imports boto3 or botocore. Every botocore failure becomes a
CloudError whose `step` says what was being done ("bucket check", "bucket create", "part upload",
"manifest upload", "RegisterImage", "waiting for available", "DeregisterImage", "delete",
"DescribeImages") and whose message keeps the cloud's own code and text.

    cloud = Cloud.from_config(config)            # a registrar.config.Config
    upload = cloud.start_upload(folder)          # creates the bucket if needed
    manifest = bundle_image(..., part_sink=upload.put_part)   # parts go up in parallel
    location = upload.finish(manifest)           # waits for parts, then the manifest
    image_id = cloud.register(location, name=..., arch=..., kernel_id=..., ramdisk_id=...)
    cloud.wait_available(image_id)
    ...
    cloud.cleanup(folder, image_id)              # deregister + delete everything under folder
    cloud.cleanup(folder, by_name=True)          # the id never reached us: find it by name

`upload.abort()` deletes whatever the upload put (or may have put); `registrar.install` wires
these steps together with that cleanup on every failure path.

Compatibility choices, for Eucalyptus 3.x/4.x: path-style addressing by default, SigV2 ("s3")
selectable, no flexible checksums (old object stores refuse the x-amz-checksum headers), v1
object listing, objects deleted one by one (Walrus has no multi-object delete). The bucket is
created without a location constraint, as Eucalyptus expects; an AWS-style S3 that requires one
outside us-east-1 (IllegalLocationConstraintException) is asked again with `region` as it.
"""

from __future__ import annotations

import collections.abc
import concurrent.futures
import contextlib
import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import botocore.parsers

from registrar.config import CloudConfig, Config
from registrar.errors import CloudError, ImageFailed, RegistrationTimeout

log = logging.getLogger(__name__)

EXEC_READ_ACL = "aws-exec-read"  # lets the cloud's own account read the bundle it registers
_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True)
class ImageState:
    """What DescribeImages says of one image."""

    image_id: str
    state: str
    location: str | None = None
    name: str | None = None


# What a botocore call can raise besides our own bugs. ResponseParserError (an answer that is
# not the API's XML, such as a reverse proxy's HTML error page) is no BotoCoreError.
BOTO_ERRORS = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    botocore.parsers.ResponseParserError,
)
US_EAST_1 = "us-east-1"  # the one AWS region whose buckets take no location constraint
_MESSAGE_LIMIT = 300  # characters of a cloud's message kept in the one-line error
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def _one_line(text: str) -> str:
    """`text` with its whitespace runs collapsed, cut to a length one log line can carry."""
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 1] + "…"


def _unparsable(exc: botocore.parsers.ResponseParserError) -> str:
    """Say what came back instead of the API's XML: an HTML page's title, else its start."""
    # botocore's message is "Unable to parse response (REASON), invalid XML received. …:\n"
    # then the repr of the body's bytes; the title survives repr() as it is.
    _, _, body = str(exc).partition("\n")
    body = body.removeprefix("b'").removeprefix('b"')
    title = _TITLE.search(body)
    shown = title.group(1) if title else body[:120]
    what = "an HTML page" if "<html" in body[:512].lower() else "an answer"
    return f"the cloud sent {what} that is not its API's XML: {_one_line(shown)!r}"


def _raise_cloud_error(step: str, exc: Exception) -> NoReturn:
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "Unknown")
        message = _one_line(str(error.get("Message") or exc))
        raise CloudError(step, f"{code}: {message}", code=code) from exc
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        raise CloudError(step, f"cannot connect to {exc.kwargs.get('endpoint_url')}") from exc
    if isinstance(exc, botocore.parsers.ResponseParserError):
        raise CloudError(step, _unparsable(exc)) from exc
    raise CloudError(step, _one_line(str(exc)) or type(exc).__name__) from exc


def _call(step: str, fn: Callable[..., _T], **kwargs: Any) -> _T:
    """Run one botocore call, translating its errors to CloudError(step, …)."""
    try:
        return fn(**kwargs)
    except BOTO_ERRORS as exc:
        _raise_cloud_error(step, exc)


def _status(exc: botocore.exceptions.ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class Cloud:
    """S3 and EC2 clients for one cloud and one bucket; thread-safe (boto3 clients are)."""

    def __init__(self, cfg: CloudConfig, bucket: str) -> None:
        self.cfg = cfg
        self.bucket = bucket
        session = boto3.session.Session(
            aws_access_key_id=cfg.access_key,
            aws_secret_access_key=cfg.secret_key,
            region_name=cfg.region,
        )
        common: dict[str, Any] = {
            "connect_timeout": min(cfg.request_timeout, 30),
            "read_timeout": cfg.request_timeout,
            "retries": {"max_attempts": 4, "mode": "standard"},
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
            "max_pool_connections": max(10, cfg.upload_concurrency + 2),
        }
        s3_config = botocore.config.Config(
            signature_version=cfg.s3_signature_version,
            s3={"addressing_style": cfg.s3_addressing_style},
            **common,
        )
        ec2_config = botocore.config.Config(signature_version=cfg.ec2_signature_version, **common)
        self.s3 = session.client("s3", endpoint_url=cfg.s3_url, config=s3_config)
        self.ec2 = session.client("ec2", endpoint_url=cfg.ec2_url, config=ec2_config)

    @classmethod
    def from_config(cls, config: Config) -> Cloud:
        """The cloud of a loaded config (its `[cloud]` section and `[registrar] bucket`)."""
        return cls(config.require_cloud(), config.registrar.bucket)

    # --- S3 ---

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists and is ours.

        Steps: "bucket check" (HEAD, and on a 403 a listing that says why), "bucket create".
        """
        try:
            self.s3.head_bucket(Bucket=self.bucket)
            return
        except botocore.exceptions.ClientError as exc:
            status = _status(exc)
            if status == 403:
                self._explain_forbidden(exc)
            elif status not in (404, 400):
                _raise_cloud_error("bucket check", exc)
        except BOTO_ERRORS as exc:
            _raise_cloud_error("bucket check", exc)
        self._create_bucket()

    def _explain_forbidden(self, head_error: botocore.exceptions.ClientError) -> None:
        """Raise the real cause of a 403 on HEAD, whose answer has no body to name it.

        A listing of one key is refused for the same reason (SignatureDoesNotMatch,
        InvalidAccessKeyId, AccessDenied, …) with an error document that says so. Returns
        only if the bucket turns out not to exist, so that it is created.
        """
        try:
            self.s3.list_objects(Bucket=self.bucket, MaxKeys=1)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) == "NoSuchBucket":
                return
            _raise_cloud_error("bucket check", exc)
        except BOTO_ERRORS as exc:
            _raise_cloud_error("bucket check", exc)
        _raise_cloud_error("bucket check", head_error)

    def _create_bucket(self) -> None:
        """CreateBucket (step "bucket create"); with `region` as location constraint if asked."""
        try:
            self.s3.create_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as exc:
            code = _code(exc)
            if code == "IllegalLocationConstraintException" and self.cfg.region != US_EAST_1:
                # An AWS-style S3 outside us-east-1 wants its region named; Eucalyptus never
                # asks, so it still gets the request it always got.
                self._create_bucket_in_region()
                return
            if code != "BucketAlreadyOwnedByYou":
                _raise_cloud_error("bucket create", exc)
        except BOTO_ERRORS as exc:
            _raise_cloud_error("bucket create", exc)
        log.info("created bucket %s", self.bucket)

    def _create_bucket_in_region(self) -> None:
        location = {"LocationConstraint": self.cfg.region}
        try:
            self.s3.create_bucket(Bucket=self.bucket, CreateBucketConfiguration=location)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) != "BucketAlreadyOwnedByYou":
                _raise_cloud_error("bucket create", exc)
        except BOTO_ERRORS as exc:
            _raise_cloud_error("bucket create", exc)
        log.info("created bucket %s in region %s", self.bucket, self.cfg.region)

    def put_object(self, key: str, data: bytes, *, step: str) -> None:
        """Upload one object with the `aws-exec-read` canned ACL."""
        _call(step, self.s3.put_object, Bucket=self.bucket, Key=key, Body=data, ACL=EXEC_READ_ACL)

    def get_object(self, key: str, *, step: str) -> bytes:
        """The bytes of one object of the bucket."""
        response = _call(step, self.s3.get_object, Bucket=self.bucket, Key=key)
        try:
            return bytes(response["Body"].read())
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            _raise_cloud_error(step, exc)

    def list_keys(self, folder: str) -> list[str]:
        """Every object key under `folder/`."""
        keys: list[str] = []
        try:
            paginator = self.s3.get_paginator("list_objects")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{folder}/"):
                keys.extend(item["Key"] for item in page.get("Contents", []))
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
                return []
            _raise_cloud_error("list", exc)
        except BOTO_ERRORS as exc:
            _raise_cloud_error("list", exc)
        return keys

    def delete_keys(self, keys: collections.abc.Iterable[str]) -> None:
        """Delete objects one by one, in parallel; all are tried, the first failure raised."""
        keys = list(keys)
        if not keys:
            return
        with concurrent.futures.ThreadPoolExecutor(self.cfg.upload_concurrency) as pool:
            futures = [
                pool.submit(_call, "delete", self.s3.delete_object, Bucket=self.bucket, Key=key)
                for key in keys
            ]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]  # type: ignore[misc]
        log.info("deleted %d objects from %s", len(keys), self.bucket)

    def start_upload(self, folder: str) -> BundleUpload:
        """Make sure the bucket exists and begin uploading one bundle under `folder/`."""
        self.ensure_bucket()
        return BundleUpload(self, folder)

    # --- EC2 ---

    def register(
        self,
        location: str,
        *,
        name: str,
        arch: str,
        kernel_id: str | None = None,
        ramdisk_id: str | None = None,
        description: str | None = None,
    ) -> str:
        """RegisterImage; return the new image id (step "RegisterImage")."""
        params: dict[str, Any] = {"ImageLocation": location, "Name": name, "Architecture": arch}
        if kernel_id:
            params["KernelId"] = kernel_id
        if ramdisk_id:
            params["RamdiskId"] = ramdisk_id
        if description:
            params["Description"] = description
        response = _call("RegisterImage", self.ec2.register_image, **params)
        image_id = str(response["ImageId"])
        log.info("registered %s as %s", location, image_id)
        return image_id

    def describe(self, image_ids: collections.abc.Sequence[str]) -> dict[str, ImageState]:
        """The state of each image that exists; ids the cloud does not know are left out."""
        if not image_ids:
            return {}
        try:
            response = self.ec2.describe_images(ImageIds=list(image_ids))
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if not code.startswith("InvalidAMIID") or len(image_ids) == 1:
                if code.startswith("InvalidAMIID"):
                    return {}
                _raise_cloud_error("DescribeImages", exc)
            # One unknown id fails the whole call: ask one by one.
            found: dict[str, ImageState] = {}
            for image_id in image_ids:
                found.update(self.describe([image_id]))
            return found
        except BOTO_ERRORS as exc:
            _raise_cloud_error("DescribeImages", exc)
        return {
            image["ImageId"]: ImageState(
                image_id=image["ImageId"],
                state=image.get("State", "unknown"),
                location=image.get("ImageLocation"),
                name=image.get("Name"),
            )
            for image in response.get("Images", [])
        }

    def wait_available(self, image_id: str, *, timeout: float | None = None) -> None:
        """Poll DescribeImages until the image is `available` (step "waiting for available").

        Raises RegistrationTimeout after `timeout` (default: the config's register_timeout),
        ImageFailed if the cloud marks the image failed or deregistered.
        """
        timeout = self.cfg.register_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        state = "unknown"
        while True:
            found = self.describe([image_id]).get(image_id)
            state = found.state if found else "not yet visible"
            if state == "available":
                return
            if state in ("failed", "deregistered", "error"):
                raise ImageFailed("waiting for available", f"image {image_id} is {state}")
            if time.monotonic() >= deadline:
                raise RegistrationTimeout(
                    "waiting for available",
                    f"image {image_id} still {state} after {timeout:g} s",
                )
            time.sleep(min(self.cfg.poll_interval, max(0.0, deadline - time.monotonic())))

    def deregister(self, image_id: str) -> None:
        """DeregisterImage; an image already gone is fine."""
        try:
            self.ec2.deregister_image(ImageId=image_id)
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code.startswith("InvalidAMIID"):
                return
            _raise_cloud_error("DeregisterImage", exc)
        except BOTO_ERRORS as exc:
            _raise_cloud_error("DeregisterImage", exc)
        log.info("deregistered %s", image_id)

    def images_named(self, name: str) -> list[str]:
        """Ids of the images registered under `name` (step "DescribeImages")."""
        try:
            response = self.ec2.describe_images(Filters=[{"Name": "name", "Values": [name]}])
        except BOTO_ERRORS as exc:
            _raise_cloud_error("DescribeImages", exc)
        # The filter is the cloud's; the check is ours.
        return [str(i["ImageId"]) for i in response.get("Images", []) if i.get("Name") == name]

    def cleanup(self, folder: str, image_id: str | None = None, *, by_name: bool = False) -> None:
        """Deregister `image_id` (if any) and delete every object under `folder/`.

        `by_name`: also deregister every image named `folder`, for when a RegisterImage may
        have gone through without its id reaching us: an answer lost to a reset or a timeout
        (botocore then retries, and each attempt may register), or a registrar killed before
        it saved the id. A bundle's folder name is unique, and it is the image's name.
        Everything is attempted even if one step fails; the first failure is raised after.
        """
        self._remove(image_id, folder if by_name else None, lambda: self.list_keys(folder))

    def cleanup_manifest(self, key: str, name: str, image_id: str | None = None) -> None:
        """Deregister `image_id` and every image named `name`, and delete the object `key`.

        For an image registered from a manifest added to a folder other images share: the
        folder's parts stay. Everything is attempted; the first failure is raised after.
        """
        self._remove(image_id, name, lambda: [key])

    def _remove(
        self,
        image_id: str | None,
        name: str | None,
        keys: Callable[[], list[str]],
    ) -> None:
        """Deregister the image (and those named `name`), delete `keys()`; all are attempted."""
        errors: list[CloudError] = []
        image_ids = [image_id] if image_id else []
        if name is not None:
            try:
                image_ids += [i for i in self.images_named(name) if i not in image_ids]
            except CloudError as exc:
                errors.append(exc)
        for each in image_ids:
            try:
                self.deregister(each)
            except CloudError as exc:
                errors.append(exc)
        try:
            self.delete_keys(keys())
        except CloudError as exc:
            errors.append(exc)
        if errors:
            raise errors[0]


class BundleUpload:
    """Uploads one bundle's parts in parallel as the bundler produces them, then the manifest.

    `put_part` is a bundler part sink: it blocks while `upload_concurrency` parts are in flight,
    which bounds memory, and raises the first upload failure so bundling stops early.
    """

    def __init__(self, cloud: Cloud, folder: str) -> None:
        self.cloud = cloud
        self.folder = folder
        self._pool = concurrent.futures.ThreadPoolExecutor(
            cloud.cfg.upload_concurrency, thread_name_prefix="upload"
        )
        self._slots = threading.BoundedSemaphore(cloud.cfg.upload_concurrency)
        self._futures: list[concurrent.futures.Future[None]] = []
        self._lock = threading.Lock()
        self._attempted: set[str] = set()  # guarded by _lock; anything that may now exist
        self._failure: BaseException | None = None
        self.uploaded_bytes = 0

    def key(self, filename: str) -> str:
        """The object key of a bundle file."""
        return f"{self.folder}/{filename}"

    def put_part(self, part: Any) -> None:
        """Queue one `bundle.Part` for upload (step "part upload")."""
        self._raise_failure()
        self._slots.acquire()
        key = self.key(part.filename)
        with self._lock:
            self._attempted.add(key)
        try:
            future = self._pool.submit(self._put, key, part.data)
        except BaseException:
            self._slots.release()
            raise
        self._futures.append(future)

    def _put(self, key: str, data: bytes) -> None:
        try:
            self.cloud.put_object(key, data, step="part upload")
            with self._lock:
                self.uploaded_bytes += len(data)
        except BaseException as exc:
            with self._lock:
                self._failure = self._failure or exc
            raise
        finally:
            self._slots.release()

    def _raise_failure(self) -> None:
        with self._lock:
            failure = self._failure
        if failure is not None:
            raise failure

    def finish(self, manifest: Any) -> str:
        """Wait for every part, upload the manifest; return the ImageLocation to register."""
        for future in self._futures:
            future.result()
        self._pool.shutdown(wait=True)
        key = self.key(manifest.filename)
        with self._lock:
            self._attempted.add(key)
        self.cloud.put_object(key, manifest.xml, step="manifest upload")
        return f"{self.cloud.bucket}/{key}"

    def abort(self) -> None:
        """Stop uploading and delete every object this upload may have created."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            attempted = set(self._attempted)
        with contextlib.suppress(CloudError):
            attempted |= set(self.cloud.list_keys(self.folder))
        self.cloud.delete_keys(sorted(attempted))
