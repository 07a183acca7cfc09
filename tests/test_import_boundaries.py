"""The agent runs inside training jobs and the server in a slim image, so each must
import without the other's heavy dependencies."""

from __future__ import annotations

import subprocess
import sys
import textwrap

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
    result = _imports_with(blocked, ["raresignal.agent", "raresignal.agent.api"])
    assert result.returncode == 0, result.stderr


def test_blocker_really_blocks() -> None:
    """The check above must be able to fail: importing a blocked module fails."""
    result = _imports_with({"yaml"}, ["yaml"])
    assert result.returncode != 0 and "blocked in this test" in result.stderr


def test_server_imports_without_torch() -> None:
    result = _imports_with({"torch", "lightning", "pytorch_lightning", "transformers"},
                           ["raresignal.server", "raresignal.server.app", "raresignal.server.cli"])
    assert result.returncode == 0, result.stderr
