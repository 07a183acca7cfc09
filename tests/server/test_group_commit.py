"""Group commit: batches applied together end exactly as if applied one at a time.

The ledger's group path is compared with its one-batch path on twin SQLite files (same
batches, same clock): the acknowledgements, every stored table and the alert engine's
state must be identical, whatever mix of good, duplicate and refused batches a group
holds. Then a real server takes many concurrent streams, and the WAL checkpointer is
shown to keep the log bounded.
"""

from __future__ import annotations

import dataclasses
import itertools
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from server_support import Client, batch, sample

from raresignal.protos.v1 import ingest_pb2
from raresignal.server.alerting.engine import AlertEngine, SeriesState
from raresignal.server.alerting.rules import parse_rules
from raresignal.server.serving import ledger as ledger_module
from raresignal.server.serving.auth import TokenStore
from raresignal.server.serving.ledger import BatchOutcome, Ledger, ReportRequest
from raresignal.server.serving.live import LiveState
from raresignal.server.serving.validation import RequestError
from raresignal.server.storage.checkpoint import WalCheckpointer
from raresignal.server.storage.records import BatchGroup
from raresignal.server.storage.sqlite import SQLiteStorage

RULES = parse_rules("""
rules:
  - alert: Retention
    metric: probe_retention
    op: "<"
    threshold: 0.3
    resolve_threshold: 0.5
    for: 2
    severity: critical
    summary: "probe {probe}: {value}"
  - alert: Collapse
    metric: probe_fisher_mass_ratio
    op: "<"
    threshold: 0.5
    relative_to: baseline_ratio
    resolve_threshold: 0.7
    for: 1
    baseline: {warmup: 1, window: 3, smoothing: 1.0}
""")
PRINCIPAL = TokenStore(None).principal(())
TABLES = ("runs", "series", "samples", "sender_sequences", "rule_states", "alerts",
          "alert_history")


class Clock:
    """A clock that advances one second per reading, the same for both twins."""

    def __init__(self) -> None:
        self._ticks = itertools.count(1_700_000_000)

    def __call__(self) -> float:
        return float(next(self._ticks))


def open_ledger(path: Path, storage_class: type[SQLiteStorage] = SQLiteStorage) -> Ledger:
    return Ledger(storage_class(str(path)), AlertEngine(RULES), LiveState(), clock=Clock())


def open_runs(ledger: Ledger, names: Sequence[str]) -> list[str]:
    return [ledger.open_run(ingest_pb2.OpenRunRequest(run_name=name, world_size=1),
                            PRINCIPAL)[0].run_id for name in names]


def retention_batch(run_id: str, sequence: int, value: float, sender: str = "rank0",
                    step: int | None = None) -> ingest_pb2.ReportBatch:
    step = sequence if step is None else step
    return batch(run_id, sequence, [
        sample("probe_retention", step, value, probe="rare"),
        sample("probe_fisher_mass_ratio", step, 2.0 if value > 0.3 else 0.1, probe="rare"),
        sample("loss", step, 1.0 + value)], sender=sender)


def outcome_view(results: Sequence[BatchOutcome | RequestError]) -> list[object]:
    return [(r.code, r.message) if isinstance(r, RequestError)
            else (r.applied, r.samples_applied,
                  [(c.alert.alert_id, c.previous_state, c.alert.state, c.alert.step,
                    c.alert.value, c.alert.summary) for c in r.changes])
            for r in results]


def dump(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table (series by what they are, not their row ids)."""
    with sqlite3.connect(path) as conn:
        tables = {table: sorted(conn.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
                  for table in TABLES if table not in ("samples", "series")}
        tables["samples"] = sorted(conn.execute(
            "SELECT run_id, metric, labels, step, value, wall_time FROM samples "
            "JOIN series USING (series_id)").fetchall())
        tables["series"] = sorted(conn.execute(
            "SELECT run_id, metric, labels, last_step, last_value, last_wall_time "
            "FROM series").fetchall(), key=repr)
    return tables


def engine_view(ledger: Ledger, run_id: str) -> list[tuple[str, object]]:
    """The engine's in-memory state of every series of the run it has stored state for."""
    keys = sorted(key for rid, key, _ in ledger.storage.rule_states() if rid == run_id)
    states = [(key, ledger.engine.state(run_id, key)) for key in keys]
    return [(key, state.to_dict() if state else None) for key, state in states]


def twin_ledgers(tmp_path: Path) -> tuple[Ledger, Ledger, list[str]]:
    """Two ledgers on files that start identical: the same runs, the same run ids."""
    first = open_ledger(tmp_path / "grouped.db")
    runs = open_runs(first, ["a", "b"])
    first.close()
    (tmp_path / "alone.db").write_bytes((tmp_path / "grouped.db").read_bytes())
    return open_ledger(tmp_path / "grouped.db"), open_ledger(tmp_path / "alone.db"), runs


def apply_alone(ledger: Ledger, batches: Sequence[ingest_pb2.ReportBatch]
                ) -> list[BatchOutcome | RequestError]:
    results: list[BatchOutcome | RequestError] = []
    for item in batches:
        try:
            results.append(ledger.apply(item, PRINCIPAL))
        except RequestError as error:
            results.append(error)
    return results


def test_a_mixed_group_ends_exactly_as_one_batch_at_a_time(tmp_path: Path) -> None:
    grouped, alone, (a, b) = twin_ledgers(tmp_path)
    bad_value = retention_batch(a, 3, 0.1)
    bad_value.samples[0].value = float("nan")
    groups = [
        [retention_batch(a, 1, 0.9), retention_batch(b, 1, 0.9),
         retention_batch(a, 1, 0.9),  # the same sender's batch twice in one group
         retention_batch(a, 2, 0.2), retention_batch(a, 2, 0.9, sender="rank1"),
         retention_batch(b, 2, 0.9)],
        [bad_value, retention_batch("no-such-run", 1, 0.5), retention_batch(a, 3, 0.2),
         retention_batch(b, 3, 0.1), retention_batch(a, 4, 0.1),
         retention_batch(b, 4, 0.1, step=1)],  # an old step again: stored, not re-evaluated
        [retention_batch(a, 5, 0.9), retention_batch(b, 5, 0.1), retention_batch(a, 2, 0.0),
         retention_batch(b, 6, 0.1)],
    ]
    kinds = []
    for group in groups:
        got = grouped.apply_many([ReportRequest.check(item, PRINCIPAL) for item in group])
        assert outcome_view(got) == outcome_view(apply_alone(alone, group))
        kinds.append([type(r).__name__ if isinstance(r, RequestError)
                      else ("applied" if r.applied else "duplicate") for r in got])
    # The groups did hold every kind of outcome, and alerts moved within them.
    assert kinds == [["applied", "applied", "duplicate", "applied", "applied", "applied"],
                     ["RequestError", "RequestError", "applied", "applied", "applied",
                      "applied"],
                     ["applied", "applied", "duplicate", "applied"]]
    assert {row[1] for row in dump(tmp_path / "grouped.db")["alerts"]} == {a, b}
    for run_id in (a, b):
        assert engine_view(grouped, run_id) == engine_view(alone, run_id)
    grouped.close()
    alone.close()
    assert dump(tmp_path / "grouped.db") == dump(tmp_path / "alone.db")


def test_the_series_limit_counts_series_created_earlier_in_the_group(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_module, "MAX_SERIES_PER_RUN", 4)
    grouped, alone, (a, _) = twin_ledgers(tmp_path)
    group = [retention_batch(a, 1, 0.9),  # 3 series
             batch(a, 2, [sample("grad_norm", 2, 1.0)]),  # the 4th: at the limit
             batch(a, 3, [sample("learning_rate", 3, 1.0)])]  # a 5th: refused
    got = grouped.apply_many([ReportRequest.check(item, PRINCIPAL) for item in group])
    assert outcome_view(got) == outcome_view(apply_alone(alone, group))
    assert isinstance(got[2], RequestError)
    assert got[2].code == grpc.StatusCode.RESOURCE_EXHAUSTED
    grouped.close()
    alone.close()


class FailsOnSender(SQLiteStorage):
    """SQLite storage whose disk "fails" for any write of one sender, as a full disk or
    an I/O error would: the transaction raises and rolls back."""

    failing_sender = "rank-broken"

    def apply_group(self, group: BatchGroup) -> None:
        if any(write.sender_id == self.failing_sender for write in group.batches):
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("ROLLBACK")
            raise sqlite3.OperationalError("disk I/O error")
        super().apply_group(group)


def test_a_storage_failure_fails_only_its_own_batch(tmp_path: Path) -> None:
    grouped, alone, (a, b) = twin_ledgers(tmp_path)
    grouped.close()
    grouped = open_ledger(tmp_path / "grouped.db", FailsOnSender)
    warm_up = [retention_batch(a, 1, 0.2), retention_batch(b, 1, 0.9)]
    grouped.apply_many([ReportRequest.check(item, PRINCIPAL) for item in warm_up])
    apply_alone(alone, warm_up)
    broken = retention_batch(a, 1, 0.1, sender=FailsOnSender.failing_sender, step=2)
    group = [retention_batch(b, 2, 0.1), broken, retention_batch(a, 2, 0.9, step=3)]
    got = grouped.apply_many([ReportRequest.check(item, PRINCIPAL) for item in group])
    assert isinstance(got[1], RequestError) and got[1].code == grpc.StatusCode.UNAVAILABLE
    assert "retry the batch" in got[1].message
    # The others went through as if the broken batch had never been sent, and the
    # engine forgot what the broken batch had made it see (its step 2 of run a).
    expected = apply_alone(alone, [group[0], group[2]])
    assert outcome_view([got[0], got[2]]) == outcome_view(expected)
    for run_id in (a, b):
        assert engine_view(grouped, run_id) == engine_view(alone, run_id)
    grouped.close()
    alone.close()
    # The retry read the clock again, so only the timestamps may differ.
    stored, expected_tables = dump(tmp_path / "grouped.db"), dump(tmp_path / "alone.db")
    for table in ("samples", "series", "sender_sequences", "rule_states"):
        assert stored[table] == expected_tables[table], table
    assert ([(row[0], row[5], row[8], row[10]) for row in stored["alerts"]]
            == [(row[0], row[5], row[8], row[10]) for row in expected_tables["alerts"]])


def test_concurrent_streams_store_every_sample_exactly_once(server: object,
                                                             client: Client) -> None:
    """Twelve streams at once (two of them senders of one run) through the real server:
    groups form, and every batch is applied once, then acknowledged as a duplicate."""
    runs = [client.open_run(f"load-{i}").run_id for i in range(10)]
    streams = [(run_id, "rank0") for run_id in runs] + [(runs[0], "rank1"), (runs[1], "rank1")]
    per_stream = 30
    acks: dict[tuple[str, str], list[tuple[int, int]]] = {}

    def send(run_id: str, sender: str) -> None:
        offset = 1000 if sender == "rank1" else 0  # the two senders of a run: other steps
        batches = [batch(run_id, seq, [sample("loss", offset + seq * 10 + k, float(k))
                                       for k in range(10)], sender=sender)
                   for seq in range(1, per_stream + 1)]
        acks[(run_id, sender)] = [(a.outcome, a.samples_applied)
                                  for a in client.report(batches)]

    threads = [threading.Thread(target=send, args=stream) for stream in streams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    applied = ingest_pb2.ReportAck.OUTCOME_APPLIED
    assert acks == {stream: [(applied, 10)] * per_stream for stream in streams}
    for index, run_id in enumerate(runs):
        senders = 2 if index < 2 else 1
        points = client.series(run_id, "loss")
        assert len(points) == senders * per_stream * 10
        assert len({step for step, _ in points}) == len(points)
    duplicate = ingest_pb2.ReportAck.OUTCOME_DUPLICATE
    replay = client.report([batch(runs[0], seq, [sample("loss", seq * 10, 9.0)],
                                  sender="rank1") for seq in range(1, per_stream + 1)])
    assert [(a.outcome, a.samples_applied) for a in replay] == [(duplicate, 0)] * per_stream
    assert (10, 0.0) in client.series(runs[0], "loss")  # not overwritten by the replay


class WatchedLock:
    """The storage's write lock as the checkpointer sees it: tells when it is wanted."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.wanted = threading.Event()

    def __enter__(self) -> None:
        self.wanted.set()
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def test_the_checkpointer_lets_the_wal_rewind_under_unbroken_writes(tmp_path: Path) -> None:
    """A passive checkpoint that ends while a write transaction is open leaves the WAL to
    grow (the next write appends); the checkpointer's round under the write lock copies
    the rest once that transaction commits, so the next write starts the WAL afresh."""
    path = str(tmp_path / "wal.db")
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    assert writer.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB)")
    lock = WatchedLock(threading.Lock())
    checkpointer = WalCheckpointer(path, lock, interval_seconds=3600.0, rewind_pages=100)
    wal = Path(path + "-wal")

    def write(rows: int) -> None:
        for _ in range(rows):
            with lock.lock:
                writer.execute("BEGIN IMMEDIATE")
                writer.execute("INSERT INTO t (payload) VALUES (zeroblob(3000))")
                writer.execute("COMMIT")

    write(200)  # about 200 pages: past the rewind threshold
    with lock.lock:  # a write transaction is open while the checkpoint round starts
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO t (payload) VALUES (zeroblob(3000))")
        round_ = threading.Thread(target=checkpointer.checkpoint)
        round_.start()
        assert lock.wanted.wait(30)  # its passive passes are done; it waits for the lock
        writer.execute("COMMIT")
    round_.join()
    assert checkpointer.rewinds == 1
    grown = wal.stat().st_size
    write(100)  # written from the start of the WAL again, not appended to it
    assert wal.stat().st_size == grown
    checkpointer.close()
    writer.close()
    with sqlite3.connect(path) as reader:  # everything is in the database, intact
        assert reader.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 301


def test_series_state_to_dict_is_dataclasses_asdict() -> None:
    """The hand-written to_dict must keep up with every field SeriesState gains."""
    state = SeriesState(seen=4, smoothed=1.5, window=[1.0, 2.0], median=1.5, mad=0.5,
                        last_step=9, last_value=0.25, consecutive=2, episodes=1,
                        alert_id="abc")
    assert state.to_dict() == dataclasses.asdict(state)
    assert state.to_dict()["window"] is not state.window  # a copy, as asdict makes
