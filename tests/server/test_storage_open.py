"""Choosing the backend by URL, and where a PostgreSQL password may come from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from postgres_cluster import PASSWORD, Cluster

from raresignal.server.serving.app import ServerConfig
from raresignal.server.storage.open import (
    PASSWORD_FILE_ENV,
    StorageOpenError,
    open_storage,
    sqlite_path,
)
from raresignal.server.storage.postgres import PostgresStorage
from raresignal.server.storage.records import RunRecord
from raresignal.server.storage.sqlite import SQLiteStorage


def _run(run_id: str) -> RunRecord:
    return RunRecord(run_id=run_id, run_name="n", state=1, world_size=1, created_at=1.0,
                     updated_at=1.0, last_step=0, report_interval_seconds=0.0)


@pytest.mark.parametrize(("url", "path"), [
    ("raresignal.db", "raresignal.db"),
    ("/data/rs.db", "/data/rs.db"),
    (":memory:", ":memory:"),
    ("sqlite:///relative/rs.db", "relative/rs.db"),
    ("sqlite:////data/rs.db", "/data/rs.db"),
    ("sqlite://", ":memory:"),
])
def test_sqlite_urls_and_paths(url: str, path: str) -> None:
    assert sqlite_path(url) == path


def test_a_sqlite_url_opens_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_storage("sqlite:///rs.db")
    assert isinstance(store, SQLiteStorage)
    store.create_run(_run("r"))
    store.close()
    assert (tmp_path / "rs.db").exists()
    with pytest.raises(StorageOpenError, match="sqlite:///path"):
        open_storage("sqlite://host/rs.db")


@pytest.mark.parametrize("url", [
    "postgresql://raresignal:hunter2@127.0.0.1:5432/rs",
    "postgres://raresignal:hunter2@127.0.0.1/rs",
    "postgresql://raresignal@127.0.0.1/rs?password=hunter2",
])
def test_a_password_in_the_url_is_refused_with_the_safe_alternatives(url: str) -> None:
    with pytest.raises(StorageOpenError) as refused:
        open_storage(url)
    message = str(refused.value)
    assert all(name in message for name in (PASSWORD_FILE_ENV, "PGPASSWORD", "PGPASSFILE"))
    assert "hunter2" not in message


def test_the_password_comes_from_the_password_file(postgres_cluster: Cluster,
                                                   postgres_db: str,
                                                   password_file: Path) -> None:
    # The URL reaches the cluster over TCP, where it asks for the password (scram).
    store = ServerConfig(db_path=postgres_cluster.url(postgres_db)).open_storage()
    assert isinstance(store, PostgresStorage)
    store.create_run(_run("r"))
    assert [r.run_id for r in store.list_runs(include_finished=True)] == ["r"]
    store.close()
    password_file.write_text("wrong\n")
    with pytest.raises(StorageOpenError, match="password authentication failed"):
        open_storage(postgres_cluster.url(postgres_db))


def test_libpq_finds_the_password_itself_without_the_file(
        postgres_cluster: Cluster, postgres_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_FILE_ENV, raising=False)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    with pytest.raises(StorageOpenError):
        open_storage(postgres_cluster.url(postgres_db))
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{postgres_cluster.port}:*:*:{PASSWORD}\n")
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    open_storage(postgres_cluster.url(postgres_db)).close()
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    open_storage(postgres_cluster.url(postgres_db)).close()


def test_the_server_command_refuses_a_password_in_its_db_url() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "raresignal.server.cli", "server",
         "--db", "postgresql://raresignal:hunter2@127.0.0.1:1/rs", "--grpc-port", "0",
         "--metrics-port", "0", "--health-port", "0"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert PASSWORD_FILE_ENV in result.stderr
    assert "hunter2" not in result.stderr


def test_the_server_command_help_names_postgresql() -> None:
    result = subprocess.run([sys.executable, "-m", "raresignal.server.cli", "server", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "postgresql://" in result.stdout and PASSWORD_FILE_ENV in result.stdout
