"""PostgreSQL schema migrations on a real database: from empty, on an up-to-date schema,
two servers starting together, and a schema newer than the server."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from postgres_cluster import Cluster

from raresignal.server.storage.migrate import (
    MIGRATION_LOCK_KEY,
    Migration,
    migrate,
    schema_version,
    shipped_migrations,
)
from raresignal.server.storage.postgres import PostgresStorage

TABLES = {"runs", "series", "samples", "sender_sequences", "rule_states", "alerts",
          "alert_history", "schema_version", "run_leases", "evaluation_queue",
          "samples_default", "replicas"}


def _connect(cluster: Cluster, dbname: str) -> psycopg.Connection:
    return psycopg.connect(cluster.admin_conninfo(dbname), autocommit=True)


def _tables(conn: psycopg.Connection) -> set[str]:
    return {row[0] for row in conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def test_the_shipped_migrations_are_numbered_from_one() -> None:
    migrations = shipped_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].name == "0001_initial.sql"


def test_an_empty_database_is_migrated_and_a_restart_applies_nothing(
        postgres_cluster: Cluster, postgres_db: str) -> None:
    with _connect(postgres_cluster, postgres_db) as conn:
        assert _tables(conn) == set()
        shipped = [m.version for m in shipped_migrations()]
        assert migrate(conn) == shipped
        assert _tables(conn) == TABLES
        assert schema_version(conn) == shipped[-1]
        assert migrate(conn) == []
    # A server starting on the up-to-date database keeps its data.
    first = PostgresStorage(postgres_cluster.admin_conninfo(postgres_db))
    first.close()
    with _connect(postgres_cluster, postgres_db) as conn:
        assert [row[0] for row in conn.execute("SELECT version FROM schema_version")] == \
            shipped


def test_a_new_migration_is_applied_once_on_top(postgres_cluster: Cluster,
                                                postgres_db: str) -> None:
    extra = Migration(len(shipped_migrations()) + 1, "0099_extra.sql",
                      "ALTER TABLE runs ADD COLUMN owner TEXT NOT NULL DEFAULT '';")
    with _connect(postgres_cluster, postgres_db) as conn:
        migrate(conn)
        assert migrate(conn, [*shipped_migrations(), extra]) == [extra.version]
        assert migrate(conn, [*shipped_migrations(), extra]) == []
        assert conn.execute("SELECT count(*) FROM information_schema.columns "
                            "WHERE table_name = 'runs' AND column_name = 'owner'"
                            ).fetchone() == (1,)


def test_a_failing_migration_leaves_the_schema_as_it_was(postgres_cluster: Cluster,
                                                         postgres_db: str) -> None:
    broken = Migration(len(shipped_migrations()) + 1, "0099_broken.sql",
                       "CREATE TABLE half (x INT); SELECT no_such_function();")
    with _connect(postgres_cluster, postgres_db) as conn:
        migrate(conn)
        with pytest.raises(psycopg.errors.UndefinedFunction):
            migrate(conn, [*shipped_migrations(), broken])
        assert "half" not in _tables(conn)
        assert schema_version(conn) == len(shipped_migrations())


def test_servers_starting_together_apply_each_migration_once(
        postgres_cluster: Cluster, postgres_db: str) -> None:
    # The first holds the advisory lock while the others start theirs, so they all meet
    # at the lock: without it, they would all see an empty database and create the tables.
    applied: list[list[int]] = []
    errors: list[BaseException] = []
    lock_holder = _connect(postgres_cluster, postgres_db)
    lock_holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))

    def start() -> None:
        try:
            with _connect(postgres_cluster, postgres_db) as conn:
                applied.append(migrate(conn))
        except BaseException as error:  # reported below, on the test's thread
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for thread in threads:
        thread.start()
    with _connect(postgres_cluster, postgres_db) as watcher:
        _wait_for_lock_waiters(watcher, len(threads))
    lock_holder.close()  # releases the lock
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert sorted(applied, key=len) == [[], [], [m.version for m in shipped_migrations()]]


def _wait_for_lock_waiters(conn: psycopg.Connection, count: int) -> None:
    """Blocks until ``count`` sessions wait on an advisory lock (a deadline, not a sleep)."""
    deadline = time.monotonic() + 30
    while True:
        row = conn.execute("SELECT count(*) FROM pg_locks "
                           "WHERE locktype = 'advisory' AND NOT granted").fetchone()
        if row and row[0] >= count:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} sessions never waited on the migration lock")
        time.sleep(0.02)


def test_a_schema_newer_than_the_server_is_refused(postgres_cluster: Cluster,
                                                   postgres_db: str) -> None:
    with _connect(postgres_cluster, postgres_db) as conn:
        migrate(conn)
        conn.execute("INSERT INTO schema_version (version, name) VALUES (999, 'future')")
        with pytest.raises(RuntimeError, match="newer than this server knows"):
            migrate(conn)


def test_the_replica_tables_are_added_to_a_database_of_the_previous_version(
        postgres_cluster: Cluster, postgres_db: str) -> None:
    previous = [m for m in shipped_migrations() if m.version < 3]
    with _connect(postgres_cluster, postgres_db) as conn:
        assert migrate(conn, previous) == [1, 2]
        conn.execute("INSERT INTO runs VALUES ('r1', 'job', 1, 1, 1.0, 1.0, 5, 0.0, '{}', "
                     "'{}', '', 0.0)")
        for _ in range(2):  # a copy, as two writers could leave before this version
            conn.execute("INSERT INTO alert_history VALUES ('al1', 0, 2, 1.0, 500.0, 5)")
        conn.execute("INSERT INTO alert_history VALUES ('al1', 2, 3, 2.0, 1.0, 9)")
        assert 3 in migrate(conn)
        assert {"run_leases", "evaluation_queue"} <= _tables(conn)
        assert conn.execute("SELECT run_id, last_step FROM runs").fetchall() == [("r1", 5)]
        # One of the copies stays, and a transition cannot be written a second time.
        assert conn.execute("SELECT state, step FROM alert_history ORDER BY state"
                            ).fetchall() == [(2, 5), (3, 9)]
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO alert_history VALUES ('al1', 0, 2, 2.0, 500.0, 5)")


def test_samples_of_the_previous_version_move_into_daily_partitions(
        postgres_cluster: Cluster, postgres_db: str) -> None:
    previous = [m for m in shipped_migrations() if m.version < 4]
    day = 86_400.0
    with _connect(postgres_cluster, postgres_db) as conn:
        assert migrate(conn, previous) == [1, 2, 3]
        conn.execute("INSERT INTO runs VALUES ('r1', 'job', 1, 1, 1.0, 1.0, 5, 0.0, '{}', "
                     "'{}', '', 0.0)")
        conn.execute("INSERT INTO series (run_id, metric, labels) VALUES ('r1', 'loss', '{}')")
        conn.execute("INSERT INTO samples VALUES (1, 1, 0.5, %s), (1, 2, 0.25, %s), "
                     "(1, 3, 0.125, %s)", (20_000 * day + 5, 20_000 * day + 6, 20_001 * day))
        assert 4 in migrate(conn)
        children = {row[0]: row[1] for row in conn.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'samples'::regclass")}
        assert set(children) == {"samples_default", "samples_20241004", "samples_20241005"}
        assert children["samples_default"] == "DEFAULT"
        assert conn.execute("SELECT count(*) FROM samples_20241004").fetchone() == (2,)
        assert conn.execute("SELECT step, value FROM samples ORDER BY step").fetchall() == [
            (1, 0.5), (2, 0.25), (3, 0.125)]
        assert "samples_unpartitioned" not in _tables(conn)
