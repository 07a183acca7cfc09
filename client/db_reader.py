"""A server's SQLite file, read without a server: read-only, with the stdlib ``sqlite3``.

Opened read-only, the database is never written (no schema creation, no migration, no
alert clock running over stalled runs as a started server would; SQLite may leave its
empty ``-wal`` and ``-shm`` companions beside a file no server has open), it may be read
while a server is writing it (WAL readers do not block the writer), and the core install
suffices. The
price is knowing the server's schema: the columns read here are those of
``raresignal.server.storage.sqlite``, and a test writes a file with the real server and
reads it back through both this reader and the server's gRPC answers.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from pathlib import Path

from raresignal.protos.v1 import alerts_pb2, common_pb2


class DatabaseError(Exception):
    """The file is missing or is not a raresignal SQLite database."""


def _labels_key(labels: Mapping[str, str]) -> str:
    """The label set as the server stores it: canonical JSON of the sorted mapping."""
    return json.dumps(dict(labels), sort_keys=True, separators=(",", ":")) if labels else "{}"


class DatabaseSource:
    """The runs, series and alerts of one server database file."""

    def __init__(self, path: str) -> None:
        if "://" in path:
            raise DatabaseError(f"--db reads a server's SQLite file; {path.split('://')[0]} "
                                "databases are read through their server (--server)")
        if not Path(path).is_file():
            raise DatabaseError(f"no database file at {path!r}")
        uri = f"{Path(path).resolve().as_uri()}?mode=ro"
        self._db = sqlite3.connect(uri, uri=True)
        self._db.row_factory = sqlite3.Row
        try:
            tables = {row[0] for row in self._db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as error:
            self._db.close()
            raise DatabaseError(f"{path!r} is not a SQLite database: {error}") from error
        if not {"runs", "series", "samples", "alerts"} <= tables:
            self._db.close()
            raise DatabaseError(f"{path!r} is not a raresignal server database")

    def runs(self) -> list[common_pb2.RunInfo]:
        rows = self._db.execute("SELECT * FROM runs ORDER BY created_at, run_id")
        return [common_pb2.RunInfo(
            run_id=row["run_id"], run_name=row["run_name"], state=row["state"],
            world_size=row["world_size"], created_at=row["created_at"],
            updated_at=row["updated_at"], last_step=row["last_step"],
            report_interval_seconds=row["report_interval_seconds"],
            config=json.loads(row["config"]), tags=json.loads(row["tags"]))
            for row in rows]

    def series(self, run_id: str) -> list[alerts_pb2.SeriesInfo]:
        rows = self._db.execute("SELECT metric, labels FROM series WHERE run_id = ? "
                                "ORDER BY metric, labels", (run_id,))
        return [alerts_pb2.SeriesInfo(metric=metric, labels=json.loads(labels))
                for metric, labels in rows]

    def samples(self, run_id: str, metric: str, labels: Mapping[str, str],
                since_step: int = 0) -> list[common_pb2.Sample]:
        rows = self._db.execute(
            "SELECT samples.step, samples.value, samples.wall_time FROM samples "
            "JOIN series ON series.series_id = samples.series_id "
            "WHERE series.run_id = ? AND series.metric = ? AND series.labels = ? "
            "AND samples.step >= ? ORDER BY samples.step",
            (run_id, metric, _labels_key(labels), since_step))
        return [common_pb2.Sample(metric=metric, labels=labels, step=step, value=value,
                                  wall_time=wall_time) for step, value, wall_time in rows]

    def alerts(self, run_id: str) -> list[common_pb2.Alert]:
        rows = self._db.execute("SELECT * FROM alerts WHERE run_id = ? "
                                "ORDER BY started_at DESC, alert_id", (run_id,))
        return [common_pb2.Alert(
            alert_id=row["alert_id"], run_id=row["run_id"], run_name=row["run_name"],
            rule=row["rule"], labels=json.loads(row["labels"]), state=row["state"],
            severity=row["severity"], summary=row["summary"], value=row["value"],
            threshold=row["threshold"], step=row["step"], started_at=row["started_at"],
            fired_at=row["fired_at"], resolved_at=row["resolved_at"]) for row in rows]

    def close(self) -> None:
        self._db.close()
