"""The TLS client contexts of origin connections, each built once per process.

Building a context loads a whole trust store: about 25 ms of CPU here. `client.add` probes a
blob's URLs with a short-lived `Origin`, whose two httpx transports and thread transport built
three, so every part the registrar declared waited about 75 ms before its first request. The
contexts are only read once built, which makes sharing them across threads and trio runs safe.
A trust store changed while a process runs (or SSL_CERT_FILE set later) is seen after a restart.
"""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def httpx_default() -> ssl.SSLContext:
    """What httpx builds for `verify=True`: certifi's CAs, or SSL_CERT_FILE / SSL_CERT_DIR."""
    return httpx.create_ssl_context()


@functools.cache
def system_default() -> ssl.SSLContext:
    """The system's trust store, as `http.client` uses it (the thread transport)."""
    return ssl.create_default_context()
