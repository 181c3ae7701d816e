"""`registrar publish`: the metadata it writes registers, each file typed by its content.

The end-to-end test publishes every type, serves the output with a real nginx, checks it with
`registrar check` and registers it through the real SOAP service against the stand-in cloud
(tests/registrar/e2e_stack.py); the ids come back and the cloud holds the published bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest
from lxml import etree

from registrar.publish import COMPUTE_NS, RDF_NS, TOPOLOGY_NS
from tests.registrar import e2e_stack
from tests.registrar.e2e_bundles import unbundle
from tests.registrar.e2e_stack import Stack
from tests.registrar.owner_support import (
    bars_on_a_terminal,
    publish_to,
    qcow2_image,
    run,
    run_measured,
    undrawn,
)
from tests.registrar.script_runs import run_on_terminal
from tests.registrar.soap_javaprops import loads
from tests.support.images import ImageFactory, make_sparse_file, sha1_file
from tests.support.origin import Origin

stack, stack_factory = e2e_stack.stack, e2e_stack.stack_factory  # fixtures

FS_MIB = 8
BASE = "http://images.example.org/centos7"


def _entries(xml_path: Path) -> list[tuple[str, str, str]]:
    root = etree.parse(str(xml_path)).getroot()
    assert root.tag == "images"
    return [
        (e.findtext("type"), e.findtext("signature"), e.findtext("url")) for e in root.iter("image")
    ]


def _stdout_value(out: str, label: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(label)).split()[-1]


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        ("raw", "FILESYSTEM"),
        ("gz", "ZFILESYSTEM"),
        ("bz2", "ZFILESYSTEM"),
        ("xz", "ZFILESYSTEM"),
        ("Z", "ZFILESYSTEM"),
        ("tar.gz", "ZFILESYSTEM"),
    ],
)
def test_each_image_is_typed_by_its_content_and_hashed(
    capsys: pytest.CaptureFixture[str],
    image_factory: ImageFactory,
    tmp_path: Path,
    form: str,
    expected: str,
) -> None:
    if form == "raw":
        source = image_factory.ext4(FS_MIB)
    elif form == "tar.gz":
        source = image_factory.sparse_tar_gz(FS_MIB)
    else:
        source = image_factory.compressed(form, FS_MIB)
    # Named without a telling suffix: the type comes from the bytes, not the name.
    image = tmp_path / "centos7"
    os.link(source, image)
    kernel, ramdisk = image_factory.blob(1 << 20, 1, "kernel"), image_factory.blob(1 << 19, 1)

    code, out, err = run(
        capsys, "publish", "--base-url", BASE + "/", "--out", str(tmp_path),
        "--kernel", str(kernel), "--ramdisk", str(ramdisk), str(image),
    )  # fmt: skip

    assert (code, err) == (0, ""), out
    xml = tmp_path / "centos7.xml"
    assert _entries(xml) == [
        (expected, image_factory.sha1(source), f"{BASE}/centos7"),
        ("KERNEL", image_factory.sha1(kernel), f"{BASE}/{kernel.name}"),
        ("RAMDISK", image_factory.sha1(ramdisk), f"{BASE}/{ramdisk.name}"),
    ]
    assert _stdout_value(out, "metadata URL:") == f"{BASE}/centos7.xml"
    assert _stdout_value(out, "metadata SHA-1:") == sha1_file(xml)
    assert f"once uploaded: registrar check {BASE}/centos7.xml {sha1_file(xml)}" in out
    assert oct(xml.stat().st_mode & 0o777) == "0o644"


def test_progress_shows_on_a_terminal_and_stdout_is_what_a_pipe_gets(
    image_factory: ImageFactory, tmp_path: Path
) -> None:
    files = {
        "centos7.img": image_factory.ext4(FS_MIB),
        "vmlinuz": image_factory.blob(1 << 20, 1, "kernel"),
        "initrd.img": image_factory.blob(1 << 19, 1, "ramdisk"),
    }
    for name, source in files.items():
        os.link(source, tmp_path / name)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["publish", "--base-url", BASE, "--out", str(out_dir)]
    argv += ["--kernel", str(tmp_path / "vmlinuz"), "--ramdisk", str(tmp_path / "initrd.img")]
    argv += [str(tmp_path / "centos7.img")]

    shown = bars_on_a_terminal(*argv, workdir=tmp_path)

    assert "metadata SHA-1:" not in shown
    bars = {
        "hashing centos7.img": "8.4/8.4 MB",
        "hashing vmlinuz": "1.0/1.0 MB",
        "hashing initrd.img": "524.3/524.3 kB",
    }
    assert undrawn(shown, bars) == [], shown


def test_tar_on_a_terminal_shows_its_progress_and_prints_what_it_made_on_stdout(
    image_factory: ImageFactory, tmp_path: Path
) -> None:
    raw = tmp_path / "disk.img"
    os.link(image_factory.ext4(FS_MIB), raw)
    argv = ["publish", "--base-url", BASE, "--out", str(tmp_path), "--tar", str(raw)]

    shown = run_on_terminal(*argv, "--name", "centos7", stdout=tmp_path / "stdout.txt")

    out = (tmp_path / "stdout.txt").read_text()
    assert out.splitlines()[0] == (
        f"made {tmp_path / 'centos7.tgz'} (gzip tar, one sparse member `filesystem`)"
    )
    assert f"metadata SHA-1: {sha1_file(tmp_path / 'centos7.xml')}" in out.splitlines()
    assert "made " not in shown
    assert any(line.startswith("tar disk.img ") for line in shown.splitlines()), shown
    assert any(line.startswith("hashing centos7.tgz ") for line in shown.splitlines()), shown


# `truncate -s 1G f; sha1sum f`: a sparse file reads as zeros.
GIB_OF_ZEROS_SHA1 = "2a492f15396a6768bcbca016993f4b4c8b0b5307"


@pytest.mark.slow
def test_a_large_image_is_hashed_as_a_stream_not_read_whole(tmp_path: Path) -> None:
    image = tmp_path / "big.img"
    image.touch()
    os.truncate(image, 1 << 30)  # sparse: no disk space, and it reads fast
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    done = run_measured(
        "publish", "--base-url", BASE, "--out", str(out_dir), str(image), workdir=tmp_path
    )

    assert (done.code, done.stderr) == (0, ""), done.stdout
    assert _entries(out_dir / "big.xml") == [("FILESYSTEM", GIB_OF_ZEROS_SHA1, f"{BASE}/big.img")]
    # The interpreter and its imports take about 50 MiB; a whole read would take 1 GiB more.
    assert done.peak_rss < 200 << 20, f"peak RSS {done.peak_rss >> 20} MiB"


def test_the_ndl_owl_lines_parse_as_the_image_of_an_orca_request(
    capsys: pytest.CaptureFixture[str], image_factory: ImageFactory, tmp_path: Path
) -> None:
    base = "http://images.example.org/a&b"  # an & in the URL must come out escaped
    code, out, _ = run(
        capsys, "publish", "--base-url", base, "--out", str(tmp_path), "--name", "centos7",
        str(image_factory.ext4(FS_MIB)),
    )  # fmt: skip
    assert code == 0, out
    lines = out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("<rdf:Description")))
    end = lines.index("</rdf:Description>", start)
    fragment = "\n".join(lines[start : end + 2])  # the block and the node's comment line
    document = (
        f'<rdf:RDF xmlns:rdf="{RDF_NS}" xmlns:topology="{TOPOLOGY_NS}" '
        f'xmlns:compute="{COMPUTE_NS}">\n{fragment}\n</rdf:RDF>'
    )

    root = etree.fromstring(document.encode())

    (image,) = [child for child in root if isinstance(child.tag, str)]  # comments aside
    assert image.tag == f"{{{RDF_NS}}}Description"
    about = image.get(f"{{{RDF_NS}}}about")
    assert about.startswith("http://geni-orca.renci.org/owl/") and about.endswith("#centos7")
    url = _stdout_value(out, "metadata URL:")
    assert url == f"{base}/centos7.xml"
    assert image.findtext(f"{{{TOPOLOGY_NS}}}hasURL") == url
    assert image.findtext(f"{{{TOPOLOGY_NS}}}hasGUID") == sha1_file(tmp_path / "centos7.xml")
    assert image.findtext(f"{{{TOPOLOGY_NS}}}hasName") == "centos7"
    (kind,) = image.findall(f"{{{RDF_NS}}}type")
    assert kind.get(f"{{{RDF_NS}}}resource") == f"{COMPUTE_NS}DiskImage"
    # The node's reference names the same individual.
    assert f'<compute:diskImage rdf:resource="{about}"/>' in fragment


@pytest.mark.parametrize("given", ["directory", "file"])
def test_tar_makes_a_gzip_tar_with_one_sparse_member_named_filesystem(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, given: str
) -> None:
    src = tmp_path / "capture"
    src.mkdir()
    size = 256 << 20
    regions = [(0, os.urandom(1 << 20)), (100 << 20, b"superblock copy" * 1000)]
    raw = make_sparse_file(
        src / ("filesystem" if given == "directory" else "disk.img"), size, regions
    )
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["publish", "--base-url", BASE, "--out", str(out_dir), "--tar"]
    argv += [str(src if given == "directory" else raw), "--name", "centos7"]

    code, out, err = run(capsys, *argv)

    assert (code, err) == (0, ""), out
    tgz = out_dir / "centos7.tgz"
    assert tgz.stat().st_size < 2 << 20  # 256 MiB of mostly holes
    with tarfile.open(tgz, "r:gz") as tar:
        (member,) = tar.getmembers()
        assert (member.name, member.size, member.issparse()) == ("filesystem", size, True)
        data = tar.extractfile(member)
        assert data is not None
        assert hashlib.sha1(data.read()).hexdigest() == sha1_file(raw)
    assert _entries(out_dir / "centos7.xml") == [
        ("ZFILESYSTEM", sha1_file(tgz), f"{BASE}/centos7.tgz")
    ]
    assert "gzip tar (member 'filesystem', sparse), 256.0 MiB raw" in out


def _refused(capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: str) -> str:
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    code, out, err = run(capsys, "publish", "--base-url", BASE, "--out", str(out_dir), *argv)
    assert (code, out) == (1, "")
    assert err.startswith("registrar publish: ") and err.count("\n") == 1, err
    assert list(out_dir.iterdir()) == []  # nothing written, not even a temporary file
    return err


def _tar_gz(path: Path, members: dict[str, bytes | None]) -> Path:
    """A gzip tar; a None member is a directory."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_what_the_registrar_would_refuse_is_refused_with_one_line(
    capsys: pytest.CaptureFixture[str], image_factory: ImageFactory, tmp_path: Path
) -> None:
    zstd = tmp_path / "disk.zst"
    zstd.write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(4096))
    assert "is zstd-compressed, which the registrar cannot decompress" in _refused(
        capsys, tmp_path, str(zstd)
    )

    plain_tar = tmp_path / "fs.tar"
    with tarfile.open(plain_tar, "w") as tar:
        tar.add(image_factory.ext4(FS_MIB), arcname="filesystem")
    assert "is an uncompressed tar" in _refused(capsys, tmp_path, str(plain_tar))

    whole = image_factory.compressed("gz", FS_MIB).read_bytes()
    cut = tmp_path / "cut.img.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    assert "gzip data is corrupt or truncated" in _refused(capsys, tmp_path, str(cut))

    no_file = _tar_gz(tmp_path / "dirs.tgz", {"etc": None, "usr": None})
    assert "no member named 'filesystem' and 0 regular files" in _refused(
        capsys, tmp_path, str(no_file)
    )

    empty = tmp_path / "empty.img"
    empty.touch()
    assert "the file is empty" in _refused(capsys, tmp_path, str(empty))

    not_qcow2 = image_factory.ext4(FS_MIB)
    assert "--qcow2 names a file that is not a qcow2 image" in _refused(
        capsys, tmp_path, "--qcow2", str(not_qcow2), str(image_factory.compressed("gz", FS_MIB))
    )


def test_usage_mistakes_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "publish", "--base-url", BASE, str(tmp_path / "missing.img"))
    assert code == 2 and "missing.img: no such file" in err
    code, _, err = run(capsys, "publish", "--base-url", BASE)
    assert code == 2 and "nothing to publish" in err
    image = tmp_path / "fs.img"
    image.write_bytes(b"x" * 1024)
    code, _, err = run(capsys, "publish", "--base-url", "ftp://example.org", str(image))
    assert code == 2 and "only http and https are accepted" in err
    kernel = tmp_path / "k" / image.name
    kernel.parent.mkdir()
    kernel.write_bytes(b"k" * 100)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = run(
        capsys, "publish", "--base-url", BASE, "--out", str(out_dir), "--kernel", str(kernel),
        str(image),
    )  # fmt: skip
    assert (
        code == 2 and f"two files are named 'fs.img': each would have the URL {BASE}/fs.img" in err
    )
    code, _, err = run(
        capsys, "publish", "--base-url", BASE, "--out", str(out_dir), "--tar", str(tmp_path / "k")
    )
    assert code == 2 and "the directory holds no file named 'filesystem'" in err
    code, _, err = run(capsys, "publish", "--base-url", BASE, "--tar", str(out_dir), str(image))
    assert code == 2 and "give IMAGE or --tar, not both" in err
    assert list(out_dir.iterdir()) == []


def test_a_qcow2_image_is_published_as_qcow2_and_passes_check(
    capsys: pytest.CaptureFixture[str], origin: Origin, tmp_path: Path
) -> None:
    """A QCOW2 alone: needs issue 14's parser (a filesystem OR a QCOW2 is required)."""
    disk = qcow2_image(tmp_path / "disk.qcow2")

    published = publish_to(origin, tmp_path / "q", disk)

    assert [(f.type, f.content) for f in published.files] == [("QCOW2", "qcow2")]
    code, out, _ = run(capsys, "check", published.metadata_url, published.metadata_sha1)
    assert code == 0, out
    assert "verdict: OK" in out


def test_every_type_published_registers_through_the_soap_service(
    capsys: pytest.CaptureFixture[str],
    stack: Stack,
    origin: Origin,
    image_factory: ImageFactory,
    tmp_path: Path,
) -> None:
    raw = image_factory.ext4(FS_MIB)
    kernel = image_factory.blob(1 << 20, 2, "kernel")
    ramdisk = image_factory.blob(1 << 19, 2, "ramdisk")
    sets = {
        "FILESYSTEM": raw,
        "gzip": image_factory.compressed("gz", FS_MIB),
        "bzip2": image_factory.compressed("bz2", FS_MIB),
        "xz": image_factory.compressed("xz", FS_MIB),
    }
    published = {
        label: publish_to(origin, tmp_path / label, image, kernel=kernel, ramdisk=ramdisk)
        for label, image in sets.items()
    }
    # The sparse tar, made by --tar from the raw image, through the command line.
    tar_out = tmp_path / "tar"
    tar_out.mkdir()
    code, out, _ = run(
        capsys, "publish", "--base-url", origin.url("tar"), "--out", str(tar_out),
        "--tar", str(raw), "--name", "sparse", "--kernel", str(kernel), "--ramdisk", str(ramdisk),
    )  # fmt: skip
    assert code == 0, out
    for path in [tar_out / "sparse.tgz", tar_out / "sparse.xml", kernel, ramdisk]:
        origin.put(f"tar/{path.name}", path)
    urls = {label: (p.metadata_url, p.metadata_sha1) for label, p in published.items()}
    urls["sparse tar"] = (
        _stdout_value(out, "metadata URL:"),
        _stdout_value(out, "metadata SHA-1:"),
    )
    types = {label: p.files[0].type for label, p in published.items()}
    assert types == {
        "FILESYSTEM": "FILESYSTEM",
        "gzip": "ZFILESYSTEM",
        "bzip2": "ZFILESYSTEM",
        "xz": "ZFILESYSTEM",
    }
    for url, sha1 in urls.values():
        code, out, _ = run(capsys, "check", url, sha1)
        assert code == 0, out

    service = stack.zeep(stack.start())
    answers = {
        label: loads(service.RegisterImage(url=u, signature=s)) for label, (u, s) in urls.items()
    }

    kernels = {a["KERNEL"] for a in answers.values()}
    ramdisks = {a["RAMDISK"] for a in answers.values()}
    assert len(kernels) == len(ramdisks) == 1  # one kernel and one ramdisk, registered once
    (kernel_id,), (ramdisk_id,) = kernels, ramdisks
    assert unbundle(stack.cloud, kernel_id).sha1 == image_factory.sha1(kernel)
    assert unbundle(stack.cloud, ramdisk_id).sha1 == image_factory.sha1(ramdisk)
    for label, answer in answers.items():
        assert set(answer) == {"FILESYSTEM", "KERNEL", "RAMDISK"}, label
        machine = unbundle(stack.cloud, answer["FILESYSTEM"])
        # Whatever was published, the cloud holds the raw ext4 image.
        assert machine.sha1 == image_factory.sha1(raw), label
        assert (machine.kernel_id, machine.ramdisk_id) == (kernel_id, ramdisk_id)
    assert len({a["FILESYSTEM"] for a in answers.values()}) == len(answers)


def test_a_qcow2_beside_a_filesystem_registers_the_filesystem_on_eucalyptus(
    capsys: pytest.CaptureFixture[str],
    stack: Stack,
    origin: Origin,
    image_factory: ImageFactory,
    tmp_path: Path,
) -> None:
    """Eucalyptus cannot bundle a QCOW2: the filesystem beside it is registered (issue 14)."""
    raw = image_factory.ext4(FS_MIB)
    disk = qcow2_image(tmp_path / "disk.qcow2")
    published = publish_to(origin, tmp_path / "both", raw, qcow2=disk)
    assert sorted(f.type for f in published.files) == ["FILESYSTEM", "QCOW2"]
    code, out, _ = run(capsys, "check", published.metadata_url, published.metadata_sha1)
    assert code == 0, out

    service = stack.zeep(stack.start())
    answer = loads(
        service.RegisterImage(url=published.metadata_url, signature=published.metadata_sha1)
    )

    assert set(answer) == {"FILESYSTEM", "KERNEL", "RAMDISK"}
    assert (answer["KERNEL"], answer["RAMDISK"]) == ("", "")
    assert unbundle(stack.cloud, answer["FILESYSTEM"]).sha1 == image_factory.sha1(raw)
    assert stack.cloud.image_ids() == [answer["FILESYSTEM"]]
