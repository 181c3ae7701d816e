"""The registrar's wiring: config → imgstore mount → cloud backend → Service → HTTP → systemd.

    service, config = open_service(path)   # what `registrar register` runs one call on
    serve(path)                            # `registrar serve`: until SIGTERM or SIGINT

`serve` cleans up what a previous run left half done, then listens on `[registrar] listen`
behind the access guard, tells systemd READY=1 once bound (Type=notify) and STOPPING=1 on the
first SIGTERM or SIGINT, and returns after the server's graceful shutdown. Configuration
mistakes raise ConfigError before anything listens.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from imgstore.config import StoreConfig
from imgstore.config import load as load_store_config
from imgstore.errors import StoreError
from registrar import config as registrar_config
from registrar import server
from registrar.access import Guard
from registrar.errors import ConfigError

if TYPE_CHECKING:
    from registrar.service import Service

log = logging.getLogger(__name__)


def load_configs(path: Path) -> tuple[registrar_config.Config, StoreConfig]:
    """The registrar config, and the store's (with its mountpoint set)."""
    config = registrar_config.load(path)
    try:
        store = load_store_config(path, {})
    except StoreError as exc:
        raise ConfigError(f"[store] in {path}: {exc}") from exc
    if store.mountpoint is None:
        raise ConfigError(
            f"[store] mountpoint is not set in {path}: the registrar reads images "
            "through the imgstore mount"
        )
    return config, store


def open_service(path: Path) -> tuple[Service, registrar_config.Config]:
    """The Service the config file at `path` describes; the caller closes it."""
    # Imported here: boto3 and the bundler cost start-up time `registrar list` does not need.
    from registrar.service import Service

    config, store = load_configs(path)
    mountpoint = store.mountpoint
    assert mountpoint is not None  # load_configs checked
    if not (mountpoint / "by-sha1").is_dir():
        raise ConfigError(f"{mountpoint} is not an imgstore mount (no by-sha1/): start imgstore")
    return Service.from_config(config, store.cache_dir, mountpoint, store.http_proxy), config


def serve(path: Path) -> None:
    """Run the SOAP service the config file at `path` describes until SIGTERM or SIGINT."""
    service, config = open_service(path)
    try:
        cleaned = service.recover()
        if cleaned:
            log.info("cleaned up %d registrations a previous run left half done", cleaned)
        access = config.registrar.access
        # 403/401 before the app; the app's /metrics shows the service's counters.
        app = Guard(server.App(service.answer_text, metrics=service.metrics), access)
        trio.run(_serve, app, config.registrar.listen, access.tls)
    finally:
        service.close()


async def _serve(app: Guard, listen: str, tls: tuple[str, str] | None = None) -> None:
    stop = trio.Event()

    async def on_signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s: stopping", signal.Signals(signum).name)
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signals)
        serve = partial(server.serve, app, listen, shutdown_trigger=stop.wait, tls=tls)
        binds = await nursery.start(serve)
        log.info("SOAP service listening on %s%s", binds[0], server.SERVICE)
        _notify_systemd(b"READY=1")
        await stop.wait()
        _notify_systemd(b"STOPPING=1")
    # The server returned after its graceful shutdown; the signal task ended with the event.


def _notify_systemd(message: bytes) -> None:
    """Send `message` to $NOTIFY_SOCKET when systemd runs us as Type=notify."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message)
