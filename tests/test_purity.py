"""The pure core stays pure (DESIGN.md section 1, habit 1): the DUL codec, the policy engine and the
identity code never import I/O, clocks, process state or metrics, directly or through another
proxy module. Checked from the source with `ast`, so nothing is imported to find out."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "proxy"

FORBIDDEN = frozenset(
    {
        "asyncio",
        "socket",
        "ssl",
        "logging.config",
        "prometheus_client",
        "time",
        "os",
        # the same kind of thing by other names
        "selectors",
        "threading",
        "subprocess",
    }
)


def pure_files() -> list[Path]:
    """proxy/dul/, and proxy/policy/ and proxy/identity.py once they exist."""
    files = sorted((PACKAGE / "dul").rglob("*.py"))
    files += sorted((PACKAGE / "policy").rglob("*.py"))
    identity = PACKAGE / "identity.py"
    if identity.exists():
        files.append(identity)
    return files


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_in(source: str, package: list[str]) -> set[str]:
    """Every module the import statements in `source` name, relative imports resolved against
    `package`, and `from x import y` counted as both `x` and `x.y` (y may be a submodule, as in
    `from logging import config`). Calls to __import__/import_module are reported by name."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id == "__import__":
                names.add("__import__")  # dynamic imports would defeat this check
            elif isinstance(func, ast.Attribute) and func.attr == "import_module":
                names.add("importlib.import_module")
    return names


def imported_modules(path: Path) -> set[str]:
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    return imports_in(path.read_text(encoding="utf-8"), package)


def _forbidden_in(names: set[str]) -> set[str]:
    bad: set[str] = set()
    for name in names:
        for forbidden in FORBIDDEN:
            if name == forbidden or name.startswith(forbidden + "."):
                bad.add(name)
    return bad | (names & {"__import__", "importlib.import_module", "importlib"})


def _proxy_module_file(name: str) -> Path | None:
    """The file of a proxy.* module named in an import, or None (a class or function name)."""
    if name != "proxy" and not name.startswith("proxy."):
        return None
    rel = Path(*name.split("."))
    for candidate in (ROOT / rel.with_suffix(".py"), ROOT / rel / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def transitive_proxy_files(path: Path) -> set[Path]:
    """`path` and every proxy module it reaches through imports."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for name in imported_modules(current):
            target = _proxy_module_file(name)
            if target is not None:
                todo.append(target)
            # importing proxy.dul.items also runs proxy/__init__.py and proxy/dul/__init__.py
            parts = name.split(".")
            for i in range(1, len(parts)):
                parent = _proxy_module_file(".".join(parts[:i]))
                if parent is not None:
                    todo.append(parent)
    return seen


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_pure_core_is_found() -> None:
    names = {_rel(p) for p in pure_files()}
    assert {"proxy/dul/framer.py", "proxy/dul/items.py", "proxy/dul/machine.py", "proxy/dul/pdus.py"} <= names


@pytest.mark.parametrize("path", pure_files(), ids=_rel)
def test_no_forbidden_import(path: Path) -> None:
    assert _forbidden_in(imported_modules(path)) == set()


@pytest.mark.parametrize("path", pure_files(), ids=_rel)
def test_no_forbidden_import_through_other_proxy_modules(path: Path) -> None:
    offenders = {
        _rel(file): sorted(bad)
        for file in transitive_proxy_files(path)
        if (bad := _forbidden_in(imported_modules(file)))
    }
    assert offenders == {}


def test_importing_the_codec_loads_no_network_modules() -> None:
    """The same at run time, in a fresh interpreter (os/time are left out: the stdlib loads them)."""
    modules = [_module_name(p) for p in pure_files()]
    code = (
        "import sys\n"
        f"for name in {modules!r}:\n"
        "    __import__(name)\n"
        "print(' '.join(sorted(m for m in ('asyncio', 'socket', 'ssl', 'selectors', 'prometheus_client',"
        " 'logging.config', 'threading') if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.split() == []


# ------------------------------------------------------------------------------- the checker itself


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("import asyncio", {"asyncio"}),
        ("import os.path", {"os.path"}),
        ("from time import monotonic", {"time", "time.monotonic"}),
        ("from logging import config", {"logging.config"}),
        ("import logging.config as lc", {"logging.config"}),
        ("from prometheus_client import Counter", {"prometheus_client", "prometheus_client.Counter"}),
        ("import ssl, struct", {"ssl"}),
        ("def f():\n    import socket", {"socket"}),
        ("__import__('socket')", {"__import__"}),
        ("import importlib\nimportlib.import_module('ssl')", {"importlib", "importlib.import_module"}),
        ("from .. import errors", set()),
        ("from . import items\nfrom .items import first", set()),
        ("import logging\nimport timeit\nimport ossaudiodev\nfrom dataclasses import field", set()),
    ],
)
def test_checker_finds_forbidden_imports(source: str, found: set[str]) -> None:
    assert _forbidden_in(imports_in(source, ["proxy", "dul"])) == found


def test_relative_imports_are_resolved() -> None:
    assert imports_in("from .. import errors", ["proxy", "dul"]) == {"proxy", "proxy.errors"}
    assert imports_in("from .items import first", ["proxy", "dul"]) == {"proxy.dul.items", "proxy.dul.items.first"}
    assert imports_in("from . import x", ["proxy"]) == {"proxy", "proxy.x"}
    names = imported_modules(PACKAGE / "dul" / "pdus.py")
    assert "proxy.dul.items" in names and "proxy.errors" in names
    reached = {_rel(p) for p in transitive_proxy_files(PACKAGE / "dul" / "pdus.py")}
    assert {"proxy/__init__.py", "proxy/dul/__init__.py", "proxy/dul/items.py", "proxy/errors.py"} <= reached
