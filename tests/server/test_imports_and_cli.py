"""The server imports without torch, and the `raresignal` command runs a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import Client, batch, sample

from raresignal.server.cli import build_parser, server_settings

BLOCK_TORCH = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in {'torch', 'lightning', 'pytorch_lightning'}:
                raise ImportError(name + ' is blocked')
            return None
    sys.meta_path.insert(0, Block())
""")


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)


def test_server_imports_without_torch() -> None:
    modules = ["app", "cli", "engine", "ledger", "service", "sqlite_store", "metrics",
               "alertmanager", "auth", "rules"]
    code = BLOCK_TORCH + "".join(f"import raresignal.server.{m}\n" for m in modules)
    code += "assert 'torch' not in sys.modules\n"
    result = _python(code)
    assert result.returncode == 0, result.stderr
    blocked = _python(BLOCK_TORCH + "import torch\n")  # the blocker itself works
    assert blocked.returncode != 0 and "blocked" in blocked.stderr


def test_help_teaches_with_examples() -> None:
    for argv in (["--help"], ["server", "--help"], ["runs", "--help"], ["alerts", "--help"]):
        result = subprocess.run([sys.executable, "-m", "raresignal.server.cli", *argv],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "examples:" in result.stdout
    assert "--ready-file" in subprocess.run(
        [sys.executable, "-m", "raresignal.server.cli", "server", "--help"],
        capture_output=True, text=True, timeout=60).stdout


def test_settings_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "server.yaml"
    file.write_text("db: from-file.db\ngrpc-port: 1111\nmetrics_port: 2222\n")
    args = build_parser().parse_args(["server", "--config", str(file), "--grpc-port", "3333"])
    settings = server_settings(args, {"RARESIGNAL_METRICS_PORT": "4444",
                                      "RARESIGNAL_DB": "from-env.db"})
    assert (settings["db"], settings["grpc_port"], settings["metrics_port"],
            settings["health_port"]) == ("from-env.db", 3333, 4444, 8081)
    file.write_text("colour: blue\n")
    with pytest.raises(SystemExit, match="unknown setting 'colour'"):
        server_settings(build_parser().parse_args(["server", "--config", str(file)]), {})


def test_cli_server_runs_and_answers_runs_and_alerts(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    env = {**os.environ, "RARESIGNAL_TOKENS": "cli-token=cli-*"}
    server = subprocess.Popen(
        [sys.executable, "-m", "raresignal.server.cli", "server", "--db",
         str(tmp_path / "cli.db"), "--host", "127.0.0.1", "--grpc-port", "0",
         "--metrics-port", "0", "--health-port", "0", "--ready-file", str(ready)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert server.poll() is None, server.stdout.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "server did not write its ready file"
            time.sleep(0.1)
        endpoints = json.loads(ready.read_text())
        assert set(endpoints) == {"grpc", "metrics", "health"}
        client = Client(endpoints["grpc"], token="cli-token")
        run_id = client.open_run("cli-run").run_id
        client.report([batch(run_id, 1, [sample("nonfinite_values", 1, 2.0)])])
        client.close()

        def cli(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "raresignal.server.cli", *argv, "--server",
                 endpoints["grpc"]], capture_output=True, text=True, timeout=60,
                env={**os.environ, "RARESIGNAL_TOKEN": "cli-token"})

        runs = cli("runs")
        assert runs.returncode == 0, runs.stderr
        assert run_id in runs.stdout and "cli-run" in runs.stdout and "active" in runs.stdout
        alerts = cli("alerts", "--state", "firing")
        assert alerts.returncode == 0, alerts.stderr
        assert "NonFiniteGradients" in alerts.stdout and "firing" in alerts.stdout
        denied = subprocess.run(
            [sys.executable, "-m", "raresignal.server.cli", "runs", "--server",
             endpoints["grpc"], "--token", "wrong"], capture_output=True, text=True,
            timeout=60)
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output
    assert "raresignal server listening: grpc=127.0.0.1:" in output
    assert "raresignal server stopped" in output


def test_bad_rules_file_stops_the_cli_with_a_clear_message(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: [{alert: X, metric: nope, op: '<', threshold: 1}]\n")
    result = subprocess.run(
        [sys.executable, "-m", "raresignal.server.cli", "server", "--rules", str(rules),
         "--db", ":memory:", "--grpc-port", "0", "--metrics-port", "0", "--health-port", "0"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown metric 'nope'" in result.stderr

