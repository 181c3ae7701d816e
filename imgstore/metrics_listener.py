"""The HTTP listener that serves the mount's metrics (`metrics.py`) as `GET /metrics`.

`[store] metrics_listen = "127.0.0.1:9101"` makes the mount answer there (empty, the default:
no listener). The listener is hypercorn on the mount's own trio loop: the HTTP parsing is
hypercorn's, and producing the text is a few microseconds of CPU, so the loop never blocks on
it. Only `mount.py` imports this module; the store imports only the counters.
"""

from __future__ import annotations

import logging

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from imgstore.asgi import Receive, Scope, Send, lifespan
from imgstore.config import parse_listen
from imgstore.errors import MountError
from imgstore.metrics import StoreMetrics

log = logging.getLogger(__name__)


class MetricsApp:
    """ASGI app: `GET /metrics` (and `/`) answers the metrics; everything else 404."""

    def __init__(self, metrics: StoreMetrics) -> None:
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"] in ("/metrics", "/") and scope["method"] in ("GET", "HEAD"):
            status, content_type, body = 200, CONTENT_TYPE_LATEST, self.metrics.exposition()
        else:
            status, content_type, body = 404, "text/plain; charset=utf-8", b"try /metrics\n"
        headers = [
            (b"content-type", content_type.encode("latin-1")),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _config(listen: str) -> Config:
    host, port = parse_listen(listen)
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None  # scrapes every few seconds would drown the log
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    return config


async def bind(listen: str) -> Listener:
    """Bind the metrics listener on `listen` ("HOST:PORT", checked by the config); MountError
    naming the key if it cannot.

    Done before mounting, so a taken port fails the mount with a clear message.
    """
    config = _config(listen)
    try:
        # In a thread: a host name means a DNS lookup.
        sockets = await trio.to_thread.run_sync(config.create_sockets)
    except OSError as exc:
        raise MountError(f"[store] metrics_listen: cannot listen on {listen}: {exc}") from None
    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)
    log.info("metrics at http://%s/metrics", config.bind[0])
    return Listener(config, sockets)


class Listener:
    """Bound sockets waiting for `serve`."""

    def __init__(self, config: Config, sockets: Sockets) -> None:
        self.config = config
        self.sockets = sockets


async def serve(
    metrics: StoreMetrics,
    listener: Listener,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer `GET /metrics` on `listener` until cancelled; report the URLs once serving."""
    config = listener.config
    app = wrap_app(MetricsApp(metrics), config.wsgi_max_body_size, "asgi")
    await worker_serve(app, config, sockets=listener.sockets, task_status=task_status)
