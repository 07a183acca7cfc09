"""SQLite storage: WAL mode, exactly-once in one transaction, and bounded retention."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from raresignal.server.sqlite_store import RetentionPolicy, SQLiteStorage
from raresignal.server.storage import EngineWrites, RunRecord
from raresignal.server.validation import CheckedSample


def run(run_id: str = "r1") -> RunRecord:
    return RunRecord(run_id=run_id, run_name="n", state=1, world_size=1, created_at=0.0,
                     updated_at=0.0, last_step=0, report_interval_seconds=0.0)


def loss(step: int, value: float = 1.0) -> CheckedSample:
    return CheckedSample("loss", "{}", step, value, 0.0)


def test_file_database_uses_wal(tmp_path: Path) -> None:
    store = SQLiteStorage(str(tmp_path / "x.db"))
    with sqlite3.connect(tmp_path / "x.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_memory_database_works() -> None:
    store = SQLiteStorage(":memory:")
    store.create_run(run())
    assert store.apply_batch(run(), "s", 1, [loss(1)], EngineWrites())
    assert [p.step for p in store.get_series("r1", "loss", "{}", 0)] == [1]
    store.close()


def test_sequence_check_and_insert_are_one_transaction(tmp_path: Path) -> None:
    store = SQLiteStorage(str(tmp_path / "x.db"))
    store.create_run(run())
    assert store.apply_batch(run(), "s", 5, [loss(1)], EngineWrites())
    assert not store.apply_batch(run(), "s", 5, [loss(2)], EngineWrites())
    assert not store.apply_batch(run(), "s", 4, [loss(3)], EngineWrites())
    # A failure half way (a sample of an unknown run breaks the foreign key) stores nothing,
    # not even the sequence, so the sender may retry the batch.
    bad = run("ghost")
    with pytest.raises(sqlite3.IntegrityError):
        store.apply_batch(bad, "s", 1, [loss(9)], EngineWrites())
    assert store.sample_count() == 1 and store.last_sequence("ghost", "s") == 0
    store.close()
    reopened = SQLiteStorage(str(tmp_path / "x.db"))
    assert reopened.last_sequences("r1") == {"s": 5}
    reopened.close()


def test_retention_bounds_a_long_series_and_keeps_recent_steps_whole() -> None:
    policy = RetentionPolicy(full_resolution=100, thinned_capacity=50)
    store = SQLiteStorage(":memory:", policy)
    store.create_run(run())
    for sequence in range(1, 201):  # 2,000 steps in batches of 10
        steps = range((sequence - 1) * 10, sequence * 10)
        assert store.apply_batch(run(), "s", sequence, [loss(s, float(s)) for s in steps],
                                 EngineWrites())
    points = store.get_series("r1", "loss", "{}", 0)
    steps = [p.step for p in points]
    assert len(steps) <= policy.limit
    assert steps[-100:] == list(range(1900, 2000))  # the newest at full resolution
    assert steps[0] == 0  # the oldest survives thinning, so the whole history is spanned
    assert all(p.value == float(p.step) for p in points)  # thinning never mixes values
    store.close()
