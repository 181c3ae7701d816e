"""imgstore's layers, checked from the source: the cache counts without an HTTP server, and the
origin's protocol is decided in one module that does no I/O."""

from __future__ import annotations

from tests.test_architecture import _imports, _modules


def _importing(prefix: str) -> set[str]:
    return {
        name
        for name, tree in _modules("imgstore").items()
        if any(i == prefix or i.startswith(prefix + ".") for i in _imports(tree))
    }


def test_only_the_metrics_listener_imports_an_http_server() -> None:
    assert _importing("hypercorn") == {"imgstore.metrics_listener"}


def test_the_origin_rules_import_no_transport() -> None:
    rules = _imports(_modules("imgstore")["imgstore.origin"])
    assert not {i.split(".")[0] for i in rules} & {"httpx", "httpcore", "http", "socket", "trio"}
