"""The SOAP service's HTTP side: an ASGI app served by hypercorn on trio.

Routes (the paths Axis2 1.x exposes for ORCA's IMAGEPROXY service):

- `POST /axis2/services/IMAGEPROXY` and the port paths `…/IMAGEPROXY.IMAGEPROXYHttpSoap11Endpoint`
  and `…/IMAGEPROXY.IMAGEPROXYHttpSoap12Endpoint` (with or without a trailing slash): RegisterImage
  over SOAP 1.1 or 1.2, sized or chunked bodies up to `max_body` bytes (413 beyond).
- `GET` of any of those with `?wsdl`: ORCA's WSDL with every port address pointing at this server.
- `GET /healthz`: 200 while the server runs.
- `GET /metrics`: Prometheus text (registrar/metrics.py).

The work behind a call is a blocking callable `register(url, signature) -> answer text`, run on a
worker thread (`trio.to_thread`) so the event loop keeps serving other calls. No server-side timeout
is shorter than ORCA's 3600 s: hypercorn's read timeout stays off and its keep-alive timer only runs
between requests, so a long registration holds its connection until it is answered.
"""

from __future__ import annotations

import importlib.resources
import logging
import math
import time
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from lxml import etree

from imgstore.asgi import Receive, Scope, Send, header, lifespan
from registrar import soap
from registrar.errors import RegistrarError
from registrar.metrics import CONTENT_TYPE as METRICS_TYPE
from registrar.metrics import RegistrarMetrics

log = logging.getLogger(__name__)

Register = Callable[[str, str], str]

SERVICE = "/axis2/services/IMAGEPROXY"
PORTS = ("IMAGEPROXYHttpSoap11Endpoint", "IMAGEPROXYHttpSoap12Endpoint", "IMAGEPROXYHttpEndpoint")
SOAP_PATHS = frozenset(
    [SERVICE, SERVICE + "/"]
    + [f"{SERVICE}.{port}{slash}" for port in PORTS[:2] for slash in ("", "/")]
)
WSDL_NS = "http://schemas.xmlsoap.org/wsdl/"
_ADDRESS_NAMESPACES = (
    "http://schemas.xmlsoap.org/wsdl/soap/",
    "http://schemas.xmlsoap.org/wsdl/soap12/",
    "http://schemas.xmlsoap.org/wsdl/http/",
)
# Enough worker threads for many concurrent calls: most of them only wait on a single-flight.
DEFAULT_WORKERS = 64


def load_wsdl() -> bytes:
    """ORCA's WSDL as shipped in this package."""
    return importlib.resources.files("registrar").joinpath("imageproxy.wsdl").read_bytes()


def wsdl_for(base_url: str, wsdl: bytes | None = None) -> bytes:
    """ORCA's WSDL with each port's address set to `base_url` + its Axis2 port path."""
    root = etree.fromstring(wsdl or load_wsdl(), parser=etree.XMLParser(resolve_entities=False))
    for port in root.iter(f"{{{WSDL_NS}}}port"):
        for address in port:
            if etree.QName(address).namespace in _ADDRESS_NAMESPACES:
                address.set("location", f"{base_url}{SERVICE}.{port.get('name')}/")
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


class PayloadTooLarge(Exception):
    """Raised inside the app when a request body passes the limit (answered with 413)."""


class App:
    """The ASGI application: routes, body limits, one log line per request."""

    def __init__(
        self,
        register: Register,
        *,
        max_body: int = soap.MAX_REQUEST_BYTES,
        workers: int = DEFAULT_WORKERS,
        metrics: RegistrarMetrics | None = None,
    ) -> None:
        self.metrics = metrics or RegistrarMetrics()
        self.register = self.metrics.counted(register)
        self.max_body = max_body
        self.limiter = trio.CapacityLimiter(workers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.monotonic()
        method, path = scope["method"], scope["path"]
        status, outcome = await self._route(scope, receive, send)
        client = scope.get("client") or ("?", 0)
        log.info(
            "%s %s %s -> %d %s (%.3f s)",
            client[0],
            method,
            path,
            status,
            outcome,
            time.monotonic() - started,
        )

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> tuple[int, str]:
        method, path = scope["method"], scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        if path == "/healthz" and method in ("GET", "HEAD"):
            return await _respond(send, 200, "text/plain; charset=utf-8", b"ok\n"), "healthy"
        if path == "/metrics" and method in ("GET", "HEAD"):
            return await _respond(send, 200, METRICS_TYPE, self.metrics.exposition()), "metrics"
        if path not in SOAP_PATHS:
            return await _respond(
                send, 404, "text/plain; charset=utf-8", b"not found\n"
            ), "no route"
        if method in ("GET", "HEAD") and query.lower().split("&")[0] == "wsdl":
            body = wsdl_for(_base_url(scope))
            return await _respond(send, 200, "text/xml; charset=UTF-8", body), "WSDL"
        if method != "POST":
            await _respond(
                send,
                405,
                "text/plain; charset=utf-8",
                b"POST a SOAP request, or GET ?wsdl\n",
                [(b"allow", b"POST, GET")],
            )
            return 405, "method not allowed"
        return await self._soap(scope, receive, send)

    async def _soap(self, scope: Scope, receive: Receive, send: Send) -> tuple[int, str]:
        content_type = header(scope, b"content-type")
        version = soap.version_for(content_type)
        if not soap.is_soap_media_type(content_type):
            self.metrics.rejected("unsupported_media_type")
            await _respond(
                send,
                415,
                "text/plain; charset=utf-8",
                b"send SOAP 1.1 (text/xml) or SOAP 1.2 (application/soap+xml)\n",
            )
            return 415, f"unsupported media type {content_type!r}"
        try:
            body = await self._read_body(scope, receive)
        except PayloadTooLarge:
            self.metrics.rejected("too_large")
            reply = soap.too_large_reply(version, self.max_body)
            return await _reply(send, reply), f"fault: body over {self.max_body} bytes"
        try:
            request = soap.parse_request(body, content_type, header(scope, b"soapaction"))
        except RegistrarError as exc:
            self.metrics.rejected("bad_request")
            reply = soap.fault_reply(version, exc)
            return await _reply(send, reply), f"fault: {soap.fault_message(exc)}"
        reply, outcome = await self._call(request)
        return await _reply(send, reply), outcome

    async def _call(self, request: soap.Request) -> tuple[soap.Reply, str]:
        what = f"RegisterImage({request.url}, {request.signature}) over {request.version.label}"
        try:
            # Abandon, not wait, on cancellation (a shutdown): the thread cannot be interrupted,
            # and what it leaves half done is cleaned up by the next start's recovery.
            text = await trio.to_thread.run_sync(
                self.register,
                request.url,
                request.signature,
                limiter=self.limiter,
                abandon_on_cancel=True,
            )
        except RegistrarError as exc:
            return soap.fault_reply(request.version, exc), f"{what}: fault: {exc}"
        except Exception as exc:
            # A bug: ORCA still gets an answer (a Server fault), the log gets the traceback.
            log.exception("%s failed with an unexpected error", what)
            return soap.fault_reply(request.version, exc), f"{what}: internal error: {exc!r}"
        return soap.answer_reply(request.version, text), f"{what}: {text.strip()!r}"

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        length = header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_body:
            raise PayloadTooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise PayloadTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _base_url(scope: Scope) -> str:
    """This server as the client addressed it (its Host header), else as bound."""
    host = header(scope, b"host")
    if not host or any(c in host for c in "/\\@ \t\"'<>"):
        server = scope.get("server") or ("localhost", 80)
        host = f"[{server[0]}]:{server[1]}" if ":" in server[0] else f"{server[0]}:{server[1]}"
    return f"{scope.get('scheme', 'http')}://{host}"


async def _respond(
    send: Send,
    status: int,
    content_type: str,
    body: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> int:
    headers = [
        (b"content-type", content_type.encode("latin-1")),
        (b"content-length", str(len(body)).encode()),
    ] + (extra or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return status


async def _reply(send: Send, reply: soap.Reply) -> int:
    return await _respond(send, reply.status, reply.content_type, reply.body)


def hypercorn_config(listen: str, tls: tuple[str, str] | None = None) -> Config:
    """Hypercorn settings for ORCA's long calls: no read timeout, logs through `logging`.

    `tls` is (certfile, keyfile): the listener then speaks HTTPS only.
    """
    config = Config()
    config.bind = [listen]
    if tls is not None:
        config.certfile, config.keyfile = tls
    # Off, so a call that takes up to ORCA's 3600 s (or longer) is never cut by the server.
    config.read_timeout = None
    # Only between requests on an idle connection; Axis2's HTTP client reconnects when needed.
    config.keep_alive_timeout = 75
    config.graceful_timeout = 10
    config.accesslog = None  # our own line per request says more (outcome, duration)
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    return config


async def serve(
    app: App,
    listen: str,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    tls: tuple[str, str] | None = None,
) -> None:
    """Serve `app` on `listen` ("HOST:PORT"; port 0 picks one) until `shutdown_trigger` returns.

    Reports the bound URLs (e.g. ["http://127.0.0.1:8080"]) through `task_status` once listening.
    """
    config = hypercorn_config(listen, tls)
    trigger = shutdown_trigger or trio.sleep_forever
    log.debug("serving on %s; read timeout %s", listen, config.read_timeout or math.inf)
    await hypercorn_serve(app, config, shutdown_trigger=trigger, task_status=task_status)
