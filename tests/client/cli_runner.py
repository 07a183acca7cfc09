"""The `raresignal` command run as on an install without some modules (the server extra,
torch, matplotlib): they look uninstalled, and the run fails if one is imported anyway."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SERVER_EXTRA_AND_TORCH = ("yaml", "prometheus_client", "grpc_health", "grpc_reflection",
                          "torch")

# Makes the blocked modules look uninstalled, as on an agent-only install, then runs the
# command line with the script's arguments.
CLI_WITHOUT = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = {blocked!r}
    class Uninstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in BLOCKED:
                raise ModuleNotFoundError(f'No module named {{name!r}}', name=name)
            return None
    sys.meta_path.insert(0, Uninstalled())
    from raresignal.client.cli import main
    code = main(sys.argv[1:])
    imported = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)
    assert not imported, imported
    sys.exit(code)
""")


def cli_without(blocked: tuple[str, ...], *argv: str) -> subprocess.CompletedProcess[str]:
    code = CLI_WITHOUT.format(blocked=sorted(blocked))
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                          text=True, timeout=60)
