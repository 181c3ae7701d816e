"""The soak's site: image sets on a fault-injecting origin, moto behind the recording proxy, a
real imgstore mount and a real `registrar serve`, all built from the tests' own support code.

    with open_site(settings) as site:
        site.images          # one SoakImage per image set, as published
        site.service()       # a zeep proxy for the calling thread (ORCA's WSDL)
        site.pids()          # {"registrar": pid, "imgstore": pid}

Each image set is a gzipped ext4 filesystem (`tests/support/images.make_ext4`, distinct seeds),
its own small kernel and ramdisk, and a metadata file, served from memory by
`tests/support/faulty.FaultyOrigin`. The images are built once per size and seed and kept
under `WORKDIR/images`; everything else lives in a scratch directory removed on exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.registrar.e2e_stack import IMGSTORE, Registrar, Stack, write_stack_config  # noqa: E402
from tests.support.cloud import (  # noqa: E402
    CloudServer,
    Credentials,
    MotoProcess,
    RecordingProxy,
    StandInCloud,
    make_key_and_cert,
)
from tests.support.faulty import Faults, FaultyOrigin  # noqa: E402
from tests.support.fusemount import Mounted, start_mount  # noqa: E402
from tests.support.images import make_blob, make_ext4, metadata_xml, sha1_file  # noqa: E402

KERNEL_SIZE = 512 << 10
RAMDISK_SIZE = 256 << 10


@dataclasses.dataclass(frozen=True)
class SiteSettings:
    """What the site is made of and how badly its origin and cloud behave."""

    workdir: Path
    images: int
    fs_mib: int
    cached_images: int  # the cache budget holds this many image sets
    origin_fault_rate: float
    cloud_fault_rate: float
    seed: int
    read_deadline: float
    stall: float  # seconds of the long stalls in the origin's fault mix


@dataclasses.dataclass(frozen=True)
class SoakImage:
    """One published image set and the SHA-1s its registration must reproduce."""

    index: int
    metadata_url: str
    metadata_sha1: str
    fs_sha1: str  # of the raw ext4: what the machine bundle unbundles to
    kernel_sha1: str
    ramdisk_sha1: str
    cached_bytes: int  # what the store holds once the set is cached


@dataclasses.dataclass
class Site:
    """The running site."""

    settings: SiteSettings
    images: list[SoakImage]
    origin: FaultyOrigin
    cloud: StandInCloud
    stack: Stack
    registrar: Registrar
    cache_size: int
    call_timeout: float = 240.0
    _local: threading.local = dataclasses.field(default_factory=threading.local)

    def service(self) -> Any:
        """This thread's zeep service proxy (a requests session is not shared across threads)."""
        if not hasattr(self._local, "service"):
            self._local.service = self.stack.zeep(self.registrar, timeout=self.call_timeout)
        return self._local.service

    def pids(self) -> dict[str, int]:
        return {"registrar": self.registrar.proc.pid, "imgstore": self.stack.mount.proc.pid}


def origin_mix(stall: float) -> tuple[Faults, ...]:
    """Resets (headers only, early and late in the body), 503s, and stalls short and long.

    A long stall outlasts the store's HTTP read timeout (its read deadline), so the store must
    give up on that connection and retry on a new one, or fail the read with a clear error.
    """
    return (
        Faults(reset_after=0),
        Faults(reset_after=64 << 10),
        Faults(reset_after=3 << 20),
        Faults(status=503),
        Faults(status=503, retry_after="1"),
        Faults(stall_headers=1.0),
        Faults(stall=2.0, stall_at=1 << 20),
        Faults(stall=stall, stall_at=256 << 10),
    )


def _build_files(directory: Path, fs_mib: int, seed: int) -> dict[str, Path]:
    """The image set's files, built once per size and seed."""
    directory.mkdir(parents=True, exist_ok=True)
    fs = directory / f"fs-{fs_mib}m-{seed}.ext4"
    if not fs.exists():
        make_ext4(fs.with_suffix(".building"), fs_mib, seed=seed).rename(fs)
    fs_gz = fs.with_name(fs.name + ".gz")
    if not fs_gz.exists():
        building = fs_gz.with_suffix(".building")
        # Level 1: build time matters here, and the ratio does not.
        with (
            open(fs, "rb") as src,
            gzip.GzipFile(building, "wb", compresslevel=1, mtime=0) as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 20)
        building.rename(fs_gz)
    kernel = directory / f"kernel-{seed}"
    if not kernel.exists():
        make_blob(kernel.with_suffix(".building"), KERNEL_SIZE, seed, "kernel").rename(kernel)
    ramdisk = directory / f"ramdisk-{seed}"
    if not ramdisk.exists():
        make_blob(ramdisk.with_suffix(".building"), RAMDISK_SIZE, seed, "ramdisk").rename(ramdisk)
    return {"fs": fs, "fs_gz": fs_gz, "kernel": kernel, "ramdisk": ramdisk}


def publish_images(origin: FaultyOrigin, settings: SiteSettings) -> list[SoakImage]:
    """Build (or reuse) each image set and serve it from `origin`, under names of its own."""
    images = []
    for index in range(settings.images):
        files = _build_files(settings.workdir / "images", settings.fs_mib, settings.seed + index)
        tag = f"soak{index:02d}"
        entries = []
        cached = 0
        for image_type, name, key in (
            ("FILESYSTEM", f"{tag}-fs.img.gz", "fs_gz"),
            ("KERNEL", f"{tag}-vmlinuz", "kernel"),
            ("RAMDISK", f"{tag}-initrd.img", "ramdisk"),
        ):
            data = files[key].read_bytes()
            url = origin.add(name, data)
            entries.append((image_type, hashlib.sha1(data).hexdigest(), url))
            cached += len(data)
        xml = metadata_xml(entries)
        url = origin.add(f"{tag}-metadata.xml", xml)
        images.append(
            SoakImage(
                index=index,
                metadata_url=url,
                metadata_sha1=hashlib.sha1(xml).hexdigest(),
                fs_sha1=sha1_file(files["fs"]),
                kernel_sha1=entries[1][1],
                ramdisk_sha1=entries[2][1],
                cached_bytes=cached + len(xml),
            )
        )
    return images


@contextlib.contextmanager
def _cloud(scratch: Path) -> Iterator[StandInCloud]:
    keys = scratch / "keys"
    keys.mkdir()
    cloud_key, cloud_cert = make_key_and_cert(keys, "cloud", "soak cloud")
    user_key, user_cert = make_key_and_cert(keys, "user", "soak user")
    moto = MotoProcess(scratch / "moto.log")
    moto.start()
    proxy = RecordingProxy(moto.port)
    proxy.start()
    try:
        server = CloudServer(
            moto, proxy, Credentials(cloud_cert, cloud_key, user_cert, user_key), scratch
        )
        yield StandInCloud(server, "imageproxy-soak")
    finally:
        proxy.stop()
        moto.stop()


@contextlib.contextmanager
def open_site(settings: SiteSettings, keep: bool = False) -> Iterator[Site]:
    """Build and start the whole site; stop it and remove its scratch data on exit."""
    settings.workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="soak-", dir=settings.workdir))
    with contextlib.ExitStack() as stack:
        if not keep:
            stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        origin = stack.enter_context(FaultyOrigin())
        images = publish_images(origin, settings)
        # Blocks of 4 KiB and the catalog's own slack: a little over the sets themselves.
        per_image = max(image.cached_bytes for image in images) + (1 << 20)
        cache_size = settings.cached_images * per_image
        cloud = stack.enter_context(_cloud(scratch))
        site_dir = scratch / "site"
        site_dir.mkdir()
        cache_dir, mountpoint, state_dir = site_dir / "cache", site_dir / "mnt", site_dir / "state"
        config = write_stack_config(
            site_dir / "imageproxy.toml",
            cloud,
            cache_dir,
            mountpoint,
            state_dir,
            {"cache_size": str(cache_size), "read_deadline": settings.read_deadline},
        )
        mount: Mounted = start_mount(
            [*IMGSTORE, "mount", "--foreground", "--config", str(config), str(mountpoint)],
            mountpoint,
            logdir=site_dir,
            timeout=60,
        )
        stack.callback(mount.cleanup)
        site_stack = Stack(site_dir, config, cache_dir, mountpoint, state_dir, cloud, mount)
        stack.callback(lambda: [r.stop() for r in site_stack.registrars])
        registrar = site_stack.start()
        # Faults only once everything is up: the soak is about the calls.
        origin.random_faults(settings.origin_fault_rate, settings.seed, origin_mix(settings.stall))
        cloud.inject_faults(settings.cloud_fault_rate, settings.seed)
        yield Site(settings, images, origin, cloud, site_stack, registrar, cache_size)
