"""`registrar publish`: from image files to a metadata file and the lines of an ORCA request.

    result = publish(base_url, image=Path("centos7.tgz"), kernel=…, ramdisk=…, qcow2=None,
                     name=None, out_dir=Path("."), progress=callback)
    result.metadata_url, result.metadata_sha1, ndl_owl(result)

Each file is read once: its SHA-1, and its type from its content the way the registrar reads it
(registrar/imagefile.py). The metadata file is written in the original ImageProxy's format, each
URL being `BASE_URL/<file name>`, then parsed back with the service's own parser
(registrar.metadata.parse), so what is written is what every site accepts. It is written to a
temporary name and renamed: an existing NAME.xml is replaced whole or not at all.

`make_tarball` makes a ZFILESYSTEM the way the original's `imgcapture.sh` did (`tar -Sczf
NAME.tgz filesystem`): GNU tar writes one sparse member named `filesystem` (Python's tarfile
cannot write sparse members), and ISA-L gzips its output, several times faster than gzip.

Nothing here talks to a network, a cloud or a mount.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote
from xml.sax.saxutils import escape, quoteattr

from isal import igzip
from lxml import etree

from registrar import imagefile
from registrar.errors import InputError, PublishError, PublishUsage
from registrar.imagefile import QCOW2, Examined
from registrar.metadata import FILESYSTEM, KERNEL, RAMDISK, ZFILESYSTEM, check_url
from registrar.metadata import parse as parse_metadata

# (label, bytes done, bytes total) for a progress bar per file.
Progress = Callable[[str, int, int], None]

TAR_MEMBER = "filesystem"
# ISA-L level 1 of 0-3: a filesystem image compresses about as well as with gzip -6 (its free
# space is holes or zeros), at several hundred MB/s.
GZIP_LEVEL = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_SUFFIXES = (".tar.gz", ".tgz", ".gz", ".bz2", ".xz", ".lzma", ".Z", ".img", ".raw", ".qcow2")

ORCA_OWL = "http://geni-orca.renci.org/owl/"
TOPOLOGY_NS = ORCA_OWL + "topology.owl#"
COMPUTE_NS = ORCA_OWL + "compute.owl#"
RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
XSD_STRING = "http://www.w3.org/2001/XMLSchema#string"


@dataclasses.dataclass(frozen=True)
class PublishedFile:
    """One file the metadata lists."""

    type: str
    path: Path
    url: str
    sha1: str
    size: int
    content: str  # what it holds, in a few words


@dataclasses.dataclass(frozen=True)
class Published:
    """The metadata file written, where it goes, and its SHA-1."""

    name: str
    metadata_path: Path
    metadata_url: str
    metadata_sha1: str
    files: tuple[PublishedFile, ...]
    notes: tuple[str, ...] = ()


def default_name(path: Path) -> str:
    """The name a file suggests: `centos7.img.gz` → `centos7`."""
    name = path.name
    for _ in range(2):
        for suffix in _SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                name = name[: -len(suffix)]
                break
    return name


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise PublishUsage(
            f"name {name!r} cannot be a file name in a URL: use letters, digits and . _ + - "
            "(give --name)"
        )
    return name


def _base_url(value: str) -> str:
    base = value.strip().rstrip("/")
    try:
        check_url(base + "/x", "--base-url")
    except InputError as exc:
        raise PublishUsage(str(exc)) from exc
    if "?" in base or "#" in base:
        raise PublishUsage(f"--base-url {base!r} must not have a query or a fragment")
    return base


def publish(
    base_url: str,
    *,
    image: Path | None = None,
    kernel: Path | None = None,
    ramdisk: Path | None = None,
    qcow2: Path | None = None,
    name: str | None = None,
    out_dir: Path = Path("."),
    progress: Progress | None = None,
) -> Published:
    """Hash and type each file, write `out_dir/NAME.xml`, and say where it goes.

    Raises PublishError (nothing written) for what the registrar would refuse, PublishUsage for
    arguments that make no metadata file, OSError for a file that cannot be read or written.
    """
    base = _base_url(base_url)
    if image is None and qcow2 is None:
        raise PublishUsage("nothing to publish: give an IMAGE (or --tar, or --qcow2)")
    name = _check_name(name or default_name(image or qcow2))  # type: ignore[arg-type]
    metadata_name = f"{name}.xml"
    given = [
        (p, role)
        for p, role in ((image, "IMAGE"), (kernel, KERNEL), (ramdisk, RAMDISK), (qcow2, QCOW2))
        if p is not None
    ]
    names = [p.name for p, _ in given] + [metadata_name]
    for file_name in names:
        if names.count(file_name) > 1:
            raise PublishUsage(
                f"two files are named {file_name!r}: each would have the URL {base}/"
                f"{quote(file_name)}; rename one (or give --name)"
            )
    with imagefile.collect_notes() as notes:
        files = [_examine(path, role, base, progress) for path, role in given]
    types = [f.type for f in files]
    if types.count(QCOW2) > 1:
        raise PublishUsage("IMAGE is a qcow2 image and so is --qcow2: a metadata file lists one")
    xml = metadata_xml(files)
    metadata_url = f"{base}/{quote(metadata_name)}"
    try:
        parse_metadata(xml, metadata_url)  # the service's own rules, on the very bytes
    except InputError as exc:
        raise PublishError(f"the registrar would refuse this metadata: {exc}") from exc
    path = out_dir / metadata_name
    _write_atomically(path, xml)
    return Published(
        name=name,
        metadata_path=path,
        metadata_url=metadata_url,
        metadata_sha1=hashlib.sha1(xml).hexdigest(),
        files=tuple(files),
        notes=tuple(notes),
    )


def _examine(path: Path, role: str, base: str, progress: Progress | None) -> PublishedFile:
    """Read `path` once; its type comes from its content for IMAGE and --qcow2."""
    size = path.stat().st_size
    report = None
    if progress is not None:
        done = [0]

        def report(n: int) -> None:
            done[0] += n
            progress(f"hashing {path.name}", done[0], size)

    inspect = role in ("IMAGE", QCOW2)
    with open(path, "rb") as source:
        found: Examined = imagefile.examine(source, inspect=inspect, progress=report)
    if found.problem is not None:
        raise PublishError(f"{path}: {found.problem}")
    if role == "IMAGE":
        assert found.content is not None
        kind = found.content.kind
    elif role == QCOW2:
        assert found.content is not None
        if found.content.kind != QCOW2:
            raise PublishError(f"{path}: --qcow2 names a file that is not a qcow2 image")
        kind = QCOW2
    else:
        kind = role
    url = f"{base}/{quote(path.name)}"
    return PublishedFile(kind, path, url, found.sha1, found.size, found.describe())


_ORDER = {FILESYSTEM: 0, ZFILESYSTEM: 0, KERNEL: 1, RAMDISK: 2, QCOW2: 3}


def metadata_xml(files: list[PublishedFile]) -> bytes:
    """The original's format: `<images><image><type/><signature/><url/></image>…</images>`."""
    root = etree.Element("images")
    for f in sorted(files, key=lambda f: _ORDER[f.type]):
        entry = etree.SubElement(root, "image")
        etree.SubElement(entry, "type").text = f.type
        etree.SubElement(entry, "signature").text = f.sha1
        etree.SubElement(entry, "url").text = f.url
    return etree.tostring(root, pretty_print=True)


def ndl_owl(published: Published) -> str:
    """The image as an NDL-OWL request describes it, to paste into the request's rdf:RDF.

    ORCA's own request writers (Flukes, the request generators in ORCA 5's sources) write the
    image as an individual of `compute:DiskImage` with `topology:hasName`, `topology:hasURL`
    (the metadata URL) and `topology:hasGUID` (its SHA-1); a node refers to it with
    `compute:diskImage`. The subject is in a request-style namespace
    (http://geni-orca.renci.org/owl/<uuid>#), the uuid taken from the metadata's SHA-1 so the
    same metadata always prints the same lines. The `rdf:`, `topology:` and `compute:` prefixes
    are the ones every ORCA request declares.
    """
    about = quoteattr(image_subject(published))
    name = escape(published.name)
    return "\n".join(
        (
            f"<rdf:Description rdf:about={about}>",
            f'  <topology:hasName rdf:datatype="{XSD_STRING}">{name}</topology:hasName>',
            f"  <topology:hasURL>{escape(published.metadata_url)}</topology:hasURL>",
            f"  <topology:hasGUID>{published.metadata_sha1}</topology:hasGUID>",
            f'  <rdf:type rdf:resource="{COMPUTE_NS}DiskImage"/>',
            "</rdf:Description>",
        )
    )


def image_subject(published: Published) -> str:
    """The URI of the image individual in `ndl_owl`."""
    namespace = uuid.UUID(published.metadata_sha1[:32])
    return f"{ORCA_OWL}{namespace}#{quote(published.name, safe='')}"


def make_tarball(source: Path, out_dir: Path, name: str, progress: Progress | None = None) -> Path:
    """Write `out_dir/NAME.tgz`: a gzip tar with one sparse member named `filesystem`.

    `source` is a directory holding a file named `filesystem` (as imgcapture.sh leaves it) or
    the raw image file itself, whatever its name. Raises PublishUsage if it is neither,
    PublishError if tar fails; nothing is left behind then.
    """
    source = source.resolve()
    if source.is_dir():
        member = source / TAR_MEMBER
        if not member.is_file():
            raise PublishUsage(f"--tar {source}: the directory holds no file named {TAR_MEMBER!r}")
    elif source.is_file():
        member = source
    else:
        raise PublishUsage(f"--tar {source}: no such file or directory")
    tar = shutil.which("tar")
    if tar is None:
        raise PublishUsage("--tar needs GNU tar, which is not installed")
    dest = out_dir / f"{_check_name(name)}.tgz"
    # GNU format: its sparse member is what imgcapture.sh's `tar -S` wrote, and what the
    # registrar reads. --transform names the member `filesystem` whatever the file's name.
    command = [
        tar, "--sparse", "--format=gnu", "--numeric-owner", "--owner=0", "--group=0",
        f"--transform=s|.*|{TAR_MEMBER}|", "-cf", "-", "-C", str(member.parent), member.name,
    ]  # fmt: skip
    total = member.stat().st_blocks * 512  # the data tar reads; holes cost nothing
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=out_dir)
    tmp = Path(tmp_name)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc,
        ):
            assert proc.stdout is not None and proc.stderr is not None
            done = 0
            with igzip.IGzipFile(fileobj=raw, mode="wb", compresslevel=GZIP_LEVEL) as gz:
                while chunk := proc.stdout.read(imagefile.READ_SIZE):
                    gz.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(f"tar {member.name}", min(done, total), total)
            errors = proc.stderr.read().decode(errors="replace").strip()
            if proc.wait() != 0:
                last = errors.splitlines()[-1] if errors else f"exit status {proc.returncode}"
                raise PublishError(f"--tar {member}: tar failed: {last}")
        os.chmod(tmp, 0o644)  # published on a web server: readable by it
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp_name, 0o644)  # published on a web server: readable by it
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
