"""Hostile requests against the real registrar process, and what they may touch.

- SOAP bodies that are malformed, in the wrong namespace, missing elements, entity bombs,
  external entities (file:// and http://), DTDs, and bodies over the limit (sized and chunked):
  each answered with a SOAP fault or a 4xx; the process's peak memory (VmHWM) grows by less
  than 32 MiB over the whole barrage, and the http:// entity's target is never contacted.
- Paths: signatures such as ../../etc are refused before anything is written; afterwards the
  cache holds only 40-hex blob names and the file the signature named does not exist.
- Modes: after a real registration every directory under the cache and state dirs is 0700
  and every file 0600 (group and others get nothing).
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import stat
from pathlib import Path

import pytest
import zeep.exceptions

from registrar.server import SERVICE
from tests.registrar import e2e_stack
from tests.registrar.e2e_stack import Registrar, Stack
from tests.support.images import ImageFactory, metadata_xml
from tests.support.origin import Origin

stack, stack_factory = e2e_stack.stack, e2e_stack.stack_factory  # fixtures

S11 = "http://schemas.xmlsoap.org/soap/envelope/"
ORCA = "http://imageproxy.orca"
SIG = "0123456789abcdef0123456789abcdef01234567"
MiB = 1024 * 1024


def _envelope(inner: str, doctype: str = "") -> bytes:
    return (
        f'<?xml version="1.0"?>{doctype}<s:Envelope xmlns:s="{S11}"><s:Body>{inner}'
        "</s:Body></s:Envelope>"
    ).encode()


def _op(url: str = "http://o/m", sig: str = SIG, ns: str = ORCA) -> str:
    return (
        f'<o:RegisterImage xmlns:o="{ns}"><o:url>{url}</o:url>'
        f"<o:signature>{sig}</o:signature></o:RegisterImage>"
    )


def _laughs() -> str:
    ents = ['<!ENTITY l0 "lollollollollollollollollollol">']
    ents += [f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10)]
    return "<!DOCTYPE s:Envelope [" + "".join(ents) + "]>"


def _vmhwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _post(reg: Registrar, body: bytes) -> tuple[int, bytes]:
    host, port = reg.host_port
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request(
            "POST",
            SERVICE,
            body=body,
            headers={
                "Content-Type": "text/xml; charset=UTF-8",
                "SOAPAction": '"urn:RegisterImage"',
            },
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _post_huge(reg: Registrar, *, chunked: bool) -> int:
    """Announce (sized) or stream (chunked) 1 GiB; the server must answer before it all."""
    host, port = reg.host_port
    sock = socket.create_connection((host, port), timeout=60)
    try:
        head = f"POST {SERVICE} HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/xml\r\n"
        head += (
            "Transfer-Encoding: chunked\r\n\r\n"
            if chunked
            else "Content-Length: 1073741824\r\n\r\n"
        )
        sock.sendall(head.encode())
        piece = b"x" * 65536
        frame = (b"%x\r\n" % len(piece)) + piece + b"\r\n" if chunked else piece
        sent = 0
        sock.settimeout(0.5)
        while sent < 64 * MiB:  # far past the limit; the answer comes long before this
            try:
                sock.sendall(frame)
                sent += len(piece)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                break
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except (BlockingIOError, TimeoutError):
                continue
        sock.settimeout(30)
        reply = sock.recv(65536)
        assert sent < 64 * MiB, "the server read 64 MiB without answering"
        return int(reply.split(b" ", 2)[1])
    finally:
        sock.close()


def _fault(service: object, url: str, signature: str) -> str:
    with pytest.raises(zeep.exceptions.Fault) as caught:
        service.RegisterImage(url=url, signature=signature)  # type: ignore[attr-defined]
    return str(caught.value.message)


def test_hostile_soap_is_refused_with_bounded_memory(stack: Stack) -> None:
    reg = stack.start()
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(8)
    trap.setblocking(False)
    try:
        _barrage(stack, reg, trap)
    finally:
        trap.close()


def _barrage(stack: Stack, reg: Registrar, trap: socket.socket) -> None:
    trap_url = f"http://127.0.0.1:{trap.getsockname()[1]}/evil"
    before = _vmhwm_kib(reg.proc.pid)

    cases = {
        "malformed": (b"<s:Envelope><s:Body><unclosed>", "not well-formed XML"),
        "not an envelope": (b"<a/>", "not a SOAP envelope"),
        "wrong namespace": (_envelope(_op(ns="http://wrong")), "namespace http://imageproxy.orca"),
        "no url": (
            _envelope(
                f'<o:RegisterImage xmlns:o="{ORCA}"><o:signature>{SIG}</o:signature>'
                "</o:RegisterImage>"
            ),
            "no {http://imageproxy.orca}url element",
        ),
        "billion laughs": (_envelope(_op(url="&l9;"), _laughs()), "has a DOCTYPE"),
        "xxe file": (
            _envelope(
                _op(url="&x;"), '<!DOCTYPE s:Envelope [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            ),
            "has a DOCTYPE",
        ),
        "xxe http": (
            _envelope(_op(url="&x;"), f'<!DOCTYPE s:Envelope [<!ENTITY x SYSTEM "{trap_url}">]>'),
            "has a DOCTYPE",
        ),
        "external dtd": (
            _envelope(_op(), f'<!DOCTYPE s:Envelope SYSTEM "{trap_url}">'),
            "has a DOCTYPE",
        ),
    }
    for what, (body, message) in cases.items():
        status, reply = _post(reg, body)
        assert status in (400, 500), what
        assert b"Fault" in reply and message.encode() in reply, (what, reply[:300])
        assert b"root:" not in reply, what
    assert _post_huge(reg, chunked=False) == 413
    assert _post_huge(reg, chunked=True) == 413

    with pytest.raises(BlockingIOError):
        trap.accept()  # nobody followed the http:// entity or DTD
    grown = _vmhwm_kib(reg.proc.pid) - before
    assert grown < 32 * 1024, f"peak memory grew by {grown} KiB"
    assert reg.proc.poll() is None
    assert stack.cloud.bucket_keys() == [] and stack.cloud.image_ids() == []


def _tree(root: Path) -> set[Path]:
    return set(root.rglob("*")) if root.exists() else set()


def test_requests_cannot_name_paths_and_files_are_private(
    stack: Stack, origin: Origin, image_factory: ImageFactory, tmp_path: Path
) -> None:
    reg = stack.start()
    service = stack.zeep(reg)
    images = image_factory.publish(origin, size_mib=16, fs_format="raw", ramdisk=False)
    target = tmp_path / "pwned"

    for sig in ("../../etc/passwd", f"../../{target}", "/" + "a" * 39, SIG[:39] + "/"):
        message = _fault(service, images.metadata_url, sig)
        assert "is not a SHA-1 (40 hexadecimal digits)" in message, sig
    fs = images.parts["FILESYSTEM"]
    for sig in ("../" * 13 + "etc", "..%2F..%2Fetc" + "0" * 27):
        meta = metadata_xml([("FILESYSTEM", sig, fs.url)])
        message = _fault(service, origin.put("p.xml", meta), hashlib.sha1(meta).hexdigest())
        assert "FILESYSTEM image in metadata at" in message and "is not a SHA-1" in message

    # A good registration, then look at everything the site wrote.
    text = service.RegisterImage(url=images.metadata_url, signature=images.metadata_sha1)
    assert "FILESYSTEM=" in text and "KERNEL=" in text
    assert not target.exists()
    blobs = sorted(p.name for p in (stack.cache_dir / "blobs").iterdir())
    assert blobs and all(len(n) == 40 and set(n) <= set("0123456789abcdef") for n in blobs)
    names = sorted(p.name for p in (stack.mountpoint / "by-sha1").iterdir())
    assert names == sorted(stack.imgstore_ls())
    for root in (stack.cache_dir, stack.state_dir):
        assert stat.S_IMODE(root.stat().st_mode) == 0o700, root
        for path in _tree(root):
            mode = stat.S_IMODE(path.lstat().st_mode)
            want = 0o700 if path.is_dir() else 0o600
            assert mode == want, f"{path} is {oct(mode)}"
