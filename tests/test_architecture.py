"""The architecture, checked from the source: imports point one way, and each boundary has one
module that owns it.

- Inside `imgstore` and inside `registrar`, the module import graph has no cycle.
- Only the cloud backend modules (`registrar/clouds/`) import boto3/botocore or the OpenStack
  SDK (openstacksdk, keystoneauth1); only `imgstore/fs.py` knows pyfuse3's FUSEError.
- No module is over 500 lines and no function over 60, except an argument parser: a newcomer
  reads any one of them whole.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLOUD_SDKS = ("boto3", "botocore", "openstack", "keystoneauth1")


def _modules(package: str) -> dict[str, ast.Module]:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def _imports(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", ["imgstore", "registrar"])
def test_the_module_graph_has_no_cycle(package: str) -> None:
    modules = _modules(package)
    graph = {
        name: {i for i in _imports(tree) if i in modules} - {name} for name, tree in modules.items()
    }
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep) :] + [dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_only_the_cloud_backends_import_a_cloud_sdk() -> None:
    offenders = {
        name: sorted(i for i in _imports(tree) if i.split(".")[0] in CLOUD_SDKS)
        for package in ("imgstore", "registrar")
        for name, tree in _modules(package).items()
        if not name.startswith("registrar.clouds.")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    users = {
        name
        for name, tree in _modules("registrar").items()
        if any(i.split(".")[0] in CLOUD_SDKS for i in _imports(tree))
    }
    assert users == {"registrar.clouds.euca_api", "registrar.clouds.glance_api"}


def test_only_fs_knows_fuse_errors() -> None:
    knowing = {
        name
        for name, tree in _modules("imgstore").items()
        if any(
            isinstance(n, ast.Name | ast.Attribute)
            and getattr(n, "id", getattr(n, "attr", "")) == "FUSEError"
            for n in ast.walk(tree)
        )
    }
    assert knowing == {"imgstore.fs"}


MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
# An argument parser is a list of options, one call each: long, but nothing to follow.
_PARSER_CALLS = {"add_argument", "add_parser", "add_argument_group", "set_defaults"}


def _is_parser(func: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    calls = [
        n.func.attr
        for n in ast.walk(func)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    ]
    return sum(c in _PARSER_CALLS for c in calls) * 2 >= len(calls) > 0


@pytest.mark.parametrize("package", ["imgstore", "registrar"])
def test_no_module_or_function_is_too_long_to_read(package: str) -> None:
    long_modules = {
        str(path.relative_to(ROOT)): n
        for path in sorted((ROOT / package).rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long_modules == {}
    long_functions = {
        f"{name}.{node.name}": length
        for name, tree in _modules(package).items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (length := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES  # type: ignore[operator]
        and not _is_parser(node)
    }
    assert long_functions == {}
