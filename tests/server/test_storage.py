"""What only the SQLite backend does: WAL mode for a file, and an in-memory database.

What every backend promises is checked in test_storage_contract.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from server_support import batch, sample

from raresignal.protos.v1 import ingest_pb2
from raresignal.server.alerting.engine import AlertEngine
from raresignal.server.serving.auth import EVERYONE
from raresignal.server.serving.ledger import Ledger
from raresignal.server.serving.live import LiveState
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
