"""The packages' import rules (ARCHITECTURE.md), enforced two ways.

Statically, every module of a package is read and each import it makes is checked against
what that package may not import. At run time, the agent, the server and the client are
imported with the other side's dependencies blocked, which also catches an import made
through a third module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Boundary:
    """Modules under ``folder`` (less ``except_folders``) may not import ``forbidden``
    (a name and everything under it); ``lazy_only`` names may be imported inside a
    function but not at module level."""

    folder: str
    forbidden: tuple[str, ...]
    lazy_only: tuple[str, ...] = ()
    except_folders: tuple[str, ...] = ()


BOUNDARIES = (
    Boundary("protos", ("raresignal.agent", "raresignal.client", "raresignal.server",
                        "raresignal.integrations", "raresignal.demo", "torch")),
    Boundary("server", ("torch", "raresignal.agent", "raresignal.client",
                        "raresignal.integrations", "raresignal.demo", "lightning",
                        "pytorch_lightning", "transformers")),
    Boundary("server/storage", ("raresignal.server.serving", "raresignal.server.alerting",
                                "raresignal.server.cli", "prometheus_client")),
    Boundary("server/alerting", ("raresignal.server.serving", "raresignal.server.cli")),
    Boundary("client", ("torch", "yaml", "prometheus_client", "raresignal.integrations",
                        "raresignal.demo"),
             lazy_only=("raresignal.server", "raresignal.agent")),
    Boundary("agent", ("raresignal.server", "raresignal.integrations", "raresignal.demo",
                       "lightning", "pytorch_lightning", "transformers", "yaml",
                       "prometheus_client")),
    Boundary("agent/estimators", ("raresignal.agent.sender", "raresignal.agent.spool",
                                  "raresignal.agent.monitor", "raresignal.client", "grpc")),
    Boundary("integrations", ("raresignal.server", "raresignal.demo")),
)


@dataclass(frozen=True)
class Import:
    module: str
    line: int
    top_level: bool


def imports_of(source: str, package: str) -> list[Import]:
    """Every import in ``source`` as an absolute module name; ``package`` resolves
    relative imports. ``top_level`` is False inside a function body."""
    found: list[Import] = []

    def visit(node: ast.AST, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(a.name, child.lineno, top_level) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    anchor = ".".join(parts[: len(parts) - child.level + 1])
                    base = f"{anchor}.{base}" if base else anchor
                found.extend(Import(f"{base}.{a.name}" if a.name != "*" else base,
                                    child.lineno, top_level) for a in child.names)
                found.append(Import(base, child.lineno, top_level))
            inner = top_level and not isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(ast.parse(source), True)
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(boundary: Boundary, module_imports: dict[str, list[Import]]) -> list[str]:
    found = []
    for where, imports in sorted(module_imports.items()):
        for imp in imports:
            if any(_within(imp.module, f) for f in boundary.forbidden):
                found.append(f"{where}:{imp.line} imports {imp.module}")
            elif imp.top_level and any(_within(imp.module, f) for f in boundary.lazy_only):
                found.append(f"{where}:{imp.line} imports {imp.module} at module level")
    return found


def _package_imports(boundary: Boundary) -> dict[str, list[Import]]:
    folder = ROOT / boundary.folder
    top = boundary.folder.split("/")[0]
    result = {}
    for path in folder.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if any(relative.is_relative_to(Path(e)) for e in boundary.except_folders):
            continue
        inner = path.relative_to(ROOT / top).with_suffix("")
        parts = [p for p in inner.parts if p != "__init__"]
        package = ".".join(["raresignal", top, *parts[:-1]] if path.name != "__init__.py"
                           else ["raresignal", top, *parts])
        result[str(relative)] = imports_of(path.read_text(), package)
    return result


@pytest.mark.parametrize("boundary", BOUNDARIES, ids=lambda b: b.folder)
def test_package_imports_only_what_it_may(boundary: Boundary) -> None:
    module_imports = _package_imports(boundary)
    assert module_imports, f"no modules found under {boundary.folder}"
    assert violations(boundary, module_imports) == []


def test_static_check_can_fail() -> None:
    """The checker must see forbidden imports in every form, and lazy ones for what it is."""
    source = textwrap.dedent(
        """
        import torch.nn
        from raresignal.agent import Monitor
        from ..agent.api import Probe

        def offer_server():
            from raresignal.server import cli
        from raresignal.server.serving import app
        """
    )
    found = imports_of(source, "raresignal.client")
    boundary = Boundary("client", ("torch", "raresignal.agent"),
                        lazy_only=("raresignal.server",))
    assert violations(boundary, {"m.py": found}) == [
        "m.py:2 imports torch.nn",
        "m.py:3 imports raresignal.agent.Monitor",
        "m.py:3 imports raresignal.agent",
        "m.py:4 imports raresignal.agent.api.Probe",
        "m.py:4 imports raresignal.agent.api",
        "m.py:8 imports raresignal.server.serving.app at module level",
        "m.py:8 imports raresignal.server.serving at module level",
    ]


BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {blocked!r}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in BLOCKED:
                raise ImportError(f'{{name}} is blocked in this test')
            return None
    sys.meta_path.insert(0, Block())
    """
)


def _imports_with(blocked: set[str], modules: list[str]) -> subprocess.CompletedProcess[str]:
    code = BLOCKER.format(blocked=sorted(blocked)) + "".join(f"import {m}\n" for m in modules)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_agent_imports_without_server_or_lightning_dependencies() -> None:
    blocked = {"lightning", "pytorch_lightning", "prometheus_client", "yaml",
               "grpc_health", "grpc_reflection", "transformers", "matplotlib"}
    result = _imports_with(blocked, ["raresignal.agent", "raresignal.agent.api",
                                     "raresignal.agent.estimators.default"])
    assert result.returncode == 0, result.stderr


def test_blocker_really_blocks() -> None:
    """The check above must be able to fail: importing a blocked module fails."""
    result = _imports_with({"yaml"}, ["yaml"])
    assert result.returncode != 0 and "blocked in this test" in result.stderr


def test_server_imports_without_torch() -> None:
    result = _imports_with({"torch", "lightning", "pytorch_lightning", "transformers"},
                           ["raresignal.server", "raresignal.server.serving.app",
                            "raresignal.server.cli"])
    assert result.returncode == 0, result.stderr


def test_client_imports_without_torch_or_server_extras() -> None:
    result = _imports_with({"torch", "yaml", "prometheus_client", "grpc_health",
                            "grpc_reflection"},
                           ["raresignal.client.cli", "raresignal.client.channels",
                            "raresignal.client.alert_watch"])
    assert result.returncode == 0, result.stderr
