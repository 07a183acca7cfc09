"""Alerts written straight into a SQLite database before a server opens it: many of
them, with the largest fields the server accepts, without driving rules to fire."""

from __future__ import annotations

from pathlib import Path

from raresignal.protos.v1 import common_pb2
from raresignal.server.serving.validation import MAX_LABEL_VALUE_CHARS, MAX_NAME_CHARS
from raresignal.server.storage.base import Storage
from raresignal.server.storage.records import AlertRecord, EngineWrites, RunRecord
from raresignal.server.storage.sqlite import SQLiteStorage


def store_alerts(store: Storage, run_name: str, count: int, run_index: int = 0,
                 summary: str = "s") -> str:
    """Stores a finished run and ``count`` resolved alerts of it (three to a started_at,
    so pages end inside ties); the run's id."""
    run_id = f"{run_index:016x}"
    run = RunRecord(run_id=run_id, run_name=run_name, state=common_pb2.RUN_STATE_COMPLETED,
                    world_size=1, created_at=1.0 + run_index, updated_at=1.0, last_step=0,
                    report_interval_seconds=0.0, finished_at=2.0)
    store.create_run(run)
    alerts = [AlertRecord(alert_id=f"{run_index:08x}{i:012x}", run_id=run_id,
                          run_name=run_name, rule="R" * MAX_NAME_CHARS,
                          labels={"probe": "p" * MAX_LABEL_VALUE_CHARS},
                          state=common_pb2.ALERT_STATE_RESOLVED, severity="critical",
                          summary=summary, value=-1.2345678e-300, threshold=-1.2345678e-300,
                          step=10**12, started_at=1_700_000_000.123456 + i // 3,
                          fired_at=1_700_000_000.5, resolved_at=1_700_000_001.5)
              for i in range(count)]
    store.update_run(run, EngineWrites(alerts=alerts))
    return run_id


def stored_alerts(db_path: Path, run_name: str, count: int, run_index: int = 0,
                  summary: str = "s") -> str:
    """:func:`store_alerts` into the SQLite database at ``db_path``."""
    store = SQLiteStorage(str(db_path))
    try:
        return store_alerts(store, run_name, count, run_index, summary)
    finally:
        store.close()
