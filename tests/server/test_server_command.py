"""The `raresignal server` command: where its settings come from, and a bad rules file
stopping it with a clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from raresignal.server.cli import _server_config, build_parser, server_settings


def test_server_help_teaches_with_examples() -> None:
    result = subprocess.run([sys.executable, "-m", "raresignal.server.cli", "server", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "examples:" in result.stdout and "--ready-file" in result.stdout


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


def test_bad_rules_file_stops_the_cli_with_a_clear_message(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: [{alert: X, metric: nope, op: '<', threshold: 1}]\n")
    result = subprocess.run(
        [sys.executable, "-m", "raresignal.server.cli", "server", "--rules", str(rules),
         "--db", ":memory:", "--grpc-port", "0", "--metrics-port", "0", "--health-port", "0"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown metric 'nope'" in result.stderr


def test_alertmanager_secrets_are_files_named_by_flags_or_variables(tmp_path: Path) -> None:
    args = build_parser().parse_args(["server", "--alertmanager-url", "https://am:9093",
                                      "--alertmanager-username", "raresignal"])
    environ = {"RARESIGNAL_ALERTMANAGER_PASSWORD_FILE": "/run/secrets/am-password",
               "RARESIGNAL_ALERTMANAGER_CA_FILE": "/run/secrets/am-ca.pem"}
    config = _server_config(server_settings(args, environ), environ)
    assert (config.alertmanager_url, config.alertmanager_username,
            config.alertmanager_password_file, config.alertmanager_ca_file,
            config.alertmanager_bearer_token_file) == (
        "https://am:9093", "raresignal", "/run/secrets/am-password", "/run/secrets/am-ca.pem",
        None)
    with pytest.raises(SystemExit):  # no flag takes a secret itself
        build_parser().parse_args(["server", "--alertmanager-password", "x"])


def test_unusable_alertmanager_settings_stop_the_cli_without_showing_the_secret(
        tmp_path: Path) -> None:
    password = tmp_path / "am-password"
    password.write_text("Zq9-secret\n")
    result = subprocess.run(
        [sys.executable, "-m", "raresignal.server.cli", "server", "--db", ":memory:",
         "--grpc-port", "0", "--metrics-port", "0", "--health-port", "0",
         "--alertmanager-url", "http://127.0.0.1:1", "--alertmanager-password-file",
         str(password)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "needs both a username and a password file" in result.stderr
    assert "Zq9" not in result.stdout + result.stderr


@pytest.mark.parametrize(("db", "says"), [
    ("postgresql://rs:hunter2@127.0.0.1:1/rs", "RARESIGNAL_DB_PASSWORD_FILE"),
    ("postgresql://rs@127.0.0.1:1/rs", "cannot open the PostgreSQL database"),
    ("{tmp}/no-such-folder/rs.db", "cannot open the SQLite database"),
])
def test_a_database_that_cannot_be_opened_stops_the_cli_with_one_line(
        tmp_path: Path, db: str, says: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "raresignal.server.cli", "server", "--db",
         db.format(tmp=tmp_path), "--grpc-port", "0", "--metrics-port", "0",
         "--health-port", "0"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr
