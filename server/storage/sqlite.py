"""The SQLite backend: one file in WAL mode (or ":memory:"), one connection, one writer.

Every method is called from a single thread (the server's storage executor), so the
connection is never shared between threads. A group of batches is stored in one
transaction, and the WAL is checkpointed from a second connection on a thread of its own
(``storage.checkpoint``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator, Sequence, Set
from itertools import chain
from typing import Any

from raresignal.protos.v1.common_pb2 import ALERT_STATE_RESOLVED
from raresignal.server.storage.base import AlertPosition, RetentionPolicy, Storage
from raresignal.server.storage.checkpoint import WalCheckpointer
from raresignal.server.storage.records import (
    AlertRecord,
    BatchGroup,
    EngineWrites,
    LatestValue,
    RunRecord,
    SeriesKey,
    SeriesPoint,
)
from raresignal.server.storage.rows import alert_from_row, alert_row, run_from_row, run_row

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    run_name TEXT NOT NULL,
    state INTEGER NOT NULL,
    world_size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_step INTEGER NOT NULL,
    report_interval_seconds REAL NOT NULL,
    config TEXT NOT NULL,
    tags TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    finished_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS series (
    series_id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    metric TEXT NOT NULL,
    labels TEXT NOT NULL,
    last_step INTEGER NOT NULL DEFAULT -1,
    last_value REAL,
    last_wall_time REAL,
    UNIQUE (run_id, metric, labels)
);
CREATE TABLE IF NOT EXISTS samples (
    series_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    value REAL NOT NULL,
    wall_time REAL NOT NULL,
    PRIMARY KEY (series_id, step)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sender_sequences (
    run_id TEXT NOT NULL,
    sender_id TEXT NOT NULL,
    last_sequence INTEGER NOT NULL,
    PRIMARY KEY (run_id, sender_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rule_states (
    run_id TEXT NOT NULL,
    state_key TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (run_id, state_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alerts (
    alert_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    run_name TEXT NOT NULL,
    rule TEXT NOT NULL,
    labels TEXT NOT NULL,
    state INTEGER NOT NULL,
    severity TEXT NOT NULL,
    summary TEXT NOT NULL,
    value REAL NOT NULL,
    threshold REAL NOT NULL,
    step INTEGER NOT NULL,
    started_at REAL NOT NULL,
    fired_at REAL NOT NULL,
    resolved_at REAL NOT NULL
);
-- Both page indexes hold the filter columns too, so a page's candidates are picked and
-- filtered on the index alone and only the page's own rows are read from the table. They
-- replace indexes of (run_id, started_at) and (started_at DESC, alert_id), which a file
-- written before may still hold.
DROP INDEX IF EXISTS alerts_by_run;
DROP INDEX IF EXISTS alerts_by_start;
CREATE INDEX IF NOT EXISTS alerts_page_by_run
    ON alerts (run_id, started_at DESC, alert_id, state, rule);
CREATE INDEX IF NOT EXISTS alerts_page_by_start
    ON alerts (started_at DESC, alert_id, state, rule);
CREATE TABLE IF NOT EXISTS alert_history (
    alert_id TEXT NOT NULL,
    previous_state INTEGER NOT NULL,
    state INTEGER NOT NULL,
    at REAL NOT NULL,
    value REAL NOT NULL,
    step INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS alert_history_by_alert ON alert_history (alert_id);
"""

WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
ROWS_PER_INSERT = 128
# Rows of one statement replace in order, as separate statements would: the later of two
# samples at the same step wins.
_MULTI_ROW_INSERT = ("INSERT OR REPLACE INTO samples VALUES "
                     + ",".join(["(?,?,?,?)"] * ROWS_PER_INSERT))


_ALERT_PAGE_ORDER = "started_at DESC, alert_id"


def alerts_query(run_id: str, states: Sequence[int], rule: str, limit: int,
                 run_ids: Sequence[str] | None, after: AlertPosition | None
                 ) -> tuple[str, list[Any]]:
    """The SQL (and its parameters) of :meth:`SQLiteStorage.alerts`.

    The page is picked on a covering index (ids only, filters checked on the index) and
    only its rows are then read. A scope's runs are walked in the order given, each run's
    alerts in page order: once the page is full, a run whose first alert is older than
    the page's last ends there, so runs given newest alert first (as the storage orders
    them) cost a step or two each instead of a sort of every alert they hold. The index is
    named, not left to the planner: once statistics exist, SQLite prefers walking every
    alert in page order to sorting a few runs' alerts, which reads the whole table for a
    caller whose runs hold none of them.
    """
    clauses: list[str] = []
    params: list[Any] = []
    if run_id:
        run_ids = [run_id] if run_ids is None else [r for r in run_ids if r == run_id]
    if run_ids is not None:
        params.append(json.dumps(list(run_ids)))
    if states:
        clauses.append(f"state IN ({','.join('?' * len(states))})")
        params.extend(states)
    if rule:
        clauses.append("rule = ?")
        params.append(rule)
    if after is not None:
        # started_at <= ? alone bounds the index range; the rest breaks the tie.
        clauses.append("started_at <= ? AND (started_at < ? OR alert_id > ?)")
        params.extend((after[0], after[0], after[1]))
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    if run_ids is None:
        source = "alerts INDEXED BY alerts_page_by_start"
    else:
        # CROSS JOIN: json_each is the outer loop, in the array's order.
        source = ("json_each(?) AS scope CROSS JOIN alerts INDEXED BY alerts_page_by_run "
                  "ON alerts.run_id = scope.value")
    params.append(limit)
    return ("SELECT * FROM alerts WHERE alert_id IN ("
            f"SELECT alert_id FROM {source}{where} ORDER BY {_ALERT_PAGE_ORDER} LIMIT ?) "
            f"ORDER BY {_ALERT_PAGE_ORDER}", params)


class SQLiteStorage(Storage):
    """:class:`~raresignal.server.storage.base.Storage` on one SQLite database."""

    def __init__(self, path: str, retention: RetentionPolicy | None = None) -> None:
        self.path = path
        self.retention = retention or RetentionPolicy()
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        if path != ":memory:":
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise RuntimeError(f"SQLite at {path} refused WAL mode (got {mode})")
        # NORMAL in WAL mode: a commit survives a process crash; only an OS crash (power
        # loss) may lose the last transactions, never corrupt the file.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        # Held around every write transaction; the checkpointer takes it to let the WAL
        # rewind (see storage.checkpoint).
        self._write_lock = threading.Lock()
        self._checkpointer: WalCheckpointer | None = None
        if path != ":memory:":
            # Checkpoints run off the ingest thread (see storage.checkpoint); the WAL file
            # is cut back to this size whenever it is rewound.
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
            self._checkpointer = WalCheckpointer(path, self._write_lock)
        self._series_ids: dict[str, dict[tuple[str, str], int]] = {}
        # Upper bounds of the sample count per series (replaced steps count twice), so the
        # exact count is only taken when a series may have reached the retention limit.
        self._sizes: dict[int, int] = {}
        # The committed sequence of every sender, advanced only once a commit succeeds, so
        # the ledger's duplicate check never reads a sequence a rollback took back.
        self._sequences: dict[tuple[str, str], int] = {
            (row[0], row[1]): row[2]
            for row in self._db.execute(
                "SELECT run_id, sender_id, last_sequence FROM sender_sequences")
        }

    # -- runs ------------------------------------------------------------------------

    def create_run(self, run: RunRecord) -> None:
        with self._transaction():
            self._db.execute("INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", run_row(run))

    def update_run(self, run: RunRecord, writes: EngineWrites | None = None) -> None:
        with self._transaction():
            self._upsert_run(run)
            if writes is not None:
                self._write_engine(writes)

    def list_runs(self, include_finished: bool) -> list[RunRecord]:
        query = "SELECT * FROM runs"
        if not include_finished:
            query += " WHERE finished_at = 0"
        return [run_from_row(row) for row in self._db.execute(query + " ORDER BY created_at")]

    def run(self, run_id: str) -> RunRecord | None:
        row = self._db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return run_from_row(row) if row is not None else None

    # -- sequences and series ------------------------------------------------------------

    def last_sequence(self, run_id: str, sender_id: str) -> int:
        return self._sequences.get((run_id, sender_id), 0)

    def last_sequences(self, run_id: str) -> dict[str, int]:
        return {sender: seq for (run, sender), seq in self._sequences.items() if run == run_id}

    def _series_of(self, run_id: str) -> dict[tuple[str, str], int]:
        ids = self._series_ids.get(run_id)
        if ids is None:
            ids = {
                (row[1], row[2]): row[0]
                for row in self._db.execute(
                    "SELECT series_id, metric, labels FROM series WHERE run_id = ?", (run_id,))
            }
            self._series_ids[run_id] = ids
        return ids

    def series_keys(self, run_id: str) -> Set[SeriesKey]:
        return self._series_of(run_id).keys()

    def apply_group(self, group: BatchGroup) -> None:
        """One BEGIN/COMMIT (and WAL append) for the whole group, and one executemany per
        table, however many batches queued up meanwhile."""
        db = self._db
        created: list[tuple[dict[SeriesKey, int], SeriesKey]] = []
        with self._write_lock:
            try:
                db.execute("BEGIN IMMEDIATE")
                if group.batches:
                    self._write_group(group, created)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                for series, key in created:
                    series.pop(key, None)
                self._sizes.clear()  # counts may include rolled-back rows; re-count lazily
                raise
        self._sequences.update(group.sequences)

    def _sample_rows(self, group: BatchGroup,
                     created: list[tuple[dict[SeriesKey, int], SeriesKey]]
                     ) -> tuple[list[tuple[int, int, float, float]],
                                dict[int, tuple[int, float, float]]]:
        """The group's sample rows and the newest value of each series they touch, creating
        the series the group is the first to report (listed in ``created``)."""
        rows: list[tuple[int, int, float, float]] = []
        latest: dict[int, tuple[int, float, float]] = {}
        for write in group.batches:
            run_id = write.run.run_id
            series = self._series_of(run_id)
            for key, (step, value, wall_time) in write.newest.items():
                series_id = series.get(key)
                if series_id is None:
                    series_id = self._db.execute(
                        "INSERT INTO series (run_id, metric, labels) VALUES (?,?,?)",
                        (run_id, key[0], key[1])).lastrowid
                    series[key] = series_id
                    self._sizes[series_id] = 0
                    created.append((series, key))
                current = latest.get(series_id)
                if current is None or step >= current[0]:
                    latest[series_id] = (step, value, wall_time)
            rows += [(series[(s.metric, s.labels_key)], s.step, s.value, s.wall_time)
                     for s in write.samples]
        return rows, latest

    def _write_group(self, group: BatchGroup,
                     created: list[tuple[dict[SeriesKey, int], SeriesKey]]) -> None:
        rows, latest = self._sample_rows(group, created)
        db = self._db
        db.executemany(
            "INSERT INTO sender_sequences VALUES (?,?,?) ON CONFLICT (run_id, sender_id) "
            "DO UPDATE SET last_sequence = excluded.last_sequence",
            [(run_id, sender, seq) for (run_id, sender), seq in group.sequences.items()])
        self._insert_samples(rows)
        db.executemany(
            "UPDATE series SET last_step = ?, last_value = ?, last_wall_time = ? "
            "WHERE series_id = ? AND last_step <= ?",
            [(step, value, wall, sid, step) for sid, (step, value, wall) in latest.items()])
        for run in group.runs.values():
            self._upsert_run(run)
        self._write_engine(group.engine_writes)
        self._apply_retention(rows)

    def _insert_samples(self, rows: list[tuple[int, int, float, float]]) -> None:
        """Inserts rows many per statement: sqlite3 releases and retakes the GIL around
        every statement step, and each take may wait for the event loop's thread."""
        whole = len(rows) - len(rows) % ROWS_PER_INSERT
        if whole:
            flat = list(chain.from_iterable(rows[:whole]))
            width = 4 * ROWS_PER_INSERT
            self._db.executemany(_MULTI_ROW_INSERT,
                                 [flat[i:i + width] for i in range(0, whole * 4, width)])
        if whole < len(rows):
            self._db.executemany("INSERT OR REPLACE INTO samples VALUES (?,?,?,?)",
                                 rows[whole:])

    def _apply_retention(self, rows: list[tuple[int, int, float, float]]) -> None:
        added = Counter(row[0] for row in rows)
        limit = self.retention.limit
        for series_id, count in added.items():
            size = self._sizes.get(series_id)
            if size is None:
                size = self._exact_size(series_id) - count
            size += count
            if size > limit:
                size = self._exact_size(series_id)
                if size > limit:
                    size -= self._thin(series_id)
            self._sizes[series_id] = size

    def _exact_size(self, series_id: int) -> int:
        return self._db.execute("SELECT count(*) FROM samples WHERE series_id = ?",
                                (series_id,)).fetchone()[0]

    def _thin(self, series_id: int) -> int:
        """Drops every second sample older than the full-resolution window; returns how
        many were dropped."""
        older = [
            row[0] for row in self._db.execute(
                "SELECT step FROM samples WHERE series_id = ? ORDER BY step DESC "
                "LIMIT -1 OFFSET ?", (series_id, self.retention.full_resolution))
        ]
        older.reverse()  # oldest first; keep the oldest and every second one after it
        dropped = older[1::2]
        self._db.executemany("DELETE FROM samples WHERE series_id = ? AND step = ?",
                             [(series_id, step) for step in dropped])
        return len(dropped)

    def _upsert_run(self, run: RunRecord) -> None:
        self._db.execute(
            "INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (run_id) DO UPDATE "
            "SET run_name = excluded.run_name, state = excluded.state, "
            "world_size = excluded.world_size, updated_at = excluded.updated_at, "
            "last_step = excluded.last_step, "
            "report_interval_seconds = excluded.report_interval_seconds, "
            "config = excluded.config, tags = excluded.tags, "
            "agent_version = excluded.agent_version, finished_at = excluded.finished_at",
            run_row(run))

    def _write_engine(self, writes: EngineWrites) -> None:
        if writes.rule_states:
            self._db.executemany(
                "INSERT INTO rule_states VALUES (?,?,?) ON CONFLICT (run_id, state_key) "
                "DO UPDATE SET state = excluded.state",
                [(run_id, key, json.dumps(state)) for run_id, key, state in writes.rule_states])
        if writes.alerts:
            self._db.executemany(
                "INSERT OR REPLACE INTO alerts VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [alert_row(alert) for alert in writes.alerts])
        if writes.changes:
            self._db.executemany(
                "INSERT INTO alert_history VALUES (?,?,?,?,?,?)",
                [(c.alert.alert_id, c.previous_state, c.alert.state, c.at, c.alert.value,
                  c.alert.step) for c in writes.changes])
        for run_id in self.retention.runs_to_prune(writes.alerts):
            stale = [row for row in self._db.execute(
                "SELECT alert_id FROM alerts WHERE run_id = ? AND state = ? "
                "ORDER BY started_at DESC, alert_id DESC LIMIT -1 OFFSET ?",
                (run_id, ALERT_STATE_RESOLVED, self.retention.alerts_per_run))]
            self._db.executemany("DELETE FROM alert_history WHERE alert_id = ?", stale)
            self._db.executemany("DELETE FROM alerts WHERE alert_id = ?", stale)

    # -- reads -----------------------------------------------------------------------

    def latest_values(self, run_id: str | None = None) -> list[LatestValue]:
        query = ("SELECT run_id, metric, labels, last_step, last_value, last_wall_time "
                 "FROM series WHERE last_value IS NOT NULL")
        params: tuple[str, ...] = ()
        if run_id is not None:
            query, params = query + " AND run_id = ?", (run_id,)
        return [LatestValue(*row) for row in self._db.execute(query, params)]

    def get_series(self, run_id: str, metric: str, labels_key: str, since_step: int,
                   limit: int | None = None) -> list[SeriesPoint]:
        series_id = self._series_of(run_id).get((metric, labels_key))
        if series_id is None:
            return []
        return [
            SeriesPoint(row[0], row[1], row[2])
            for row in self._db.execute(
                "SELECT step, value, wall_time FROM samples WHERE series_id = ? AND step >= ? "
                "ORDER BY step LIMIT ?", (series_id, since_step, -1 if limit is None else limit))
        ]

    def rule_states(self, run_id: str | None = None
                    ) -> Iterator[tuple[str, str, dict[str, Any]]]:
        query, params = "SELECT run_id, state_key, state FROM rule_states", ()
        if run_id is not None:
            query, params = query + " WHERE run_id = ?", (run_id,)
        for row_run_id, key, state in self._db.execute(query, params):
            yield row_run_id, key, json.loads(state)

    def alerts(self, run_id: str = "", states: Sequence[int] = (), rule: str = "",
               limit: int = 1000, run_ids: Sequence[str] | None = None,
               after: AlertPosition | None = None) -> list[AlertRecord]:
        if run_ids is not None and len(run_ids) > 1:
            run_ids = self._newest_alert_first(run_ids)
        query, params = alerts_query(run_id, states, rule, limit, run_ids, after)
        return [alert_from_row(row) for row in self._db.execute(query, params)]

    def _newest_alert_first(self, run_ids: Sequence[str]) -> list[str]:
        """The runs by their newest alert, newest first (one index seek each): the order
        in which :func:`alerts_query` walks a scope the fastest."""
        return [row[0] for row in self._db.execute(
            "SELECT scope.value FROM json_each(?) AS scope ORDER BY (SELECT started_at "
            "FROM alerts INDEXED BY alerts_page_by_run WHERE alerts.run_id = scope.value "
            "ORDER BY started_at DESC LIMIT 1) DESC", (json.dumps(list(run_ids)),))]

    def close(self) -> None:
        """Closes the database; closing it again does nothing."""
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()

    # -- plumbing --------------------------------------------------------------------

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self._write_lock)


class _Transaction:
    def __init__(self, db: sqlite3.Connection, write_lock: threading.Lock) -> None:
        self._db = db
        self._write_lock = write_lock

    def __enter__(self) -> None:
        self._write_lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._write_lock.release()
            raise

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self._write_lock.release()
