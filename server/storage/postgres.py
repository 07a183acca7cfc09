"""The PostgreSQL backend: the SQLite backend's behaviour on a shared database.

Every method is called from the server's one storage thread; the pool gives that thread a
live connection (and a new one after the database restarts). A group of batches is one
transaction of three round trips: its statements in one pipeline (its sender sequences
by an upsert that only ever advances, so a second writer that tries to apply a batch
already committed makes the whole group roll back instead of storing it twice; its
series locked and advanced; its runs; its queue rows), then its new samples by binary
``COPY``, then the commit.

Replicas (several servers on one database) share it through two tables of migration 0003
(and a heartbeat row per replica, migration 0005, by which each sizes its share of runs).
``run_leases`` says which replica evaluates each run's alerts: a row per run with its owner
and an expiry on the database's clock, renewed by the owner's heartbeat and taken over by
another replica once expired. Lease rows rather than advisory locks: an advisory lock
lives and dies with one session, so a dropped pooled connection would silently hand a
run over while its owner goes on evaluating, and nobody else can read who holds it; a row
expires on a stated TTL, can be read by any replica (and by operators), and is locked in
the very transaction that stores the engine's writes, which fences a replica that lost it.
``evaluation_queue`` carries each applied report, heartbeat and close to the run's owner,
written in the transaction that applied it; the owner deletes what it evaluates in the
transaction that stores the results. A report is queued with only what the owner needs
(the samples of the metrics the live replicas' rules read, which each replica records in
its heartbeat row, and each other series' newest sample), packed (``queue_codec``).
Deleting, rather than advancing a watermark over an identity column, matters: identities
are handed out at insert and committed in another order, so a watermark could pass a row
that commits later and never evaluate it.

Samples live in daily partitions (migration 0004, ``storage.partitions``): retention drops
whole days on a schedule instead of deleting rows as it writes, as SQLite's thinning does.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Sequence, Set
from operator import itemgetter, le
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from raresignal.protos.v1.common_pb2 import ALERT_STATE_RESOLVED
from raresignal.server.storage import binary_copy
from raresignal.server.storage.base import (
    AlertPosition,
    EvaluateQueued,
    RetentionPolicy,
    SequenceConflict,
    Storage,
)
from raresignal.server.storage.migrate import migrate
from raresignal.server.storage.partitions import PartitionChanges, maintain_partitions
from raresignal.server.storage.queue_codec import decode_samples, encode_samples
from raresignal.server.storage.records import (
    AlertRecord,
    BatchGroup,
    EngineWrites,
    Evaluation,
    LatestValue,
    RunRecord,
    SeriesKey,
    SeriesPoint,
)
from raresignal.server.storage.rows import alert_from_row, alert_row, run_from_row, run_row

# One thread uses the pool; a second connection lets a read start while the first is
# being replaced after a dropped connection.
POOL_SIZE = 2
CONNECT_TIMEOUT_SECONDS = 30.0
# A readiness ping that waits longer than this for a connection counts as unreachable.
PING_TIMEOUT_SECONDS = 5.0

# {(series_id, step): (value, wall_time)}
SampleRows = dict[tuple[int, int], tuple[float, float]]
# The parts of a CheckedSample the sample rows take.
_SERIES_KEY = itemgetter(0, 1)
_STEP = itemgetter(2)
_POINT = itemgetter(3, 4)
# The parts of a sample row's key, and of a series' newest (step, value, wall_time).
_SERIES_OF_ROW = _STEP_OF_NEWEST = itemgetter(0)
_STEP_OF_ROW = _VALUE_OF_NEWEST = itemgetter(1)
_WALL_TIME_OF_NEWEST = itemgetter(2)

_STAGING = ("CREATE TEMPORARY TABLE samples_staging (series_id BIGINT, step BIGINT, "
            "value DOUBLE PRECISION, wall_time DOUBLE PRECISION) ON COMMIT DELETE ROWS")
_COPY_STAGING = ("COPY samples_staging (series_id, step, value, wall_time) "
                 "FROM STDIN (FORMAT BINARY)")
# The partitioned table's unique key holds wall_time, so ON CONFLICT (series_id, step)
# cannot replace a re-reported step. One statement locks the group's series rows (in one
# order, so two writers never deadlock), advances their newest values and returns each
# one's last step as it was before: a second writer of a series waits for the lock and
# then reads the last step as this transaction left it. A step above its series' last
# stored one is new and is copied straight into the samples (COPY inserts them a page at a
# time, where an INSERT ... SELECT writes them one by one). The locking subquery is
# materialised, so the rows are locked in its order before any is updated; an UPDATE's
# SET reads the row as it was, so a stale report leaves the newest values as they are.
_ADVANCE_SERIES = (
    "WITH locked AS MATERIALIZED (SELECT series_id, last_step FROM series "
    "WHERE series_id = ANY(%s::bigint[]) ORDER BY series_id FOR NO KEY UPDATE) "
    "UPDATE series SET last_step = greatest(series.last_step, n.step), "
    "last_value = CASE WHEN series.last_step <= n.step THEN n.value ELSE last_value END, "
    "last_wall_time = CASE WHEN series.last_step <= n.step THEN n.wall "
    "ELSE last_wall_time END "
    "FROM locked, unnest(%s::bigint[], %s::bigint[], %s::float8[], %s::float8[]) "
    "AS n(series_id, step, value, wall) "
    "WHERE locked.series_id = n.series_id AND series.series_id = n.series_id "
    "RETURNING locked.series_id, locked.last_step")
_COPY_SAMPLES = ("COPY samples (series_id, step, value, wall_time) "
                 "FROM STDIN (FORMAT BINARY)")
# The rest (steps at or below the last: a resumed run re-reporting) go through the
# staging table and replace their row in place, or are inserted where none is stored.
_REPLACE_OLD_SAMPLES = (
    "WITH replaced AS (UPDATE samples SET value = st.value, wall_time = st.wall_time "
    "FROM samples_staging st WHERE samples.series_id = st.series_id "
    "AND samples.step = st.step RETURNING samples.series_id, samples.step) "
    "INSERT INTO samples SELECT * FROM samples_staging st WHERE NOT EXISTS "
    "(SELECT 1 FROM replaced r WHERE r.series_id = st.series_id AND r.step = st.step)")
# Inserts or advances each sender's sequence, and returns the rows it wrote: a sender
# missing from the result already had this sequence (or a later one) committed.
_ADVANCE_SEQUENCES = (
    "INSERT INTO sender_sequences (run_id, sender_id, last_sequence) "
    "SELECT * FROM unnest(%b::text[], %b::text[], %s::bigint[]) "
    "ON CONFLICT (run_id, sender_id) DO UPDATE SET last_sequence = excluded.last_sequence "
    "WHERE sender_sequences.last_sequence < excluded.last_sequence "
    "RETURNING run_id, sender_id")
_CREATE_SERIES = (
    "INSERT INTO series (run_id, metric, labels) "
    "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[]) "
    # A no-op update, so a series another writer created is returned with its id too.
    "ON CONFLICT (run_id, metric, labels) DO UPDATE SET metric = excluded.metric "
    "RETURNING series_id, run_id, metric, labels")
# A run as a writer holds it replaces the stored one.
_RUN_CONFLICT = (
    "ON CONFLICT (run_id) DO UPDATE "
    "SET run_name = excluded.run_name, state = excluded.state, "
    # Replicas write one run from their own copies: its position only ever advances.
    "world_size = excluded.world_size, "
    "updated_at = greatest(runs.updated_at, excluded.updated_at), "
    "last_step = greatest(runs.last_step, excluded.last_step), "
    "report_interval_seconds = excluded.report_interval_seconds, "
    "config = excluded.config, tags = excluded.tags, "
    "agent_version = excluded.agent_version, finished_at = excluded.finished_at")
_UPSERT_RUN = "INSERT INTO runs VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) " + _RUN_CONFLICT
# The same for all of a group's runs in one statement, from arrays (in run_id order, so
# two writers lock shared runs in one order). Text arrays go in binary (%b: psycopg dumps
# a list of text for %s by escaping each element with a regular expression), numbers as
# literals (_number_array), which is cheaper still.
# A report moves only a run's position: the rest of the record (state, closure, config)
# is written by OpenRun and CloseRun, so a replica whose cached copy predates a close
# that another replica just committed cannot reopen the run by reporting on it.
_UPSERT_RUNS = (
    "INSERT INTO runs SELECT * FROM unnest(%b::text[], %b::text[], %s::int4[], %s::int4[], "
    "%s::float8[], %s::float8[], %s::int8[], %s::float8[], %b::text[], %b::text[], "
    "%b::text[], %s::float8[]) "
    "ON CONFLICT (run_id) DO UPDATE "
    "SET updated_at = greatest(runs.updated_at, excluded.updated_at), "
    "last_step = greatest(runs.last_step, excluded.last_step)")
_UPSERT_ALERT = (
    "INSERT INTO alerts VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
    "ON CONFLICT (alert_id) DO UPDATE "
    "SET run_id = excluded.run_id, run_name = excluded.run_name, rule = excluded.rule, "
    "labels = excluded.labels, state = excluded.state, severity = excluded.severity, "
    "summary = excluded.summary, value = excluded.value, threshold = excluded.threshold, "
    "step = excluded.step, started_at = excluded.started_at, fired_at = excluded.fired_at, "
    "resolved_at = excluded.resolved_at")


# The runs table's numeric columns, by position in rows.run_row.
_RUN_NUMBER_COLUMNS = frozenset((2, 3, 4, 5, 6, 7, 11))
# One statement for all of a group's evaluations, in their order (an INSERT ... SELECT
# numbers identity rows in the order it reads them). The packed samples go in binary
# (%b), as they are, where a bytea array in text would be escaped byte by byte; numbers
# as literals.
_ENQUEUE = (
    "INSERT INTO evaluation_queue (run_id, kind, received_at, step, series, points) "
    "SELECT * FROM unnest(%b::text[], %s::int2[], %s::float8[], %s::int8[], %b::text[], "
    "%b::bytea[])")
# A tick's rule states in one statement (each (run, key) once: the engine writes a dict).
_UPSERT_RULE_STATES = (
    "INSERT INTO rule_states SELECT * FROM unnest(%b::text[], %b::text[], %b::text[]) "
    "ON CONFLICT (run_id, state_key) DO UPDATE SET state = excluded.state")
# Renews the owner's leases of runs still to evaluate or show (open, finished within the
# finished-run TTL, or with queued evaluations), then takes its share of such runs whose
# lease is missing or expired. The database's clock decides expiry, so the replicas'
# clocks need not agree.
_RENEW_LEASES = (
    "UPDATE run_leases SET expires_at = clock_timestamp() + make_interval(secs => %s) "
    "WHERE owner = %s")
_BEAT = (
    "INSERT INTO replicas VALUES (%s, clock_timestamp() + make_interval(secs => %s)) "
    "ON CONFLICT (replica_id) DO UPDATE SET expires_at = excluded.expires_at")
_LEASABLE = (
    "(finished_at = 0 OR finished_at > extract(epoch FROM clock_timestamp()) - %s "
    "OR run_id IN (SELECT run_id FROM evaluation_queue))")
# The runs to share out, the live replicas, and the leases the owner holds.
_SHARE = (
    f"SELECT (SELECT count(*) FROM runs WHERE {_LEASABLE}), "
    "(SELECT count(*) FROM replicas WHERE expires_at > clock_timestamp()), "
    "(SELECT count(*) FROM run_leases WHERE owner = %s AND expires_at > clock_timestamp())")
_TAKE_LEASES = (
    "INSERT INTO run_leases (run_id, owner, expires_at) "
    "SELECT run_id, %s, clock_timestamp() + make_interval(secs => %s) FROM runs "
    f"WHERE {_LEASABLE} AND NOT EXISTS (SELECT 1 FROM run_leases l "
    "WHERE l.run_id = runs.run_id AND l.expires_at > clock_timestamp()) "
    "ORDER BY created_at, run_id LIMIT %s "
    # A replica renewing at the same moment may have taken one meanwhile: it keeps it.
    "ON CONFLICT (run_id) DO UPDATE SET owner = excluded.owner, "
    "expires_at = excluded.expires_at "
    "WHERE run_leases.expires_at < clock_timestamp() OR run_leases.owner = excluded.owner")
# A run finished past the TTL with nothing left to evaluate needs no owner.
_DROP_DONE_LEASES = (
    "DELETE FROM run_leases l USING runs r WHERE l.run_id = r.run_id AND l.owner = %s "
    "AND r.finished_at <> 0 AND r.finished_at <= extract(epoch FROM clock_timestamp()) - %s "
    "AND NOT EXISTS (SELECT 1 FROM evaluation_queue q WHERE q.run_id = l.run_id)")
_OWNED = "SELECT run_id FROM run_leases WHERE owner = %s AND expires_at > clock_timestamp()"
# Locks the leases held, so a takeover waits for this transaction (and then finds what it
# stored) rather than restoring the engine's state from before it.
_LOCK_HELD = ("SELECT run_id FROM run_leases WHERE run_id = ANY(%s) AND owner = %s "
              "AND expires_at > clock_timestamp() FOR UPDATE")
_TAKE_QUEUED = (
    "DELETE FROM evaluation_queue WHERE position IN ("
    "SELECT position FROM evaluation_queue WHERE run_id = ANY(%s) ORDER BY position "
    "LIMIT %s) RETURNING position, run_id, kind, received_at, step, series, points, samples")
# Records the metrics this replica's rules read, and returns those of every live replica
# (as they stood before this statement: the caller adds its own).
_SHARE_RULE_METRICS = (
    "WITH mine AS (UPDATE replicas SET rule_metrics = %s WHERE replica_id = %s) "
    "SELECT DISTINCT metric FROM replicas, unnest(rule_metrics) AS metric "
    "WHERE expires_at > clock_timestamp()")
_RESOLVED_SINCE = ("SELECT * FROM alerts WHERE run_id = %s AND state = %s "
                   "AND resolved_at >= %s ORDER BY resolved_at, alert_id")


def _number_array(numbers: Iterable[float]) -> str:
    """A PostgreSQL array literal of numbers, for a ``%s::bigint[]`` or ``::float8[]``
    parameter. Joining their reprs is C work, where psycopg dumps a list element by element
    in Python; a float's repr is the shortest text that reads back as the same float, and
    PostgreSQL reads it back exactly. Only for finite numbers and plain ints (samples,
    steps, times, sequences, run fields: validation admits no other)."""
    return "{" + ",".join(map(repr, numbers)) + "}"


def _evaluation_row(evaluation: Evaluation
                    ) -> tuple[str, int, float, int, str | None, bytes | None]:
    series, points = encode_samples(evaluation.samples) if evaluation.samples else (None, None)
    return (evaluation.run_id, evaluation.kind, evaluation.received_at, evaluation.step,
            series, points)


def _only_runs(writes: EngineWrites, run_ids: Set[str]) -> EngineWrites:
    """The writes of the runs whose lease is held: a replica that lost one stores nothing
    of it, whatever its engine still believes."""
    return EngineWrites(
        rule_states=[s for s in writes.rule_states if s[0] in run_ids],
        alerts=[a for a in writes.alerts if a.run_id in run_ids],
        changes=[c for c in writes.changes if c.alert.run_id in run_ids])


def alerts_query(run_id: str, states: Sequence[int], rule: str, limit: int,
                 run_ids: Sequence[str] | None, after: AlertPosition | None
                 ) -> tuple[str, list[Any]]:
    """The SQL (and its parameters) of :meth:`PostgresStorage.alerts`: the planner picks
    ``alerts_by_run`` for a few runs and ``alerts_by_start`` for the whole order."""
    clauses: list[str] = []
    params: list[Any] = []
    if run_id:
        clauses.append("run_id = %s")
        params.append(run_id)
    if run_ids is not None:
        clauses.append("run_id = ANY(%s)")
        params.append(list(run_ids))
    if states:
        clauses.append("state = ANY(%s)")
        params.append(list(states))
    if rule:
        clauses.append("rule = %s")
        params.append(rule)
    if after is not None:
        # started_at <= %s alone bounds the index range; the rest breaks the tie.
        clauses.append("started_at <= %s AND (started_at < %s OR alert_id > %s)")
        params.extend((after[0], after[0], after[1]))
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    params.append(limit)
    return (f"SELECT * FROM alerts{where} ORDER BY started_at DESC, alert_id LIMIT %s",
            params)


def _prepare_connection(conn: psycopg.Connection) -> None:
    """Gives each pooled connection its own staging table (emptied at every commit)."""
    conn.execute(_STAGING)
    conn.commit()


class PostgresStorage(Storage):
    """:class:`~raresignal.server.storage.base.Storage` on one PostgreSQL database.

    ``conninfo`` is a libpq connection string or URL; ``password``, when given, is passed
    beside it rather than in it. The schema is migrated on start.
    """

    shared = True

    def __init__(self, conninfo: str, retention: RetentionPolicy | None = None,
                 password: str | None = None) -> None:
        self.retention = retention or RetentionPolicy()
        extra: dict[str, Any] = {"application_name": "raresignal-server"}
        if password is not None:
            extra["password"] = password
        # Connecting once directly first: a wrong address or password is raised as
        # libpq words it, where the pool would only time out.
        with psycopg.connect(conninfo, autocommit=True,
                             connect_timeout=int(CONNECT_TIMEOUT_SECONDS), **extra) as conn:
            migrate(conn)
        self._pool = ConnectionPool(conninfo, kwargs=extra, min_size=1, max_size=POOL_SIZE,
                                    configure=_prepare_connection, open=False,
                                    name="raresignal-storage")
        self._series_ids: dict[str, dict[SeriesKey, int]] = {}
        # The committed sequence of every sender, advanced only once a commit succeeds; the
        # database checks it again, so a stale value here can never store a batch twice.
        self._sequences: dict[tuple[str, str], int] = {}
        try:
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_SECONDS)
            self._sequences = self._committed_sequences()
        except BaseException:
            self._pool.close()
            raise

    def ping(self) -> None:
        """One round trip on a pooled connection, bounded by PING_TIMEOUT_SECONDS."""
        with self._pool.connection(timeout=PING_TIMEOUT_SECONDS) as conn:
            conn.execute("SELECT 1")

    # -- runs ------------------------------------------------------------------------

    def create_run(self, run: RunRecord) -> None:
        with self._pool.connection() as conn:
            conn.execute("INSERT INTO runs VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                         run_row(run))

    def update_run(self, run: RunRecord, writes: EngineWrites | None = None) -> None:
        with self._pool.connection() as conn, conn.cursor() as cur:
            cur.execute(_UPSERT_RUN, run_row(run))
            if writes is not None:
                self._write_engine(cur, writes)

    def list_runs(self, include_finished: bool) -> list[RunRecord]:
        query = "SELECT * FROM runs"
        if not include_finished:
            query += " WHERE finished_at = 0"
        with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            return [run_from_row(row) for row in cur.execute(query + " ORDER BY created_at")]

    def run(self, run_id: str) -> RunRecord | None:
        with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute("SELECT * FROM runs WHERE run_id = %s", (run_id,)).fetchone()
            return run_from_row(row) if row is not None else None

    # -- sequences and series ------------------------------------------------------------

    def last_sequence(self, run_id: str, sender_id: str) -> int:
        return self._sequences.get((run_id, sender_id), 0)

    def last_sequences(self, run_id: str) -> dict[str, int]:
        """Read from the database (another replica may have advanced them), and kept."""
        with self._pool.connection() as conn:
            rows = conn.execute("SELECT sender_id, last_sequence FROM sender_sequences "
                                "WHERE run_id = %s", (run_id,)).fetchall()
        for sender, sequence in rows:
            key = (run_id, sender)
            self._sequences[key] = max(self._sequences.get(key, 0), sequence)
        return {sender: self._sequences[(run_id, sender)] for sender, _ in rows}

    def _series_of(self, cur: psycopg.Cursor[Any], run_id: str) -> dict[SeriesKey, int]:
        ids = self._series_ids.get(run_id)
        if ids is None:
            cur.execute("SELECT series_id, metric, labels FROM series WHERE run_id = %s",
                        (run_id,))
            ids = {(row[1], row[2]): row[0] for row in cur.fetchall()}
            self._series_ids[run_id] = ids
        return ids

    def series_keys(self, run_id: str) -> Set[SeriesKey]:
        known = self._series_ids.get(run_id)
        if known is not None:  # asked for every batch: no connection needed once known
            return known.keys()
        with self._pool.connection() as conn, conn.cursor() as cur:
            return self._series_of(cur, run_id).keys()

    def apply_group(self, group: BatchGroup) -> None:
        """One transaction for the whole group; a sender sequence that the database
        already holds (another writer applied the batch) rolls all of it back."""
        created: list[tuple[dict[SeriesKey, int], SeriesKey]] = []
        try:
            # The pool's block commits the transaction, or rolls it back on an error; no
            # transaction() block, whose BEGIN would be a round trip of its own, where the
            # implicit one goes out in the pipeline with the first statements.
            with self._pool.connection() as conn:
                if group.batches:
                    self._write_group(conn, group, created)
        except BaseException as error:
            for series, key in created:
                series.pop(key, None)
            if isinstance(error, SequenceConflict):
                self._reload_sequences()
            raise
        self._sequences.update(group.sequences)

    def _committed_sequences(self) -> dict[tuple[str, str], int]:
        with self._pool.connection() as conn:
            return {(row[0], row[1]): row[2] for row in conn.execute(
                "SELECT run_id, sender_id, last_sequence FROM sender_sequences")}

    def _reload_sequences(self) -> None:
        """Takes the committed sequences from the database, so the ledger acknowledges a
        batch another writer stored instead of failing it again."""
        # On a failure the conflict is raised all the same, and the next one reloads.
        with contextlib.suppress(psycopg.Error):
            self._sequences = self._committed_sequences()

    def _write_group(self, conn: psycopg.Connection[Any], group: BatchGroup,
                     created: list[tuple[dict[SeriesKey, int], SeriesKey]]) -> None:
        """The group's statements but the COPY go out in one pipeline, one round trip
        (and one wake-up of each side) instead of one each; COPY cannot be pipelined, so
        it follows once the series' last steps are back."""
        with conn.cursor() as cur:
            self._create_series(cur, group, created)  # only a run's first reports
        rows, latest = self._sample_rows(group)
        with conn.pipeline(), conn.cursor() as sequences, conn.cursor() as series, \
                conn.cursor() as cur:
            keys = self._advance_sequences(sequences, group.sequences)
            if latest:
                newest = [latest[series_id] for series_id in sorted(latest)]
                ids = _number_array(sorted(latest))
                series.execute(_ADVANCE_SERIES, (
                    ids, ids, _number_array(map(_STEP_OF_NEWEST, newest)),
                    _number_array(map(_VALUE_OF_NEWEST, newest)),
                    _number_array(map(_WALL_TIME_OF_NEWEST, newest))))
            self._upsert_runs(cur, [group.runs[run_id] for run_id in sorted(group.runs)])
            if group.evaluations:
                self._enqueue(cur, group.evaluations)
            self._write_engine(cur, group.engine_writes)
            self._check_sequences(sequences, group.sequences, keys)
            last_steps = dict(series.fetchall()) if latest else {}
        with conn.cursor() as cur:
            self._insert_samples(cur, rows, last_steps)

    def _upsert_runs(self, cur: psycopg.Cursor[Any], runs: list[RunRecord]) -> None:
        rows = [run_row(run) for run in runs]
        columns = [_number_array(column) if index in _RUN_NUMBER_COLUMNS else list(column)
                   for index, column in enumerate(zip(*rows, strict=True))]
        cur.execute(_UPSERT_RUNS, columns)

    def _advance_sequences(self, cur: psycopg.Cursor[Any],
                           sequences: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
        """Sends the upsert of the group's sender sequences; returns the senders in the
        order sent, for :meth:`_check_sequences` once the result is back."""
        keys = list(sequences)
        cur.execute(_ADVANCE_SEQUENCES, ([k[0] for k in keys], [k[1] for k in keys],
                                         _number_array(map(sequences.__getitem__, keys))))
        return keys

    @staticmethod
    def _check_sequences(cur: psycopg.Cursor[Any], sequences: dict[tuple[str, str], int],
                         keys: list[tuple[str, str]]) -> None:
        """Raises SequenceConflict when a sender's sequence was already committed."""
        advanced = {(row[0], row[1]) for row in cur.fetchall()}
        stale = [key for key in keys if key not in advanced]
        if stale:
            run_id, sender_id = stale[0]
            raise SequenceConflict(
                f"sequence {sequences[stale[0]]} of sender {sender_id!r} of run {run_id!r} "
                f"(and {len(stale) - 1} more) is already committed by another writer")

    def _create_series(self, cur: psycopg.Cursor[Any], group: BatchGroup,
                       created: list[tuple[dict[SeriesKey, int], SeriesKey]]) -> None:
        """Creates, in one statement, the series the group is the first to report."""
        missing: dict[tuple[str, str, str], dict[SeriesKey, int]] = {}
        for write in group.batches:
            run_id = write.run.run_id
            series = self._series_of(cur, run_id)
            for key in write.newest:
                if key not in series:
                    missing[(run_id, *key)] = series
        if not missing:
            return
        keys = list(missing)
        cur.execute(_CREATE_SERIES, ([k[0] for k in keys], [k[1] for k in keys],
                                     [k[2] for k in keys]))
        for series_id, run_id, metric, labels in cur.fetchall():
            series = missing[(run_id, metric, labels)]
            series[(metric, labels)] = series_id
            created.append((series, (metric, labels)))

    def _sample_rows(self, group: BatchGroup
                     ) -> tuple[SampleRows, dict[int, tuple[int, float, float]]]:
        """The group's sample rows, one per (series, step) with the later sample winning,
        and the newest value of each series they touch."""
        merged: SampleRows = {}
        latest: dict[int, tuple[int, float, float]] = {}
        for write in group.batches:
            series = self._series_ids[write.run.run_id]
            for key, (step, value, wall_time) in write.newest.items():
                series_id = series[key]
                current = latest.get(series_id)
                if current is None or step >= current[0]:
                    latest[series_id] = (step, value, wall_time)
            # The same as one assignment per sample, iterated in C rather than Python.
            samples = write.samples
            ids = map(series.__getitem__, map(_SERIES_KEY, samples))
            keys = zip(ids, map(_STEP, samples), strict=True)
            merged.update(zip(keys, map(_POINT, samples), strict=True))
        return merged, latest

    def _insert_samples(self, cur: psycopg.Cursor[Any], rows: SampleRows,
                        last_steps: dict[int, int]) -> None:
        """COPYs the rows above their series' last step (as it was before the group) into
        the samples; the rest, re-reported steps, replace the stored ones."""
        if not rows:
            return
        new, old = rows, {}
        # Whether any step is at or below its series' last, compared in C, not per row in
        # Python: nearly always none is.
        if any(map(le, map(_STEP_OF_ROW, rows), map(last_steps.__getitem__,
                                                     map(_SERIES_OF_ROW, rows)))):
            new = {key: row for key, row in rows.items() if key[1] > last_steps[key[0]]}
            old = {key: row for key, row in rows.items() if key[1] <= last_steps[key[0]]}
        if new:
            with cur.copy(_COPY_SAMPLES) as copy:
                copy.write(binary_copy.sample_rows(new))
        if old:
            with cur.copy(_COPY_STAGING) as copy:
                copy.write(binary_copy.sample_rows(old))
            cur.execute(_REPLACE_OLD_SAMPLES)

    def _write_engine(self, cur: psycopg.Cursor[Any], writes: EngineWrites) -> None:
        if writes.rule_states:
            states = {(run_id, key): state for run_id, key, state in writes.rule_states}
            keys = sorted(states)  # one lock order for any two writers
            cur.execute(_UPSERT_RULE_STATES, ([k[0] for k in keys], [k[1] for k in keys],
                                              [json.dumps(states[k]) for k in keys]))
        if writes.alerts:
            cur.executemany(_UPSERT_ALERT, [alert_row(alert) for alert in writes.alerts])
        if writes.changes:
            cur.executemany(
                "INSERT INTO alert_history VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                [(c.alert.alert_id, c.previous_state, c.alert.state, c.at, c.alert.value,
                  c.alert.step) for c in writes.changes])
        for run_id in self.retention.runs_to_prune(writes.alerts):
            stale = cur.execute(
                "SELECT alert_id FROM alerts WHERE run_id = %s AND state = %s "
                "ORDER BY started_at DESC, alert_id DESC OFFSET %s",
                (run_id, ALERT_STATE_RESOLVED, self.retention.alerts_per_run)).fetchall()
            cur.executemany("DELETE FROM alert_history WHERE alert_id = %s", stale)
            cur.executemany("DELETE FROM alerts WHERE alert_id = %s", stale)

    # -- replicas --------------------------------------------------------------------

    def enqueue(self, evaluations: Sequence[Evaluation]) -> None:
        with self._pool.connection() as conn, conn.cursor() as cur:
            self._enqueue(cur, evaluations)

    def _enqueue(self, cur: psycopg.Cursor[Any], evaluations: Sequence[Evaluation]) -> None:
        if not evaluations:
            return
        run_ids, kinds, received, steps, series, points = zip(
            *map(_evaluation_row, evaluations), strict=True)
        cur.execute(_ENQUEUE, (list(run_ids), _number_array(kinds), _number_array(received),
                               _number_array(steps), list(series), list(points)))

    def hold_leases(self, owner: str, ttl_seconds: float,
                    keep_finished_seconds: float = 0.0) -> set[str]:
        """Takes at most its share, ceil(runs / live replicas), so a replica starting next
        to busy ones gets runs as they open or their leases expire instead of the first
        to renew taking every one. Held leases are never given up to even out."""
        with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute(_BEAT, (owner, ttl_seconds))
            cur.execute(_RENEW_LEASES, (ttl_seconds, owner))
            cur.execute(_DROP_DONE_LEASES, (owner, keep_finished_seconds))
            cur.execute(_SHARE, (keep_finished_seconds, owner))
            row = cur.fetchone()
            assert row is not None
            runs, replicas, held = row
            share = -(-runs // max(1, replicas))
            if share > held:
                cur.execute(_TAKE_LEASES,
                            (owner, ttl_seconds, keep_finished_seconds, share - held))
            cur.execute(_OWNED, (owner,))
            return {row[0] for row in cur.fetchall()}

    def share_rule_metrics(self, owner: str, metrics: Set[str]) -> frozenset[str]:
        with self._pool.connection() as conn:
            rows = conn.execute(_SHARE_RULE_METRICS, (sorted(metrics), owner)).fetchall()
        return frozenset(metrics).union(row[0] for row in rows)

    def resolved_since(self, run_id: str, since: float) -> list[AlertRecord]:
        with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(_RESOLVED_SINCE, (run_id, ALERT_STATE_RESOLVED, since))
            return [alert_from_row(row) for row in cur.fetchall()]

    def release_leases(self, owner: str) -> None:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("DELETE FROM run_leases WHERE owner = %s", (owner,))
            conn.execute("DELETE FROM replicas WHERE replica_id = %s", (owner,))

    def evaluate_queued(self, owner: str, run_ids: Set[str], evaluate: EvaluateQueued,
                        limit: int) -> set[str]:
        with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute(_LOCK_HELD, (list(run_ids), owner))
            held = [row[0] for row in cur.fetchall()]
            cur.execute(_TAKE_QUEUED, (held, limit))
            taken = sorted(cur.fetchall())  # RETURNING keeps no order: the queue's order
            evaluations = [
                Evaluation(run_id, kind, received_at, step,
                           decode_samples(series, points, legacy))
                for _, run_id, kind, received_at, step, series, points, legacy in taken]
            self._write_engine(cur, _only_runs(evaluate(evaluations, set(held)), set(held)))
        return set(run_ids) - set(held)

    # -- housekeeping ----------------------------------------------------------------

    def maintain(self, now: float) -> PartitionChanges | None:
        """Prepares the samples' daily partitions and drops those past the retention age;
        None when another replica is doing it."""
        with self._pool.connection() as conn:
            return maintain_partitions(conn, now, self.retention.max_age_days)

    # -- reads -----------------------------------------------------------------------

    def latest_values(self, run_id: str | None = None) -> list[LatestValue]:
        query = ("SELECT run_id, metric, labels, last_step, last_value, last_wall_time "
                 "FROM series WHERE last_value IS NOT NULL")
        params: tuple[str, ...] = ()
        if run_id is not None:
            query, params = query + " AND run_id = %s", (run_id,)
        with self._pool.connection() as conn:
            return [LatestValue(*row) for row in conn.execute(query, params)]

    def get_series(self, run_id: str, metric: str, labels_key: str, since_step: int,
                   limit: int | None = None) -> list[SeriesPoint]:
        with self._pool.connection() as conn, conn.cursor() as cur:
            series_id = self._series_of(cur, run_id).get((metric, labels_key))
            if series_id is None:
                return []
            cur.execute("SELECT step, value, wall_time FROM samples "
                        "WHERE series_id = %s AND step >= %s ORDER BY step LIMIT %s",
                        (series_id, since_step, limit))
            return [SeriesPoint(*row) for row in cur.fetchall()]

    def rule_states(self, run_id: str | None = None
                    ) -> Iterator[tuple[str, str, dict[str, Any]]]:
        query, params = "SELECT run_id, state_key, state FROM rule_states", ()
        if run_id is not None:
            query, params = query + " WHERE run_id = %s", (run_id,)
        with self._pool.connection() as conn:
            for row_run_id, key, state in conn.execute(query, params):
                yield row_run_id, key, json.loads(state)

    def alerts(self, run_id: str = "", states: Sequence[int] = (), rule: str = "",
               limit: int = 1000, run_ids: Sequence[str] | None = None,
               after: AlertPosition | None = None) -> list[AlertRecord]:
        query, params = alerts_query(run_id, states, rule, limit, run_ids, after)
        with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query, params)
            return [alert_from_row(row) for row in cur.fetchall()]

    def close(self) -> None:
        self._pool.close()

