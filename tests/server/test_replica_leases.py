"""Leases of runs' alert evaluation between replicas on one real PostgreSQL database: a
live lease is never taken, an expired one is taken at the next renewal, a replica that
lost a lease can neither take its queued evaluations nor store engine writes, and the
queue hands each evaluation to the owner once, whichever replica received it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import psycopg
import pytest
from postgres_cluster import Cluster
from rule_snippets import LOSS_HIGH_RULES
from server_support import FakeClock, batch, sample

from raresignal.protos.v1 import common_pb2, ingest_pb2
from raresignal.server.alerting.engine import AlertEngine
from raresignal.server.alerting.rules import parse_rules
from raresignal.server.serving.auth import EVERYONE
from raresignal.server.serving.ledger import Ledger
from raresignal.server.serving.live import LiveState
from raresignal.server.serving.ownership import Ownership
from raresignal.server.storage.records import (
    HEARTBEAT,
    REPORT,
    CheckedSample,
    EngineWrites,
    Evaluation,
    RunRecord,
)

psycopg_pool = pytest.importorskip("psycopg_pool")

from raresignal.server.storage.postgres import PostgresStorage  # noqa: E402

# Long enough that a renewal on two busy cores is never late; the tests that need a lease
# to expire wait for the database's clock to pass it.
TTL = 3.0



@pytest.fixture
def open_storage(postgres_cluster: Cluster, postgres_db: str
                 ) -> Iterator[Callable[[], PostgresStorage]]:
    opened: list[PostgresStorage] = []

    def make() -> PostgresStorage:
        store = PostgresStorage(postgres_cluster.admin_conninfo(postgres_db))
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def _run(run_id: str) -> RunRecord:
    return RunRecord(run_id=run_id, run_name="name-" + run_id, state=1, world_size=1,
                     created_at=1.0, updated_at=1.0, last_step=0,
                     report_interval_seconds=0.0)


def _wait_until_expired(store: PostgresStorage, owner: str) -> None:
    """Waits, on the database's clock, until every lease of ``owner`` has expired."""
    deadline = time.monotonic() + 10 * TTL
    with psycopg.connect(store_conninfo(store)) as conn:
        while conn.execute("SELECT count(*) FROM run_leases WHERE owner = %s "
                           "AND expires_at >= clock_timestamp()", (owner,)).fetchone() != (0,):
            assert time.monotonic() < deadline, "the leases never expired"
            time.sleep(0.05)


def store_conninfo(store: PostgresStorage) -> str:
    return str(store._pool.conninfo)


def test_a_live_lease_is_kept_and_an_expired_one_is_taken_at_the_next_renewal(
        open_storage: Callable[[], PostgresStorage]) -> None:
    first, second = open_storage(), open_storage()
    for run_id in ("r1", "r2"):
        first.create_run(_run(run_id))
    assert first.hold_leases("a", TTL) == {"r1", "r2"}
    # Another replica, or "a" restarted under a new name, does not steal live leases.
    assert second.hold_leases("b", TTL) == set()
    assert open_storage().hold_leases("a-restarted", TTL) == set()
    assert first.hold_leases("a", TTL) == {"r1", "r2"}  # renewing keeps them

    # "a" stops renewing: once its leases expire, the next renewal of "b" takes them all.
    _wait_until_expired(first, "a")
    assert second.hold_leases("b", TTL) == {"r1", "r2"}
    assert first.hold_leases("a", TTL) == set()


def test_a_replica_shutting_down_hands_its_runs_over_at_once(
        open_storage: Callable[[], PostgresStorage]) -> None:
    first, second = open_storage(), open_storage()
    first.create_run(_run("r1"))
    assert first.hold_leases("a", TTL) == {"r1"}
    first.release_leases("a")
    assert second.hold_leases("b", TTL) == {"r1"}  # no TTL to wait out


def test_a_finished_run_keeps_its_owner_while_metrics_show_it(
        open_storage: Callable[[], PostgresStorage]) -> None:
    store = open_storage()
    store.create_run(_run("old"))
    store.update_run(replace(_run("old"), finished_at=time.time() - 600, state=2))
    store.create_run(_run("recent"))
    store.update_run(replace(_run("recent"), finished_at=time.time(), state=2))
    assert store.hold_leases("a", TTL, keep_finished_seconds=300) == {"recent"}


def test_a_replica_that_lost_its_lease_takes_nothing_and_stores_nothing(
        open_storage: Callable[[], PostgresStorage]) -> None:
    first, second = open_storage(), open_storage()
    first.create_run(_run("r1"))
    assert first.hold_leases("a", TTL) == {"r1"}
    sample_row = CheckedSample("loss", "{}", 1, 500.0, 0.0)
    first.enqueue([Evaluation("r1", REPORT, 10.0, 1, [sample_row])])
    _wait_until_expired(first, "a")
    assert second.hold_leases("b", TTL) == {"r1"}

    def stale_engine(evaluations: list[Evaluation], held: set[str]) -> EngineWrites:
        assert evaluations == [] and held == set()
        return EngineWrites(rule_states=[("r1", "stale", {"x": 1})])

    # "a" still believes it owns r1: the database tells it otherwise.
    assert first.evaluate_queued("a", {"r1"}, stale_engine, 100) == {"r1"}
    taken: list[Evaluation] = []

    def owner_engine(evaluations: list[Evaluation], held: set[str]) -> EngineWrites:
        assert held == {"r1"}
        taken.extend(evaluations)
        return EngineWrites()

    assert second.evaluate_queued("b", {"r1"}, owner_engine, 100) == set()
    assert taken == [Evaluation("r1", REPORT, 10.0, 1, [sample_row])]
    assert second.evaluate_queued("b", {"r1"}, owner_engine, 100) == set()
    assert len(taken) == 1  # each evaluation is taken once
    assert [s for s in second.rule_states() if s[1] == "stale"] == []


def _replica(store: PostgresStorage, name: str, clock: FakeClock,
             renewals: FakeClock | None = None, finished_ttl: float = float("inf")) -> Ledger:
    """A replica's ledger; ``renewals`` is the clock its lease heartbeat reads."""
    ownership = Ownership(name, TTL, TTL / 3, clock=renewals or FakeClock(0.0))
    return Ledger(store, AlertEngine(parse_rules(LOSS_HIGH_RULES)), LiveState(), clock=clock,
                  ownership=ownership, finished_run_ttl_seconds=finished_ttl)


def test_the_owner_evaluates_reports_any_replica_applied_and_a_successor_carries_on(
        open_storage: Callable[[], PostgresStorage]) -> None:
    clock = FakeClock()
    first = _replica(open_storage(), "a", clock)
    renewals = FakeClock(0.0)
    second = _replica(open_storage(), "b", clock, renewals)
    run, _ = first.open_run(ingest_pb2.OpenRunRequest(run_name="job", world_size=1),
                            EVERYONE)
    assert first.tick() == [] and first.ownership is not None
    assert first.ownership.owned == {run.run_id}
    assert second.tick() == []  # "b" owns nothing: the lease is live

    # "b" receives the report that crosses the threshold; "a", the owner, fires.
    outcome = second.apply(batch(run.run_id, 1, [sample("loss", 1, 500.0)]), EVERYONE)
    assert outcome.applied and outcome.changes == []
    fired = first.tick()
    assert [(c.alert.rule, c.alert.state) for c in fired] == [
        ("LossHigh", common_pb2.ALERT_STATE_FIRING)]
    assert first.tick() == []  # nothing is evaluated twice

    # "a" dies; once its lease expires, "b" takes the run with its open alert and resolves
    # it when the loss falls, without firing it again.
    _wait_until_expired(first.storage, "a")  # type: ignore[arg-type]
    renewals.now += TTL  # the heartbeat of "b" is due
    assert second.tick() == []
    assert second.ownership is not None and second.ownership.owned == {run.run_id}
    assert [a.alert_id for a in second.active_alerts()] == [fired[0].alert.alert_id]
    second.apply(batch(run.run_id, 2, [sample("loss", 2, 1.0)]), EVERYONE)
    resolved = second.tick()
    assert [(c.alert.alert_id, c.previous_state, c.alert.state) for c in resolved] == [
        (fired[0].alert.alert_id, common_pb2.ALERT_STATE_FIRING,
         common_pb2.ALERT_STATE_RESOLVED)]
    with psycopg.connect(store_conninfo(second.storage)) as conn:  # type: ignore[arg-type]
        history = conn.execute("SELECT previous_state, state FROM alert_history").fetchall()
    assert sorted(history) == [(0, common_pb2.ALERT_STATE_FIRING),
                               (common_pb2.ALERT_STATE_FIRING, common_pb2.ALERT_STATE_RESOLVED)]


def test_a_batch_another_replica_applied_is_acknowledged_as_a_duplicate(
        open_storage: Callable[[], PostgresStorage]) -> None:
    clock = FakeClock()
    first = _replica(open_storage(), "a", clock)
    second = _replica(open_storage(), "b", clock)
    run, _ = first.open_run(ingest_pb2.OpenRunRequest(run_name="job", world_size=1),
                            EVERYONE)
    # "b" learns the run and its sender at sequence 1, then "a" applies sequences 2 and 3.
    assert second.apply(batch(run.run_id, 1, [sample("loss", 1, 1.0)]), EVERYONE).applied
    for sequence in (2, 3):
        assert first.apply(batch(run.run_id, sequence, [sample("loss", sequence, 1.0)]),
                           EVERYONE).applied
    # The sender, reconnected to "b", replays 2 and 3: "b" remembers 1, the database 3.
    for sequence in (2, 3):
        outcome = second.apply(batch(run.run_id, sequence, [sample("loss", sequence, 9.0)]),
                               EVERYONE)
        assert not outcome.applied
    assert second.apply(batch(run.run_id, 4, [sample("loss", 4, 1.0)]), EVERYONE).applied
    assert [point.value for point in second.get_series(run.run_id, "loss", {}, 0, EVERYONE)
            ] == [1.0] * 4
    # Reopened on "b", the run's senders stand where the database says.
    reopened = ingest_pb2.OpenRunRequest(run_name="job", world_size=1,
                                         resume_run_id=run.run_id)
    assert second.open_run(reopened, EVERYONE)[1] == {"rank0-test": 4}


def test_what_is_queued_for_a_run_finished_past_the_ttl_is_dropped(
        open_storage: Callable[[], PostgresStorage]) -> None:
    clock = FakeClock()
    store = open_storage()
    replica = _replica(store, "a", clock, finished_ttl=10.0)
    run, _ = replica.open_run(ingest_pb2.OpenRunRequest(run_name="job", world_size=1),
                              EVERYONE)
    replica.tick()
    replica.close_run(run.run_id, common_pb2.RUN_STATE_COMPLETED, EVERYONE)
    replica.tick()
    clock.now += 100.0
    replica.tick()  # the run leaves memory
    # A heartbeat its sender sent as the run closed, applied late by another replica.
    store.enqueue([Evaluation(run.run_id, HEARTBEAT, clock.now, 5)])
    assert replica.tick() == []
    with psycopg.connect(store_conninfo(store)) as conn:
        assert conn.execute("SELECT count(*) FROM evaluation_queue").fetchone() == (0,)


class ReadRecordingStorage(PostgresStorage):
    """Records the run each engine-state and latest-value read asks for (None: all)."""

    reads: list[tuple[str, str | None]]

    def rule_states(self, run_id: str | None = None) -> Iterator[tuple[str, str, dict]]:
        self.reads.append(("rule_states", run_id))
        return super().rule_states(run_id)

    def latest_values(self, run_id: str | None = None) -> list:
        self.reads.append(("latest_values", run_id))
        return super().latest_values(run_id)


def test_a_takeover_reads_only_the_taken_runs_state(
        postgres_cluster: Cluster, postgres_db: str,
        open_storage: Callable[[], PostgresStorage]) -> None:
    clock = FakeClock()
    first = _replica(open_storage(), "a", clock)
    runs = [first.open_run(ingest_pb2.OpenRunRequest(run_name=name, world_size=1),
                           EVERYONE)[0].run_id for name in ("one", "two")]
    first.apply(batch(runs[0], 1, [sample("loss", 1, 500.0)]), EVERYONE)
    first.tick()
    ReadRecordingStorage.reads = []
    recording = ReadRecordingStorage(postgres_cluster.admin_conninfo(postgres_db))
    try:
        renewals = FakeClock(0.0)
        second = _replica(recording, "b", clock, renewals)
        _wait_until_expired(first.storage, "a")  # type: ignore[arg-type]
        recording.reads.clear()  # what a start reads is not a takeover's
        renewals.now += TTL
        second.tick()
        assert second.ownership is not None and second.ownership.owned == set(runs)
        assert sorted(recording.reads, key=str) == sorted(
            [(read, run) for read in ("rule_states", "latest_values") for run in runs],
            key=str)
        assert [a.run_id for a in second.active_alerts()] == [runs[0]]
    finally:
        recording.close()


def test_a_replica_takes_its_share_of_free_runs_not_all_of_them(
        open_storage: Callable[[], PostgresStorage]) -> None:
    first, second = open_storage(), open_storage()
    # Both replicas are live before any run opens (they renew with nothing to take).
    assert first.hold_leases("a", TTL) == set() and second.hold_leases("b", TTL) == set()
    for run_id in ("r1", "r2", "r3", "r4", "r5"):
        first.create_run(_run(run_id))
    taken_by_a = first.hold_leases("a", TTL)
    assert len(taken_by_a) == 3  # ceil(5 runs / 2 live replicas)
    taken_by_b = second.hold_leases("b", TTL)
    assert taken_by_b == {"r1", "r2", "r3", "r4", "r5"} - taken_by_a
    assert first.hold_leases("a", TTL) == taken_by_a  # renewing keeps its share

    # "b" shuts down: it is no longer live, so "a" takes the runs it gave back.
    second.release_leases("b")
    assert first.hold_leases("a", TTL) == {"r1", "r2", "r3", "r4", "r5"}
