"""Run the real SOAP server (hypercorn on trio, a real socket) in a thread, for SOAP-layer tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from urllib.parse import urlsplit

import trio

from registrar import server

WSDL = "/work/shared/reference/imageproxy.wsdl"
SOAP11_BINDING = "{http://imageproxy.orca}IMAGEPROXYSoap11Binding"
SOAP12_BINDING = "{http://imageproxy.orca}IMAGEPROXYSoap12Binding"


@dataclass
class Running:
    """A server that is listening: its base URL, host and port."""

    base_url: str
    host: str
    port: int

    @property
    def endpoint(self) -> str:
        return self.base_url + server.SERVICE


@contextmanager
def running_server(register: server.Register, **app_options: object) -> Iterator[Running]:
    """Serve `register` on 127.0.0.1 (a free port) until the block ends; fail if it never binds."""
    started = threading.Event()
    state: dict[str, object] = {}

    async def main() -> None:
        stop = trio.Event()
        state["token"] = trio.lowlevel.current_trio_token()
        state["stop"] = stop
        app = server.App(register, **app_options)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                partial(server.serve, app, "127.0.0.1:0", shutdown_trigger=stop.wait)
            )
            state["binds"] = binds
            started.set()

    def thread_main() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # reported to the test thread below
            state["error"] = exc
            started.set()

    thread = threading.Thread(target=thread_main, name="soap-server", daemon=True)
    thread.start()
    assert started.wait(30), "the SOAP server did not start listening within 30 s"
    if "error" in state:
        raise AssertionError("the SOAP server failed to start") from state["error"]  # type: ignore[arg-type]
    base = state["binds"][0]  # type: ignore[index]
    parts = urlsplit(base)
    try:
        yield Running(base, parts.hostname or "127.0.0.1", parts.port or 80)
    finally:
        trio.from_thread.run_sync(state["stop"].set, trio_token=state["token"])  # type: ignore[attr-defined]
        thread.join(30)
        assert not thread.is_alive(), "the SOAP server did not stop within 30 s"
        if "error" in state:
            raise AssertionError("the SOAP server crashed") from state["error"]  # type: ignore[arg-type]
