"""One origin protocol: both transports say the same about the same answer.

A small real HTTP server gives each kind of answer an origin may give to a ranged GET; the
thread transport (trusted URLs) and httpx (untrusted URLs) must end with the same exception
and the same words, since both hand the answer to `imgstore.origin.check_answer`. (How the
body itself breaks is the transports' own report: each names its library's error; see
docs/failure-modes.md.)
"""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator

import pytest
import trio

from imgstore.catalog import Url
from imgstore.errors import OriginChanged, OriginError, OriginRetry, RangeNotSupported
from imgstore.fetcher import Origin
from imgstore.netpolicy import NetPolicy
from imgstore.origin import check_answer, range_headers

BODY = bytes(range(256)) * 4  # 1 KiB
ETAG = '"v1"'


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        first, last = (int(x) for x in self.headers["Range"].split("=")[1].split("-"))
        status, headers, body = {
            "/good": (206, {"Content-Range": f"bytes {first}-{last}/{len(BODY)}"}, None),
            "/wrong-range": (206, {"Content-Range": f"bytes 0-{last - first}/{len(BODY)}"}, None),
            "/changed": (206, {"ETag": '"v2"'}, None),
            "/no-range": (200, {}, BODY),
            "/gone": (404, {}, b"no\n"),
            "/busy": (503, {}, b"later\n"),
        }[self.path]
        if body is None:
            body = BODY[first : last + 1]
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def _origin() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _fetch(url: str, trusted: bool) -> bytes | BaseException:
    async def run() -> bytes | BaseException:
        # One attempt per URL, so a retryable answer ends the fetch at once.
        origin = Origin(retries=1, policy=NetPolicy.from_cidrs(["127.0.0.0/8"]))
        try:
            return bytes(await origin.fetch_range([Url(url, trusted, ETAG)], 100, 200, len(BODY)))
        except OriginError as exc:
            return exc
        finally:
            await origin.aclose()

    return trio.run(run)


@pytest.mark.parametrize(
    "path, kind, words",
    [
        ("/good", None, None),
        (
            "/wrong-range",
            OriginError,
            "asked bytes 100-199/1024, got Content-Range 'bytes 0-99/1024'",
        ),
        ("/changed", OriginChanged, 'ETag changed from "v1" to "v2"'),
        ("/no-range", RangeNotSupported, "answered 200 to a Range request"),
        ("/gone", OriginError, "HTTP 404 Not Found"),
        ("/busy", OriginError, "every URL failed; last: "),
    ],
)
def test_both_transports_read_an_answer_the_same_way(path, kind, words):
    with _origin() as base:
        by_thread = _fetch(base + path, trusted=True)
        by_httpx = _fetch(base + path, trusted=False)
    if kind is None:
        assert by_thread == by_httpx == BODY[100:200]
        return
    assert type(by_thread) is type(by_httpx) is kind
    assert str(by_thread) == str(by_httpx)
    assert words in str(by_thread)


def test_a_weak_etag_is_not_sent_as_if_range():
    assert range_headers(0, 10, '"strong"') == {"Range": "bytes=0-9", "If-Range": '"strong"'}
    assert range_headers(0, 10, 'W/"weak"') == {"Range": "bytes=0-9"}
    assert range_headers(5, 6, None) == {"Range": "bytes=5-5"}


def test_an_answer_cut_inside_its_headers_is_retried_not_refused():
    # http.client takes the end of the stream for the end of the headers: the Content-Range it
    # lacks was cut off, so another attempt may work.
    headers = {"Content-Length": "10"}
    with pytest.raises(OriginRetry, match="answer ended in its headers"):
        check_answer("u", 206, "Partial", headers.get, None, (0, 10, 10), lambda: True)
    with pytest.raises(OriginError, match="got Content-Range None") as refused:
        check_answer("u", 206, "Partial", headers.get, None, (0, 10, 10), lambda: False)
    assert not isinstance(refused.value, OriginRetry)


def test_a_whole_body_takes_200_or_206_and_still_checks_the_etag():
    check_answer("u", 200, "OK", {}.get, ETAG)
    check_answer("u", 206, "Partial", {}.get, ETAG)
    with pytest.raises(OriginChanged):
        check_answer("u", 200, "OK", {"ETag": '"v2"'}.get, ETAG)
    with pytest.raises(OriginRetry, match="^HTTP 429$"):
        check_answer("u", 429, "Too Many", {}.get, ETAG)
