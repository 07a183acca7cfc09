"""PostgreSQL's samples in daily partitions on a real cluster: retention drops whole days
(no row is deleted), a sample of a day without a partition is kept and later moved into it,
re-reported steps still replace their row, and one replica at a time does the DDL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from postgres_cluster import Cluster
from server_support import wait_for

from raresignal.server.storage.base import RetentionPolicy
from raresignal.server.storage.migrate import migrate
from raresignal.server.storage.partitions import (
    DAY_SECONDS,
    DAYS_AHEAD,
    MAINTENANCE_LOCK_KEY,
    day_of,
    partition_name,
)
from raresignal.server.storage.postgres import PostgresStorage
from raresignal.server.storage.records import (
    BatchGroup,
    BatchWrite,
    CheckedSample,
    EngineWrites,
    RunRecord,
    newest_by_series,
)

DAY0 = 20_000  # 2024-10-04, a day number since the epoch
T0 = DAY0 * DAY_SECONDS + 3_600.0  # 01:00 on DAY0


@pytest.fixture
def admin(postgres_cluster: Cluster, postgres_db: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(postgres_cluster.admin_conninfo(postgres_db),
                         autocommit=True) as conn:
        yield conn


def _open(cluster: Cluster, dbname: str, max_age_days: int = 30) -> PostgresStorage:
    """A storage on the database, with run "r" in it."""
    store = PostgresStorage(cluster.admin_conninfo(dbname),
                            RetentionPolicy(max_age_days=max_age_days))
    if store.run("r") is None:
        store.create_run(_run())
    return store


def _run() -> RunRecord:
    return RunRecord(run_id="r", run_name="n", state=1, world_size=1, created_at=T0,
                     updated_at=T0, last_step=0, report_interval_seconds=1.0, config={},
                     tags={}, agent_version="1", finished_at=0.0)


def _store(store: PostgresStorage, sequence: int, points: list[tuple[int, float]]) -> None:
    """Stores ``loss`` = step at each (step, wall time), as sender "s"."""
    samples = [CheckedSample("loss", "{}", step, float(step), wall) for step, wall in points]
    newest = newest_by_series(samples)
    group = BatchGroup()
    group.add(BatchWrite(_run(), "s", sequence, samples, EngineWrites(), newest), set(newest))
    store.apply_group(group)


def _partitions(admin: psycopg.Connection) -> dict[str, int]:
    """Each partition of samples and its row count. The server may drop a partition
    between the listing and its count (counting through the parent instead can deadlock
    with the drop): then the listing is read again."""
    while True:
        names = [row[0] for row in admin.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'samples'::regclass")]
        try:
            return {name: admin.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]
                    for name in names}
        except psycopg.errors.UndefinedTable:
            continue


def _record_deletes(admin: psycopg.Connection) -> None:
    """Logs every row deleted from any partition of samples (the trigger is cloned onto
    partitions attached later too)."""
    admin.execute("CREATE TABLE deleted_from (partition TEXT NOT NULL)")
    admin.execute("CREATE FUNCTION log_delete() RETURNS trigger LANGUAGE plpgsql AS $$ "
                  "BEGIN INSERT INTO deleted_from VALUES (TG_TABLE_NAME); RETURN OLD; END $$")
    admin.execute("CREATE TRIGGER log_delete AFTER DELETE ON samples "
                  "FOR EACH ROW EXECUTE FUNCTION log_delete()")


def _deleted(admin: psycopg.Connection) -> list[str]:
    return [row[0] for row in admin.execute("SELECT partition FROM deleted_from")]


def test_partition_names_round_trip() -> None:
    assert partition_name(DAY0) == "samples_20241004"
    assert day_of("samples_20241004") == DAY0
    assert day_of("samples_default") is None


def test_old_days_are_dropped_whole_and_newer_ones_kept(
        postgres_cluster: Cluster, postgres_db: str, admin: psycopg.Connection) -> None:
    store = _open(postgres_cluster, postgres_db, max_age_days=30)
    try:
        changes = store.maintain(T0)
        assert changes is not None
        assert changes.created == list(range(DAY0, DAY0 + DAYS_AHEAD + 1))
        _record_deletes(admin)
        _store(store, 1, [(1, T0), (2, T0 + DAY_SECONDS)])  # DAY0 and DAY0 + 1
        later = T0 + 31 * DAY_SECONDS  # DAY0 + 1 ended 29 days and 23 hours before
        _store(store, 2, [(3, later)])  # a new day's time: its partition does not exist yet
        assert _partitions(admin)["samples_default"] == 1
        changes = store.maintain(later)
        assert changes is not None
        assert changes.dropped == [DAY0]
        assert changes.created == list(range(DAY0 + 31, DAY0 + 31 + DAYS_AHEAD + 1))
        partitions = _partitions(admin)
        assert partition_name(DAY0) not in partitions
        assert partitions[partition_name(DAY0 + 1)] == 1
        assert partitions[partition_name(DAY0 + 31)] == 1  # moved out of the default
        assert partitions["samples_default"] == 0
        # The dropped day left by DROP TABLE: the only deleted row is the one moved out of
        # the default partition.
        assert _deleted(admin) == ["samples_default"]
        assert [p.step for p in store.get_series("r", "loss", "{}", 0)] == [2, 3]
        latest = store.latest_values()
        assert [(v.step, v.value) for v in latest] == [(3, 3.0)]
        assert store.maintain(later) == type(changes)([], [])  # nothing left to do
    finally:
        store.close()


def test_no_retention_age_keeps_every_day(postgres_cluster: Cluster, postgres_db: str,
                                          admin: psycopg.Connection) -> None:
    store = _open(postgres_cluster, postgres_db, max_age_days=0)
    try:
        store.maintain(T0)
        _store(store, 1, [(1, T0)])
        changes = store.maintain(T0 + 400 * DAY_SECONDS)
        assert changes is not None and changes.dropped == []
        assert _partitions(admin)[partition_name(DAY0)] == 1
    finally:
        store.close()


def test_a_re_reported_step_replaces_its_row_across_days(
        postgres_cluster: Cluster, postgres_db: str, admin: psycopg.Connection) -> None:
    store = _open(postgres_cluster, postgres_db)
    try:
        store.maintain(T0)
        _store(store, 1, [(1, T0), (2, T0)])
        # Step 1 again a day later (a resumed run): one row for it, in the later day.
        _store(store, 2, [(1, T0 + DAY_SECONDS), (3, T0 + DAY_SECONDS)])
        points = store.get_series("r", "loss", "{}", 0)
        assert [(p.step, p.wall_time) for p in points] == [
            (1, T0 + DAY_SECONDS), (2, T0), (3, T0 + DAY_SECONDS)]
        partitions = _partitions(admin)
        assert partitions[partition_name(DAY0)] == 1
        assert partitions[partition_name(DAY0 + 1)] == 2
    finally:
        store.close()


def test_a_replica_skips_the_round_another_one_holds(
        postgres_cluster: Cluster, postgres_db: str, admin: psycopg.Connection) -> None:
    first = _open(postgres_cluster, postgres_db)
    second = _open(postgres_cluster, postgres_db)
    try:
        # Another replica in the middle of its round holds the lock: this one does no DDL.
        with psycopg.connect(postgres_cluster.admin_conninfo(postgres_db)) as holder:
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (MAINTENANCE_LOCK_KEY,))
            assert first.maintain(T0) is None
            assert second.maintain(T0) is None
            assert set(_partitions(admin)) == {"samples_default"}
            holder.rollback()
        done = first.maintain(T0)
        assert done is not None and len(done.created) == DAYS_AHEAD + 1
        again = second.maintain(T0)  # finds the first one's work done
        assert again is not None and again.created == [] and again.dropped == []
    finally:
        first.close()
        second.close()


def test_a_server_started_with_retention_days_prepares_and_drops_partitions(
        postgres_cluster: Cluster, postgres_db: str, admin: psycopg.Connection,
        password_file: Path) -> None:
    from raresignal.server.cli import _server_config, build_parser, server_settings
    from raresignal.server.serving.app import start_in_thread

    args = build_parser().parse_args([
        "server", "--db", postgres_cluster.url(postgres_db), "--retention-days", "7",
        "--grpc-port", "0", "--metrics-port", "0", "--health-port", "0"])
    config = _server_config(server_settings(args, {}), {})
    assert config.retention.max_age_days == 7
    migrate(admin)
    today = int(time.time() // DAY_SECONDS)
    old = partition_name(today - 9)
    admin.execute(f"CREATE TABLE {old} PARTITION OF samples FOR VALUES FROM "
                  f"({(today - 9) * DAY_SECONDS}) TO ({(today - 8) * DAY_SECONDS})")
    handle = start_in_thread(config)
    try:
        # The first round runs at start: today's partition made, the old day's dropped.
        wait_for(lambda: partition_name(today) in _partitions(admin), timeout=30)
        wait_for(lambda: old not in _partitions(admin), timeout=30)
    finally:
        handle.stop()
