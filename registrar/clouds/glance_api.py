"""OpenStack: images streamed into Glance (API v2), authenticated through Keystone.

This is the only module that imports openstacksdk or keystoneauth1. openstacksdk resolves the
credentials (explicit keys, an openrc's values, or a clouds.yaml entry, merged by
registrar.config); keystoneauth1 authenticates, finds Glance in the catalog (or takes
`glance_url`), and sends the requests. Every failure becomes a CloudError whose `step` says what
was being done ("authenticate", "image create", "image upload", "waiting for active",
"verify", "image delete", "image list", "image show") in one line, raised `from` the library's
exception. Errors are one of: credentials refused (401), forbidden by policy (403), quota or
size limit (413), not reachable (connection refused, timeout, TLS), or Glance's own message.

    cloud = OpenStackCloud.from_config(cfg)       # a registrar.config.OpenStackConfig
    disk_format, container_format = PART_FORMATS["KERNEL"]
    image_id = cloud.register_stream(
        source, name="…", disk_format=…, container_format=…,
        properties={"imageproxy_sha1": "…", …}, timeout=cfg.register_timeout,
        progress=bar.advance)                     # called with each chunk's length
    cloud.states([id1, id2])                      # {id: "active", …}; deleted ids absent
    cloud.delete(image_id)                        # a 404 is success
    cloud.find({"imageproxy_sha1": "…"})          # ids of images whose properties match
    cloud.images()                                # GlanceImage for each image named prefix…

`register_stream` creates the image (`queued`), then sends the source in one pass as the
chunked body of `PUT /v2/images/{id}/file`: no temporary copy, at most a chunk or two in
memory, any size. While sending it hashes the bytes with the algorithm Glance uses
(`os_hash_algo`, learnt from Glance's own images; sha512 by default) and counts them; once
Glance says `active` it compares `os_hash_value` and `size` with ours. A mismatch, a timeout,
a failed image or any error deletes the image before raising, so a failed call leaves nothing.
The wait for `active` starts when the upload ends: the upload itself is bounded by the
source's own timeouts and `request_timeout` per read.

Image names are `name_prefix + name`; `images()` lists those names. Properties are strings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, NoReturn

import openstack.config
import openstack.config.loader
import openstack.exceptions
from keystoneauth1 import adapter, session
from keystoneauth1 import exceptions as ksa

from registrar.config import OpenStackConfig
from registrar.errors import CloudError, ConfigError, ImageFailed, RegistrationTimeout

log = logging.getLogger(__name__)

# What each part of an image set becomes in Glance: (disk_format, container_format).
PART_FORMATS: dict[str, tuple[str, str]] = {
    "QCOW2": ("qcow2", "bare"),  # uploaded exactly as downloaded
    "FILESYSTEM": ("ami", "ami"),  # + kernel_id / ramdisk_id properties when there are some
    "ZFILESYSTEM": ("ami", "ami"),  # decompressed (and untarred) on the way
    "KERNEL": ("aki", "aki"),
    "RAMDISK": ("ari", "ari"),
}
# The properties an `ami` image names its kernel and ramdisk images with.
KERNEL_ID_PROPERTY = "kernel_id"
RAMDISK_ID_PROPERTY = "ramdisk_id"

# One HTTP chunk of an upload. Glance (gunicorn's chunked reader) spends less CPU on smaller
# chunks: here 1 GiB cost it 5.4-6.3 CPU-s in 64 KiB chunks, 7.0-7.2 in 256 KiB, 10.3-11.4 in
# 1 MiB; to ids, 64 KiB was 3 % faster than 256 KiB (medians of 4, interleaved). The mount is
# still read 1 MiB at a time (blobs.MountReader buffers).
CHUNK_SIZE = 64 << 10
DEFAULT_HASH_ALGO = "sha512"  # Glance's default `hashing_algorithm`
FAILED_STATES = frozenset({"killed", "deleted", "pending_delete", "deactivated"})
_IDS_PER_LIST = 50  # ids in one "id=in:…" filter: 50 UUIDs keep the URL under 2 kB
_MAX_DETAIL = 300  # characters of a server's message kept in our one-line errors


@dataclasses.dataclass(frozen=True)
class GlanceImage:
    """One Glance image, as `images()` lists it: its own fields and its extra properties."""

    id: str
    name: str
    status: str
    properties: dict[str, str]
    size: int | None = None
    disk_format: str | None = None


# The fields of Glance's image schema; every other key of an image is a user property.
_IMAGE_FIELDS = frozenset(
    "id name status visibility protected os_hidden checksum os_hash_algo os_hash_value owner "
    "size virtual_size min_ram min_disk container_format disk_format created_at updated_at "
    "tags direct_url locations self file schema stores".split()
)


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"


def _glance_detail(exc: ksa.HttpError) -> str:
    """Glance's own words. Its errors are webob pages: a title, a stock sentence, then, after
    `<br /><br />`, the reason (for example "Image disk_format qcow2 does not match stream data
    raw"); keep the last paragraph that has text, without the repeated title."""
    text = exc.response.text if exc.response is not None else ""
    text = re.sub(r"<title>.*?</title>|<h1>.*?</h1>", " ", text or "", flags=re.S)
    paragraphs = [_one_line(re.sub(r"<[^>]+>", " ", part)) for part in text.split("<br />")]
    paragraphs = [p for p in paragraphs if p]
    return paragraphs[-1] if paragraphs else _one_line(exc.details or exc.message or "")


def _raise(step: str, exc: Exception, where: str) -> NoReturn:
    """Translate a keystoneauth1 failure into CloudError(step, one line)."""
    if isinstance(exc, ksa.Unauthorized):
        message = f"credentials refused by Keystone (HTTP 401) at {where}"
        if step != "authenticate":
            message = f"token refused (HTTP 401) by {where}"
    elif isinstance(exc, ksa.Forbidden):
        message = f"forbidden (HTTP 403) by {where}: {_glance_detail(exc)}"
    elif isinstance(exc, ksa.RequestEntityTooLarge):
        message = f"quota or size limit exceeded (HTTP 413) at {where}: {_glance_detail(exc)}"
    elif isinstance(exc, ksa.HttpError):
        message = f"HTTP {exc.http_status} from {where}: {_glance_detail(exc)}"
    elif isinstance(exc, ksa.ConnectTimeout):
        message = f"timed out connecting to {where}"
    elif isinstance(exc, ksa.SSLError):
        message = f"TLS error talking to {where}: {_one_line(str(exc))}"
    elif isinstance(exc, ksa.ConnectFailure):
        message = f"cannot connect to {where}"
    elif isinstance(exc, ksa.EndpointNotFound):
        message = f"no image service (Glance) in the catalog of {where}"
    else:
        message = f"{_one_line(str(exc)) or type(exc).__name__} ({where})"
    code = str(exc.http_status) if isinstance(exc, ksa.HttpError) else None
    raise CloudError(step, message, code=code) from exc


# Settings of ours that openstacksdk takes beside `auth`, and its names for them.
_TOP_LEVEL_KEYS = {
    "auth_type": "auth_type",
    "region": "region_name",
    "interface": "interface",
    "cacert": "cacert",
}


def _clouds_yaml_files(cfg: OpenStackConfig) -> list[str]:
    """`clouds_yaml` if set, else openstacksdk's places: $OS_CLIENT_CONFIG_FILE, ./clouds.yaml,
    ~/.config/openstack/, /etc/openstack/ (load_envvars=False would skip the variable)."""
    if cfg.clouds_yaml is not None:
        return [str(cfg.clouds_yaml)]
    override = os.environ.get("OS_CLIENT_CONFIG_FILE")
    return ([override] if override else []) + list(openstack.config.loader.CONFIG_FILES)


def _versioned(endpoint: str) -> str:
    """Glance's v2 root: catalogs list the unversioned endpoint (sometimes a versioned one)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if re.search(r"/v2(\.\d+)?$", endpoint) else f"{endpoint}/v2"


class _Upload:
    """The request body: the source in chunks, hashed and counted as they go."""

    def __init__(
        self, source: BinaryIO, hash_algo: str, progress: Callable[[int], None] | None
    ) -> None:
        self.source = source
        self.hash = hashlib.new(hash_algo)
        self.size = 0
        self.progress = progress

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.source.read(CHUNK_SIZE):
            self.hash.update(chunk)
            self.size += len(chunk)
            if self.progress is not None:
                self.progress(len(chunk))
            yield chunk


class OpenStackCloud:
    """Glance v2 through a keystoneauth1 session; see the module docstring for the contract.

    Thread-safe for concurrent calls: the session is shared, each call keeps its own state.
    """

    def __init__(
        self,
        sess: session.Session,
        *,
        glance_url: str | None = None,
        region: str | None = None,
        interface: str | None = None,
        visibility: str = "private",
        name_prefix: str = "imageproxy/",
        poll_interval: float = 2.0,
        auth_where: str = "Keystone",
    ) -> None:
        self.visibility = visibility
        self.name_prefix = name_prefix
        self.poll_interval = poll_interval
        self._auth_where = auth_where
        self._api = adapter.Adapter(
            session=sess,
            service_type="image",
            interface=interface or "public",
            region_name=region,
            endpoint_override=glance_url,
        )
        self._base: str | None = None
        self._hash_algo: str | None = None

    @classmethod
    def from_config(cls, cfg: OpenStackConfig) -> OpenStackCloud:
        """Build the session from `cfg` (openstacksdk merges clouds.yaml, then our keys)."""
        kwargs: dict[str, Any] = {}
        auth = {k: v for k, v in cfg.auth.items() if k not in _TOP_LEVEL_KEYS}
        if auth:
            kwargs["auth"] = auth  # merged over a clouds.yaml entry's, ours winning
        for key, name in _TOP_LEVEL_KEYS.items():
            if key in cfg.auth:
                kwargs[name] = cfg.auth[key]
        if "application_credential_id" in auth and "auth_type" not in kwargs:
            kwargs["auth_type"] = "v3applicationcredential"
        if cfg.glance_url:
            kwargs["image_endpoint_override"] = cfg.glance_url
        if kwargs.get("auth_type") == "none":
            # keystoneauth1's `none` plugin needs an endpoint; it is Glance's here.
            kwargs["auth"] = {"endpoint": cfg.glance_url}
        try:
            with warnings.catch_warnings():
                # openstacksdk 4.22 warns about InfluxDB on every config, configured or not.
                warnings.filterwarnings("ignore", message="Support for InfluxDB")
                loader = openstack.config.loader.OpenStackConfig(
                    config_files=_clouds_yaml_files(cfg),
                    load_yaml_config=cfg.os_cloud is not None,
                    load_envvars=False,  # the daemon's OS_* variables must not change its cloud
                )
                region_cfg = loader.get_one(
                    cloud=cfg.os_cloud, api_timeout=cfg.request_timeout, **kwargs
                )
                sess = region_cfg.get_session()
        except (openstack.exceptions.SDKException, ksa.ClientException) as exc:
            source = ", ".join(cfg.sources) or "[cloud]"
            detail = _one_line(str(exc))
            raise ConfigError(f"[cloud] OpenStack settings ({source}): {detail}") from exc
        auth_url = region_cfg.auth.get("auth_url")
        return cls(
            sess,
            glance_url=cfg.glance_url,
            region=region_cfg.get_region_name("image"),
            interface=region_cfg.get_interface("image"),
            visibility=cfg.visibility,
            name_prefix=cfg.name_prefix,
            poll_interval=cfg.poll_interval,
            auth_where=f"Keystone {auth_url}" if auth_url else "Keystone",
        )

    # --- requests ---

    def _root(self) -> str:
        """Authenticate (once per token) and find Glance; step "authenticate"."""
        if self._base is None:
            try:
                endpoint = self._api.get_endpoint()
            except ksa.ClientException as exc:
                _raise("authenticate", exc, self._auth_where)
            if not endpoint:
                raise CloudError("authenticate", f"no Glance endpoint from {self._auth_where}")
            self._base = _versioned(endpoint)
        return self._base

    def _request(self, step: str, method: str, path: str, **kwargs: Any) -> Any:
        url = self._root() + path
        try:
            return self._api.request(url, method, **kwargs)
        except ksa.ClientException as exc:
            _raise(step, exc, f"Glance {self._base}")

    def _show(self, image_id: str, step: str = "image show") -> dict[str, Any]:
        return self._request(step, "GET", f"/images/{image_id}").json()

    def _list(self, params: dict[str, str], step: str = "image list") -> Iterator[dict[str, Any]]:
        """Every image matching `params`, following Glance's pages."""
        path = "/images"
        query: dict[str, str] | None = {"limit": "200", **params}
        while path:
            page = self._request(step, "GET", path, params=query).json()
            yield from page.get("images", [])
            nxt = page.get("next")  # "/v2/images?marker=…": already holds the query
            path = nxt.removeprefix("/v2") if nxt else ""
            query = None

    def hash_algo(self, step: str = "image list") -> str:
        """The algorithm Glance hashes with, as its newest active image says (else sha512)."""
        if self._hash_algo is None:
            page = self._request(
                step,
                "GET",
                "/images",
                params={"limit": "1", "status": "active", "sort": "created_at:desc"},
            ).json()
            images = page.get("images") or [{}]
            self._hash_algo = images[0].get("os_hash_algo") or DEFAULT_HASH_ALGO
        return self._hash_algo

    # --- the contract ---

    def register_stream(
        self,
        source: BinaryIO,
        *,
        name: str,
        disk_format: str,
        container_format: str,
        properties: dict[str, str],
        timeout: float,
        progress: Callable[[int], None] | None = None,
        on_created: Callable[[], None] | None = None,
    ) -> str:
        """Create, upload, wait for `active`, verify; return the image id (see module doc).

        `on_created` is called once the image exists, before its upload: a Glance
        that takes one request at a time takes this upload before any request sent after it.
        """
        algo = self.hash_algo("image create")
        body = {
            "name": self.name_prefix + name,
            "disk_format": disk_format,
            "container_format": container_format,
            "visibility": self.visibility,
            **{k: str(v) for k, v in properties.items()},
        }
        image_id = self._request("image create", "POST", "/images", json=body).json()["id"]
        log.info("created Glance image %s (%s, %s)", image_id, body["name"], disk_format)
        try:
            if on_created is not None:
                on_created()
            upload = _Upload(source, algo, progress)
            self._request(
                "image upload",
                "PUT",
                f"/images/{image_id}/file",
                data=iter(upload),
                headers={"Content-Type": "application/octet-stream"},
                connect_retries=0,  # a generator cannot be sent twice
            )
            image = self._wait_active(image_id, timeout)
            self._verify(image, upload, algo)
        except BaseException:
            self._delete_after_failure(image_id)
            raise
        log.info("Glance image %s is active (%d bytes, %s verified)", image_id, upload.size, algo)
        return image_id

    def _wait_active(self, image_id: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            image = self._show(image_id, "waiting for active")
            status = image.get("status")
            if status == "active":
                return image
            if status in FAILED_STATES:
                raise ImageFailed("waiting for active", f"Glance image {image_id} is {status}")
            if time.monotonic() >= deadline:
                raise RegistrationTimeout(
                    "waiting for active",
                    f"Glance image {image_id} still {status} after {timeout:g} s",
                )
            time.sleep(min(self.poll_interval, max(0.0, deadline - time.monotonic())))

    def _verify(self, image: dict[str, Any], upload: _Upload, algo: str) -> None:
        theirs = image.get("os_hash_algo")
        if theirs and theirs != algo:
            self._hash_algo = theirs  # the next registration hashes as Glance does now
            raise CloudError(
                "verify",
                f"Glance hashed image {image['id']} with {theirs}, we with {algo}: cannot verify",
            )
        if image.get("size") != upload.size:
            raise CloudError(
                "verify",
                f"Glance stored {image.get('size')} bytes for image {image['id']}, "
                f"we sent {upload.size}",
            )
        ours = upload.hash.hexdigest()
        if image.get("os_hash_value") != ours:
            raise CloudError(
                "verify",
                f"Glance's {algo} of image {image['id']} is {image.get('os_hash_value')}, "
                f"the bytes sent have {ours}",
            )

    def _delete_after_failure(self, image_id: str) -> None:
        try:
            self.delete(image_id)
        except CloudError as exc:
            log.warning("could not delete failed image %s: %s", image_id, exc)
        else:
            log.info("deleted failed Glance image %s", image_id)

    def states(self, ids: Iterable[str]) -> dict[str, str]:
        """Status of each image that exists, by id; one list call per 50 ids ("in:" filter)."""
        wanted = sorted(set(ids))
        found: dict[str, str] = {}
        for start in range(0, len(wanted), _IDS_PER_LIST):
            batch = wanted[start : start + _IDS_PER_LIST]
            for img in self._list({"id": "in:" + ",".join(batch)}):
                if img["id"] in batch:
                    found[img["id"]] = img["status"]
        return found

    def delete(self, image_id: str) -> None:
        """Delete an image; one already gone is success."""
        try:
            self._request("image delete", "DELETE", f"/images/{image_id}")
        except CloudError as exc:
            if exc.code != "404":
                raise

    def find(self, properties: dict[str, str]) -> list[str]:
        """Ids of the images whose properties have these values (any status)."""
        return [img["id"] for img in self._list({k: str(v) for k, v in properties.items()})]

    def images(self, prefix: str | None = None) -> list[GlanceImage]:
        """Images named `prefix…` (default: our name prefix), oldest first."""
        prefix = self.name_prefix if prefix is None else prefix
        found = [
            GlanceImage(
                id=img["id"],
                name=img.get("name") or "",
                status=img.get("status", ""),
                properties={
                    k: v for k, v in img.items() if k not in _IMAGE_FIELDS and isinstance(v, str)
                },
                size=img.get("size"),
                disk_format=img.get("disk_format"),
            )
            for img in self._list({"sort": "created_at:asc"})
            if (img.get("name") or "").startswith(prefix)
        ]
        return found
