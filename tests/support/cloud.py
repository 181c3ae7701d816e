"""The stand-in cloud: moto in server mode (real S3 and EC2 over HTTP) plus throw-away keys.

Fixtures:

- `cloud_server` (session): one `python -m moto.server` process on a free 127.0.0.1 port, a
  recording S3+EC2 proxy in front of it (see below), and RSA keys with self-signed certificates.
- `cloud` (function): a `StandInCloud` with moto reset, the proxy's record cleared and a fresh
  bucket name. Use its `write_config()` / `write_eucarc()` for the registrar's config.

moto checks nothing about bundles, ignores canned ACLs, and its RegisterImage accepts anything,
so the endpoints the registrar is given (`cloud.s3_url`, `cloud.ec2_url`) are a small recording
proxy of ours in front of moto, at Eucalyptus' own paths (`/services/objectstorage`,
`/services/compute`; the 3.x `/services/Walrus` and `/services/Eucalyptus` work too):

- `cloud.ec2_calls`: every EC2 request as a dict of its query parameters, in arrival order
  (to prove what was registered with which KernelId/RamdiskId, and in which order);
- `cloud.s3_requests`: every S3 request as (method, path as it arrived, x-amz-acl header), and
  `cloud.s3_auth_schemes` the scheme of each one's Authorization header;
- `cloud.refuse("RegisterImage", code, message)`: answer that action with an EC2 error, the
  way Eucalyptus refuses an invalid manifest or parameter;
- `cloud.lose_answer("RegisterImage")`: moto does it, the registrar gets a 503 (a lost answer,
  which botocore retries); `cloud.hold_answer(action)` holds moto's answer until
  `cloud.answer_normally()` (to kill the registrar in between);
- `cloud.hold_pending = True`: DescribeImages reports `pending` instead of `available`, the
  way a slow or stuck Eucalyptus does; `cloud.report_image_state("failed")` any other state;
- `cloud.inject_faults(rate, seed)`: from then on, a seeded random share `rate` of EC2 and S3
  requests is answered, without reaching moto, 500 `InternalError` or 503 `SlowDown` (half
  each), as a busy cloud does; `cloud.injected_faults` lists them (what, status, code);
- `cloud.expect_parallel_parts(n)`: part uploads wait until n are in flight at once (then
  `cloud.parallel_parts_result` is "tripped"), or give up after a timeout ("broken").

moto's RegisterImage looks at nothing, so the proxy checks every one that it forwards the way
Eucalyptus would, and records each breach in `cloud.violations`; the `cloud` fixture fails the
test at teardown if there is any (a test of the checks themselves takes them with
`cloud.take_violations()`). A RegisterImage must name, in `ImageLocation`, a `*.manifest.xml`
that is in the bucket at that moment (read from moto, or from the S3 given to
`cloud.read_manifests_from(client)`); its `Architecture` must be the manifest's and one of
ARCHITECTURES; `KernelId`/`RamdiskId` only on a machine image, each an id this cloud returned
for a kernel (ramdisk) manifest in this test, and the one the manifest names if it names one;
its `Name` 3–128 characters of `[A-Za-z0-9()./_-]` and not the name of an image still
registered (except one whose answer the proxy itself lost: the registrar could not know of it).

`cloud.s3` and `cloud.ec2` are boto3 clients for the tests' own checks, straight to moto
(`cloud.endpoint_url`). Keys: `cloud.cloud_cert`/`cloud.cloud_key` stand for the
Eucalyptus cloud certificate and its private key (which only the cloud has; tests use it to
decrypt bundles), `cloud.user_cert`/`cloud.user_key` for the user's credentials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import http.client
import http.server
import itertools
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from lxml import etree

ACCOUNT_ID = "123456789012"  # moto's default account
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"
# The endpoint paths of Eucalyptus 4.x (objectstorage, compute) and 3.x (Walrus, Eucalyptus).
S3_PATH, EC2_PATH = "/services/objectstorage", "/services/compute"
SERVICE_PATHS = (S3_PATH, EC2_PATH, "/services/Walrus", "/services/Eucalyptus")
# What Eucalyptus (and EC2) accept as an image's architecture.
ARCHITECTURES = ("i386", "x86_64", "arm64", "armhf")
IMAGE_NAME = re.compile(r"[A-Za-z0-9()./_-]{3,128}")
_IMAGE_ID = re.compile(rb"<imageId>([^<]+)</imageId>")


@dataclasses.dataclass(frozen=True)
class Credentials:
    """PEM files of the stand-in cloud's and user's keys and certificates."""

    cloud_cert: Path
    cloud_key: Path
    user_cert: Path
    user_key: Path


def make_key_and_cert(directory: Path, stem: str, common_name: str) -> tuple[Path, Path]:
    """Write `<stem>-pk.pem` (RSA 2048, unencrypted PKCS#8) and `<stem>-cert.pem` (self-signed)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    key_path = directory / f"{stem}-pk.pem"
    cert_path = directory / f"{stem}-cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoProcess:
    """`python -m moto.server` on a free loopback port, started and waited for with a deadline."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, deadline_s: float = 60.0) -> None:
        for _attempt in range(3):  # another process may grab the port between probe and bind
            self.port = _free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONWARNINGS": "ignore"},
                )
            if self._wait_ready(deadline_s):
                return
            self.stop()
        raise RuntimeError(f"moto server did not start; see {self.log_path}")

    def _wait_ready(self, deadline_s: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=2):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class RecordingProxy:
    """A recording, fault-injecting HTTP proxy for S3 and EC2 requests, in front of moto."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.calls: list[dict[str, str]] = []
        self.s3_requests: list[tuple[str, str, str | None]] = []
        self.s3_auth_schemes: list[str] = []
        self.refusals: dict[str, tuple[int, str, str]] = {}
        self.lost_answers: set[str] = set()  # done by moto, answered 503 to the client
        self.held_answers: dict[str, threading.Event] = {}  # done by moto, answered once set
        self.image_state: str | None = None  # what DescribeImages says instead of "available"
        self.part_barrier: threading.Barrier | None = None
        self.part_barrier_timeout = 30.0
        self.part_barrier_result: str | None = None  # "tripped" or "broken"
        # The RegisterImage checks (see the module docstring); all guarded by _lock.
        self.violations: list[str] = []
        self.image_types: dict[str, str] = {}  # image id -> manifest type, as moto answered
        self.live_names: dict[str, set[str]] = {}  # name -> ids of images still registered
        self.lost_names: set[str] = set()  # registered, but the proxy lost the answer
        self.read_object: Callable[[str, str], bytes | None] = self._read_from_moto
        self.fault_rate = 0.0  # inject_faults: the share of requests answered 500 or 503
        self.fault_rng = random.Random(0)
        self.injected: list[tuple[str, int, str]] = []  # (action or "S3 <method>", status, code)
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_POST(self) -> None:  # noqa: N802
                proxy._handle(self)

            def do_GET(self) -> None:  # noqa: N802
                proxy._handle(self)

            def do_PUT(self) -> None:  # noqa: N802
                proxy._handle(self)

            def do_HEAD(self) -> None:  # noqa: N802
                proxy._handle(self)

            def do_DELETE(self) -> None:  # noqa: N802
                proxy._handle(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def clear(self) -> None:
        with self._lock:
            self.calls.clear()
            self.s3_requests.clear()
            self.s3_auth_schemes.clear()
            self.refusals.clear()
            self.lost_answers.clear()
            for event in self.held_answers.values():
                event.set()
            self.held_answers.clear()
            self.image_state = None
            self.part_barrier = None
            self.part_barrier_result = None
            self.violations.clear()
            self.image_types.clear()
            self.live_names.clear()
            self.lost_names.clear()
            self.read_object = self._read_from_moto
            self.fault_rate = 0.0
            self.injected.clear()

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        # Eucalyptus serves under /services/<name>; moto at the root. Strip what we serve
        # (the record keeps the path as it arrived).
        arrived = urllib.parse.urlsplit(handler.path).path
        for prefix in SERVICE_PATHS:
            rest = handler.path[len(prefix) :]
            if handler.path.startswith(prefix) and rest[:1] in ("", "/", "?"):
                handler.path = rest if rest.startswith("/") else "/" + rest
                break
        query = urllib.parse.urlsplit(handler.path).query
        params = dict(urllib.parse.parse_qsl(query))
        form = handler.headers.get("Content-Type", "").startswith("application/x-www-form")
        if form:
            params.update(urllib.parse.parse_qsl(body.decode("utf-8", "replace")))
        action = params.get("Action", "") if form else ""
        with self._lock:
            if action:
                self.calls.append(params)
            else:
                self.s3_requests.append(
                    (handler.command, arrived, handler.headers.get("x-amz-acl"))
                )
                auth = handler.headers.get("Authorization", "")
                self.s3_auth_schemes.append(auth.split(" ", 1)[0])
            refusal = self.refusals.get(action) if action else None
            lost = action in self.lost_answers
            held = self.held_answers.get(action) if action else None
            state = self.image_state
            fault = None
            if refusal is None and self.fault_rate and self.fault_rng.random() < self.fault_rate:
                fault = self.fault_rng.choice(_INJECTED)
                self.injected.append((action or f"S3 {handler.command}", *fault))
        if refusal is not None:
            status, code, message = refusal
            self._reply(handler, status, {"Content-Type": "text/xml"}, _ec2_error(code, message))
            return
        if fault is not None:
            status, code = fault
            error = _ec2_error if action else _s3_error
            self._reply(
                handler,
                status,
                {"Content-Type": "text/xml"},
                error(code, "injected by the stand-in cloud"),
                head=handler.command == "HEAD",
            )
            return
        if handler.command == "PUT" and ".part." in handler.path:
            self._wait_at_part_barrier()
        image_type = self._check_register_image(params) if action == "RegisterImage" else None
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() != "connection"}
            if action and "Authorization" not in handler.headers:
                # A SigV2 query request (Eucalyptus < 4.4 style) carries its signature in the
                # parameters; moto server routes only by a SigV4 credential scope and would hand
                # it to S3. Name EC2 in a scope moto reads (it checks no signature).
                headers["Authorization"] = (
                    f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/20260101/{REGION}/ec2/aws4_request,"
                    " SignedHeaders=host, Signature=0"
                )
            conn.request(handler.command, handler.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            out_headers = {
                k: v
                for k, v in response.getheaders()
                if k.lower() not in ("transfer-encoding", "connection")
                and (k.lower() != "content-length" or handler.command == "HEAD")
            }
            if held is not None:
                held.wait(timeout=120)
            if response.status == 200:
                self._note_success(action, params, image_type, data, lost=lost)
            if lost:
                data = _ec2_error("ServiceUnavailable", "answer lost by the stand-in")
                with contextlib.suppress(OSError):
                    self._reply(handler, 503, {"Content-Type": "text/xml"}, data)
                return
            if state and action == "DescribeImages":
                data = data.replace(
                    b"<imageState>available</imageState>",
                    f"<imageState>{state}</imageState>".encode(),
                )
            # The client may be gone (a registrar killed while its answer was held).
            with contextlib.suppress(OSError):
                self._reply(
                    handler, response.status, out_headers, data, head=handler.command == "HEAD"
                )
        finally:
            conn.close()

    def _read_from_moto(self, bucket: str, key: str) -> bytes | None:
        """An object straight from moto's S3, or None."""
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
        try:
            # moto routes by the credential scope; it checks no signature.
            auth = (
                f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/20260101/{REGION}/s3/aws4_request,"
                " SignedHeaders=host, Signature=0"
            )
            conn.request(
                "GET", f"/{bucket}/{urllib.parse.quote(key)}", headers={"Authorization": auth}
            )
            response = conn.getresponse()
            data = response.read()
            return data if response.status == 200 else None
        finally:
            conn.close()

    def _check_register_image(self, params: dict[str, str]) -> str | None:
        """Record what Eucalyptus would refuse in this RegisterImage; return the manifest type."""
        problems: list[str] = []
        name = params.get("Name", "")
        location = params.get("ImageLocation", "")
        bucket, _, key = location.partition("/")
        manifest = self.read_object(bucket, key) if key.endswith(".manifest.xml") else None
        image_type = arch = None
        listed: dict[str, str | None] = {}  # the kernel and ramdisk the bundle was made for
        if manifest is None:
            problems.append(f"ImageLocation {location!r} names no uploaded manifest")
        else:
            try:
                root = etree.fromstring(manifest)
                image_type = root.findtext("image/type")
                arch = root.findtext("machine_configuration/architecture")
                for param, field in (("KernelId", "kernel_id"), ("RamdiskId", "ramdisk_id")):
                    listed[param] = root.findtext(f"machine_configuration/{field}")
            except etree.XMLSyntaxError as exc:
                problems.append(f"the manifest at {location!r} is not XML: {exc}")
        given_arch = params.get("Architecture")
        if given_arch not in ARCHITECTURES:
            problems.append(f"Architecture {given_arch!r} is not one of {ARCHITECTURES}")
        elif manifest is not None and given_arch != arch:
            problems.append(f"Architecture {given_arch!r} differs from the manifest's {arch!r}")
        if not IMAGE_NAME.fullmatch(name):
            problems.append(f"Name {name!r} is not 3-128 characters of [A-Za-z0-9()./_-]")
        with self._lock:
            if self.live_names.get(name) and name not in self.lost_names:
                taken_by = ", ".join(sorted(self.live_names[name]))
                problems.append(f"Name {name!r} is already {taken_by}'s")
            for param, wanted in (("KernelId", "kernel"), ("RamdiskId", "ramdisk")):
                given = params.get(param)
                if given is None:
                    continue
                if image_type != "machine":
                    problems.append(f"{param} {given} on a {image_type} image")
                elif self.image_types.get(given) != wanted:
                    problems.append(f"{param} {given} is not a {wanted} registered here")
                elif listed.get(param) and listed[param] != given:
                    # Eucalyptus would boot the parts with the id given here, not the one
                    # the bundle's manifest names: the registrar must pass the same one.
                    problems.append(f"{param} {given} differs from the manifest's {listed[param]}")
            self.violations += [f"RegisterImage {name!r}: {problem}" for problem in problems]
        return image_type

    def _note_success(
        self, action: str, params: dict[str, str], image_type: str | None, data: bytes, lost: bool
    ) -> None:
        """Keep the ids, types and names that moto's answers established."""
        with self._lock:
            if action == "RegisterImage":
                match = _IMAGE_ID.search(data)
                if match and image_type:
                    self.image_types[match.group(1).decode()] = image_type
                if match:
                    name = params.get("Name", "")
                    self.live_names.setdefault(name, set()).add(match.group(1).decode())
                if lost:
                    self.lost_names.add(params.get("Name", ""))
            elif action == "DeregisterImage":
                for ids in self.live_names.values():
                    ids.discard(params.get("ImageId", ""))

    def _wait_at_part_barrier(self) -> None:
        """Hold part uploads until `parties` of them are in flight at once (one-shot)."""
        with self._lock:
            barrier = self.part_barrier
        if barrier is None:
            return
        try:
            barrier.wait(timeout=self.part_barrier_timeout)
            result = "tripped"
        except threading.BrokenBarrierError:
            result = "broken"
        with self._lock:
            if self.part_barrier is barrier:
                self.part_barrier = None
                self.part_barrier_result = result

    @staticmethod
    def _reply(
        handler: http.server.BaseHTTPRequestHandler,
        status: int,
        headers: dict[str, str],
        body: bytes,
        *,
        head: bool = False,
    ) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        if not head:
            handler.send_header("Content-Length", str(len(body)))
        elif "content-length" not in {k.lower() for k in headers}:
            handler.send_header("Content-Length", "0")
        handler.end_headers()
        if not head:
            handler.wfile.write(body)


# What inject_faults answers: a cloud's internal error, or its request to slow down.
_INJECTED = ((500, "InternalError"), (503, "SlowDown"))


def _s3_error(code: str, message: str) -> bytes:
    """An S3 error response body."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error>'
        f"<Code>{code}</Code><Message>{message}</Message><RequestId>stand-in</RequestId></Error>"
    ).encode()


def _ec2_error(code: str, message: str) -> bytes:
    """An EC2 error response body, as Eucalyptus sends one."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
        f"<Code>{code}</Code><Message>{message}</Message></Error></Errors>"
        "<RequestID>stand-in</RequestID></Response>"
    ).encode()


@dataclasses.dataclass
class CloudServer:
    """The session's moto process, recording proxy and keys."""

    moto: MotoProcess
    proxy: RecordingProxy
    credentials: Credentials
    workdir: Path


_bucket_numbers = itertools.count(1)


class StandInCloud:
    """What a test sees: endpoints, credentials, key files, clients, config writers."""

    access_key = ACCESS_KEY
    secret_key = SECRET_KEY
    account_id = ACCOUNT_ID
    region = REGION

    def __init__(self, server: CloudServer, bucket: str) -> None:
        self._server = server
        self.bucket = bucket
        self.endpoint_url = server.moto.url
        self.s3_url = server.proxy.url + S3_PATH
        self.ec2_url = server.proxy.url + EC2_PATH
        creds = server.credentials
        self.cloud_cert = creds.cloud_cert
        self.cloud_key = creds.cloud_key
        self.user_cert = creds.user_cert
        self.user_key = creds.user_key
        session = boto3.session.Session(
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION
        )
        config = botocore.config.Config(s3={"addressing_style": "path"})
        self.s3 = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        self.ec2 = session.client("ec2", endpoint_url=self.endpoint_url)

    # --- the proxy's record and faults ---

    @property
    def ec2_calls(self) -> list[dict[str, str]]:
        with self._server.proxy._lock:
            return list(self._server.proxy.calls)

    @property
    def s3_requests(self) -> list[tuple[str, str, str | None]]:
        with self._server.proxy._lock:
            return list(self._server.proxy.s3_requests)

    @property
    def s3_auth_schemes(self) -> list[str]:
        """The Authorization scheme of each S3 request: "AWS" (SigV2) or "AWS4-HMAC-SHA256"."""
        with self._server.proxy._lock:
            return list(self._server.proxy.s3_auth_schemes)

    def calls_of(self, action: str) -> list[dict[str, str]]:
        """The recorded EC2 requests of one action, in order."""
        return [call for call in self.ec2_calls if call.get("Action") == action]

    def refuse(
        self,
        action: str,
        code: str = "InvalidParameterValue",
        message: str = "refused by the stand-in cloud",
        status: int = 400,
    ) -> None:
        """Make the EC2 endpoint answer `action` with this error from now on."""
        with self._server.proxy._lock:
            self._server.proxy.refusals[action] = (status, code, message)

    def stop_refusing(self) -> None:
        """Let the EC2 endpoint answer every action again."""
        with self._server.proxy._lock:
            self._server.proxy.refusals.clear()

    def inject_faults(self, rate: float, seed: int) -> None:
        """Answer a seeded random share `rate` of EC2 and S3 requests 500 or 503 SlowDown."""
        if not 0 <= rate <= 1:
            raise ValueError(f"rate {rate} is not within [0, 1]")
        with self._server.proxy._lock:
            self._server.proxy.fault_rate = rate
            self._server.proxy.fault_rng = random.Random(seed)

    @property
    def injected_faults(self) -> list[tuple[str, int, str]]:
        """The requests inject_faults answered: (action or "S3 <method>", status, code)."""
        with self._server.proxy._lock:
            return list(self._server.proxy.injected)

    def lose_answer(self, action: str) -> None:
        """Let moto do `action`, but answer the registrar 503, as if the reply was lost."""
        with self._server.proxy._lock:
            self._server.proxy.lost_answers.add(action)

    def hold_answer(self, action: str) -> None:
        """Let moto do `action`, but hold its answer until `answer_normally()`."""
        with self._server.proxy._lock:
            self._server.proxy.held_answers[action] = threading.Event()

    def answer_normally(self) -> None:
        """Stop losing and holding answers; the held ones go out now."""
        with self._server.proxy._lock:
            self._server.proxy.lost_answers.clear()
            for event in self._server.proxy.held_answers.values():
                event.set()
            self._server.proxy.held_answers.clear()

    @property
    def hold_pending(self) -> bool:
        return self._server.proxy.image_state == "pending"

    @hold_pending.setter
    def hold_pending(self, value: bool) -> None:
        self.report_image_state("pending" if value else None)

    def report_image_state(self, state: str | None) -> None:
        """Make DescribeImages say `state` (e.g. "failed") where moto says "available"."""
        with self._server.proxy._lock:
            self._server.proxy.image_state = state

    def expect_parallel_parts(self, parties: int, timeout: float = 30.0) -> None:
        """Hold the next part uploads until `parties` are in flight together, or `timeout`.

        Afterwards `parallel_parts_result` is "tripped" (that many were in flight at once) or
        "broken" (never that many: the uploads went on after the timeout).
        """
        proxy = self._server.proxy
        with proxy._lock:
            proxy.part_barrier = threading.Barrier(parties)
            proxy.part_barrier_timeout = timeout
            proxy.part_barrier_result = None

    @property
    def parallel_parts_result(self) -> str | None:
        with self._server.proxy._lock:
            return self._server.proxy.part_barrier_result

    @property
    def violations(self) -> list[str]:
        """What the proxy found wrong in the RegisterImage calls so far (see the docstring)."""
        with self._server.proxy._lock:
            return list(self._server.proxy.violations)

    def take_violations(self) -> list[str]:
        """The violations so far, cleared (for tests that break the rules on purpose)."""
        with self._server.proxy._lock:
            taken = list(self._server.proxy.violations)
            self._server.proxy.violations.clear()
        return taken

    def read_manifests_from(self, s3: Any) -> None:
        """Check RegisterImage's ImageLocation against this boto3 S3 client, not moto."""

        def read(bucket: str, key: str) -> bytes | None:
            try:
                return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            except s3.exceptions.NoSuchKey:
                return None
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchBucket", "404"):
                    return None
                raise

        with self._server.proxy._lock:
            self._server.proxy.read_object = read

    # --- S3 inspection ---

    def bucket_keys(self, bucket: str | None = None) -> list[str]:
        """Every key in the bucket ([] if the bucket does not exist)."""
        try:
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket or self.bucket)
            return sorted(item["Key"] for page in pages for item in page.get("Contents", []))
        except self.s3.exceptions.NoSuchBucket:
            return []

    def image_ids(self) -> list[str]:
        """Every image moto has registered (deregistered ones are gone)."""
        return sorted(i["ImageId"] for i in self.ec2.describe_images(Owners=["self"])["Images"])

    # --- config files for the registrar ---

    def cloud_settings(self, *, signed: bool = True, user_cert: bool = True) -> dict[str, Any]:
        """The `[cloud]` keys for this stand-in, as a dict."""
        settings: dict[str, Any] = {
            "ec2_url": self.ec2_url,
            "s3_url": self.s3_url,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "account_id": self.account_id,
            "region": self.region,
            "cloud_cert": str(self.cloud_cert),
            "poll_interval": 0.05,
            "register_timeout": 30,
        }
        if user_cert:
            settings["user_cert"] = str(self.user_cert)
        if signed:
            settings["user_key"] = str(self.user_key)
        return settings

    def write_config(
        self,
        path: Path,
        *,
        signed: bool = True,
        user_cert: bool = True,
        eucarc: Path | None = None,
        state_dir: Path | None = None,
        registrar: dict[str, Any] | None = None,
        store: dict[str, Any] | None = None,
        **cloud: Any,
    ) -> Path:
        """Write a TOML config with `[registrar]` (bucket, state_dir) and `[cloud]`.

        With `eucarc`, `[cloud]` names that file instead of the endpoints and credentials;
        keyword arguments add or override `[cloud]` keys (None removes one). `registrar` adds
        `[registrar]` keys (listen, allowed_networks, …); `store` writes a `[store]` section.
        """
        settings = (
            {
                "eucarc": str(eucarc),
                "region": self.region,
                "poll_interval": 0.05,
                "register_timeout": 30,
            }
            if eucarc
            else self.cloud_settings(signed=signed, user_cert=user_cert)
        )
        settings.update(cloud)
        registrar_settings = {
            "bucket": self.bucket,
            "state_dir": str(state_dir or path.parent / "state"),
            **(registrar or {}),
        }
        sections = {"registrar": registrar_settings, "cloud": settings}
        if store is not None:
            sections = {"store": store, **sections}
        lines: list[str] = []
        for name, values in sections.items():
            lines.append(f"[{name}]")
            lines += [
                f"{key} = {_toml(value)}" for key, value in values.items() if value is not None
            ]
            lines.append("")
        path.write_text("\n".join(lines))
        return path

    def write_eucarc(self, directory: Path, *, signed: bool = True) -> Path:
        """Write a eucarc in Eucalyptus' own style (EUCA_KEY_DIR, exports, quoted values).

        The key files are copied beside it, as `euca-get-credentials` unpacks them.
        """
        directory.mkdir(parents=True, exist_ok=True)
        for source, name in (
            (self.cloud_cert, "cloud-cert.pem"),
            (self.user_cert, "euca2-admin-cert.pem"),
            (self.user_key, "euca2-admin-pk.pem"),
        ):
            (directory / name).write_bytes(source.read_bytes())
        lines = [
            "EUCA_KEY_DIR=$(cd $(dirname ${BASH_SOURCE:-$0}); pwd -P)",
            f"export S3_URL={self.s3_url}",
            f"export EC2_URL={self.ec2_url}",
            "export EUARE_URL=http://127.0.0.1:1/services/Euare",
            "export EC2_CERT=${EUCA_KEY_DIR}/euca2-admin-cert.pem",
            "export EUCALYPTUS_CERT=${EUCA_KEY_DIR}/cloud-cert.pem",
            f"export EC2_ACCOUNT_NUMBER='{self.account_id}'",
            f"export EC2_ACCESS_KEY='{self.access_key}'",
            f"export EC2_SECRET_KEY='{self.secret_key}'",
            f"export EC2_USER_ID='{self.account_id}'",
            'alias ec2-bundle-image="ec2-bundle-image --cert ${EC2_CERT}"',
        ]
        if signed:
            lines.insert(4, "export EC2_PRIVATE_KEY=${EUCA_KEY_DIR}/euca2-admin-pk.pem")
        path = directory / "eucarc"
        path.write_text("\n".join(lines) + "\n")
        return path


def _toml(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    return '"' + re.sub(r'(["\\])', r"\\\1", text) + '"'


@pytest.fixture(scope="session")
def cloud_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudServer]:
    """One moto server, recording proxy and key set for the whole session."""
    workdir = tmp_path_factory.mktemp("cloud")
    cloud_key, cloud_cert = make_key_and_cert(workdir, "cloud", "stand-in Eucalyptus cloud")
    user_key, user_cert = make_key_and_cert(workdir, "user", "stand-in user")
    moto = MotoProcess(workdir / "moto.log")
    moto.start()
    proxy = RecordingProxy(moto.port)
    proxy.start()
    try:
        yield CloudServer(
            moto, proxy, Credentials(cloud_cert, cloud_key, user_cert, user_key), workdir
        )
    finally:
        proxy.stop()
        moto.stop()


@pytest.fixture
def cloud(cloud_server: CloudServer) -> Iterator[StandInCloud]:
    """A clean stand-in cloud: moto reset, proxy record cleared, a bucket name of its own.

    At teardown, any RegisterImage that broke Eucalyptus' rules fails the test.
    """
    cloud_server.moto.reset()
    cloud_server.proxy.clear()
    stand_in = StandInCloud(cloud_server, f"imageproxy-test-{os.getpid()}-{next(_bucket_numbers)}")
    yield stand_in
    violations = stand_in.take_violations()
    if violations:
        pytest.fail("RegisterImage calls Eucalyptus would refuse:\n" + "\n".join(violations))
