"""SQLite storage: WAL mode, exactly-once in one transaction, and bounded retention."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from conftest import batch, sample

from raresignal.protos.v1 import ingest_pb2
from raresignal.server.alerting.engine import AlertEngine
from raresignal.server.serving.auth import EVERYONE
from raresignal.server.serving.ledger import Ledger
from raresignal.server.serving.live import LiveState
from raresignal.server.storage.base import RetentionPolicy
from raresignal.server.storage.records import (
    BatchGroup,
    BatchWrite,
    CheckedSample,
    EngineWrites,
    RunRecord,
    newest_by_series,
)
from raresignal.server.storage.sqlite import SQLiteStorage


def open_ledger(storage: SQLiteStorage) -> tuple[Ledger, str]:
    """A ledger (no alert rules) on ``storage``, and the id of a run it opened."""
    ledger = Ledger(storage, AlertEngine([]), LiveState())
    run, _ = ledger.open_run(ingest_pb2.OpenRunRequest(run_name="n", world_size=1), EVERYONE)
    return ledger, run.run_id


def report(ledger: Ledger, run_id: str, sequence: int, steps: range | list[int]) -> bool:
    """Reports ``loss`` = step at each step, as sender "s"; whether it was applied."""
    losses = [sample("loss", step, float(step)) for step in steps]
    return ledger.apply(batch(run_id, sequence, losses, sender="s"), EVERYONE).applied


def test_file_database_uses_wal(tmp_path: Path) -> None:
    store = SQLiteStorage(str(tmp_path / "x.db"))
    with sqlite3.connect(tmp_path / "x.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_memory_database_works() -> None:
    store = SQLiteStorage(":memory:")
    ledger, run_id = open_ledger(store)
    assert report(ledger, run_id, 1, [1])
    assert [p.step for p in store.get_series(run_id, "loss", "{}", 0)] == [1]
    ledger.close()


def test_each_sequence_is_stored_once_and_a_failed_group_stores_nothing(
        tmp_path: Path) -> None:
    store = SQLiteStorage(str(tmp_path / "x.db"))
    ledger, run_id = open_ledger(store)
    assert report(ledger, run_id, 5, [1])
    assert not report(ledger, run_id, 5, [2])
    assert not report(ledger, run_id, 4, [3])
    # A failure half way (a sample of an unknown run breaks the foreign key) stores nothing,
    # not even the sequence, so the sender may retry the batch.
    ghost = RunRecord(run_id="ghost", run_name="n", state=1, world_size=1, created_at=0.0,
                      updated_at=0.0, last_step=0, report_interval_seconds=0.0)
    samples = [CheckedSample("loss", "{}", 9, 1.0, 0.0)]
    group = BatchGroup()
    group.add(BatchWrite(ghost, "s", 1, samples, EngineWrites(), newest_by_series(samples)),
              [])
    with pytest.raises(sqlite3.IntegrityError):
        store.apply_group(group)
    with sqlite3.connect(tmp_path / "x.db") as conn:
        assert conn.execute("SELECT count(*) FROM samples").fetchone()[0] == 1
    assert store.last_sequence("ghost", "s") == 0
    ledger.close()
    reopened = SQLiteStorage(str(tmp_path / "x.db"))
    assert reopened.last_sequences(run_id) == {"s": 5}
    reopened.close()


def test_retention_bounds_a_long_series_and_keeps_recent_steps_whole() -> None:
    policy = RetentionPolicy(full_resolution=100, thinned_capacity=50)
    store = SQLiteStorage(":memory:", policy)
    ledger, run_id = open_ledger(store)
    for sequence in range(1, 201):  # 2,000 steps in batches of 10
        assert report(ledger, run_id, sequence, range((sequence - 1) * 10, sequence * 10))
    points = store.get_series(run_id, "loss", "{}", 0)
    steps = [p.step for p in points]
    assert len(steps) <= policy.limit
    assert steps[-100:] == list(range(1900, 2000))  # the newest at full resolution
    assert steps[0] == 0  # the oldest survives thinning, so the whole history is spanned
    assert all(p.value == float(p.step) for p in points)  # thinning never mixes values
    ledger.close()
