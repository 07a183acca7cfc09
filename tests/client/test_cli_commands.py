"""The `raresignal` command: its help, a real server run through it and queried with
`runs` and `alerts`, and the client commands on an install without the server extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from cli_runner import CLI_WITHOUT, SERVER_EXTRA_AND_TORCH, cli_without
from reporting import report_run

from raresignal.server.process import ServerProcess


def _cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "raresignal.client.cli", *argv],
                          capture_output=True, text=True, timeout=60, env=env)


def test_help_teaches_with_examples() -> None:
    for argv in (["--help"], ["server", "--help"], ["runs", "--help"], ["alerts", "--help"]):
        result = _cli(*argv)
        assert result.returncode == 0, result.stderr
        assert "examples:" in result.stdout
    assert "--ready-file" in _cli("server", "--help").stdout


def test_cli_server_runs_and_answers_runs_and_alerts(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    env = {**os.environ, "RARESIGNAL_TOKENS": "cli-token=cli-*"}
    server = subprocess.Popen(
        [sys.executable, "-m", "raresignal.client.cli", "server", "--db",
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
        run_id = report_run(endpoints["grpc"], "cli-run", [("nonfinite_values", 1, 2.0)],
                            token="cli-token")

        def cli(*argv: str) -> subprocess.CompletedProcess[str]:
            return _cli(*argv, "--server", endpoints["grpc"],
                        env={**os.environ, "RARESIGNAL_TOKEN": "cli-token"})

        runs = cli("runs")
        assert runs.returncode == 0, runs.stderr
        assert run_id in runs.stdout and "cli-run" in runs.stdout and "active" in runs.stdout
        alerts = cli("alerts", "--state", "firing")
        assert alerts.returncode == 0, alerts.stderr
        assert "NonFiniteGradients" in alerts.stdout and "firing" in alerts.stdout
        denied = _cli("runs", "--server", endpoints["grpc"], "--token", "wrong")
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr

        # A server on free ports is found through its ready file; finished runs are
        # counted, and listed with --all.
        done = report_run(endpoints["grpc"], "cli-done", [("loss", 1, 0.5)],
                          token="cli-token", finished=True)
        by_ready_file = {**os.environ, "RARESIGNAL_TOKEN": "cli-token"}
        listed = _cli("runs", "--ready-file", str(ready), env=by_ready_file)
        assert listed.returncode == 0, listed.stderr
        assert run_id in listed.stdout and done not in listed.stdout
        assert "(1 finished run not shown; --all lists them)" in listed.stdout
        every = _cli("runs", "--all", "--ready-file", str(ready), env=by_ready_file)
        assert done in every.stdout and "completed" in every.stdout
        assert "not shown" not in every.stdout
        unreadable = _cli("runs", "--ready-file", str(tmp_path / "missing.json"))
        assert unreadable.returncode == 2 and "ready file" in unreadable.stderr
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output
    assert "raresignal server listening: grpc=127.0.0.1:" in output
    assert "raresignal server stopped" in output


def test_client_commands_run_without_the_server_extra_or_torch(tmp_path: Path) -> None:
    with ServerProcess(tmp_path / "rs.db", tmp_path).start() as server:
        run_id = report_run(server.grpc_target, "lean-run", [("nonfinite_values", 1, 3.0)])
        runs = cli_without(SERVER_EXTRA_AND_TORCH, "runs", "--server", server.grpc_target)
        assert runs.returncode == 0, runs.stderr
        assert run_id in runs.stdout and "lean-run" in runs.stdout
        alerts = cli_without(SERVER_EXTRA_AND_TORCH, "alerts", "--state", "firing",
                              "--server", server.grpc_target)
        assert alerts.returncode == 0, alerts.stderr
        assert "NonFiniteGradients" in alerts.stdout and "lean-run" in alerts.stdout

    for argv in (["--help"], ["alerts", "--help"]):
        helped = cli_without(SERVER_EXTRA_AND_TORCH, *argv)
        assert helped.returncode == 0 and "examples:" in helped.stdout, helped.stderr
    assert "raresignal[server]" in cli_without(SERVER_EXTRA_AND_TORCH, "--help").stdout
    refused = cli_without(SERVER_EXTRA_AND_TORCH, "server", "--db", str(tmp_path / "x.db"))
    assert refused.returncode == 2
    assert "pip install 'raresignal[server]'" in refused.stderr
    assert "'yaml'" in refused.stderr


def test_the_blocker_makes_a_module_look_uninstalled() -> None:
    """The checks above must be able to fail: a client that imported torch would."""
    code = CLI_WITHOUT.format(blocked=["grpc"])
    result = subprocess.run([sys.executable, "-c", code, "runs"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "No module named 'grpc" in result.stderr


def test_client_commands_leave_the_server_unloaded() -> None:
    """`runs` and `alerts` start without importing the server, even where it is installed;
    `server` itself and the command list load it."""
    code = textwrap.dedent("""
        import sys
        from raresignal.client.cli import main
        try:
            main(sys.argv[1:])
        except SystemExit:
            pass
        print('server loaded' if 'raresignal.server.cli' in sys.modules else 'server unloaded')
    """)

    def loaded(*argv: str) -> str:
        result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                                text=True, timeout=60)
        return result.stdout.strip().splitlines()[-1]

    assert loaded("runs", "--server", "127.0.0.1:1") == "server unloaded"
    assert loaded("alerts", "--help") == "server unloaded"
    assert loaded("server", "--help") == "server loaded"
    assert loaded("--help") == "server loaded"
