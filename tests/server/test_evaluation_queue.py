"""The evaluation queue on a real PostgreSQL database: a replica queues for a run's owner
every sample of the metrics the live replicas' rules read and the newest sample of each
other series, packed; the owner fires on them and shows the newest values; a row queued in
the older JSON form is still evaluated."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import psycopg
import pytest
from postgres_cluster import Cluster
from rule_snippets import LOSS_HIGH_RULES
from server_support import FakeClock, batch, sample

from raresignal.protos.v1 import common_pb2, ingest_pb2
from raresignal.server.alerting.engine import AlertEngine
from raresignal.server.alerting.rules import parse_rules
from raresignal.server.serving.auth import EVERYONE
from raresignal.server.serving.ledger import Ledger, ReportRequest
from raresignal.server.serving.live import LiveState
from raresignal.server.serving.ownership import Ownership
from raresignal.server.storage.queue_codec import decode_samples
from raresignal.server.storage.records import REPORT, CheckedSample

pytest.importorskip("psycopg_pool")

from raresignal.server.storage.postgres import PostgresStorage

# Long enough that no lease or replica expires while a test runs on two busy cores: no
# test here waits for one to.
TTL = 10.0
GRAD_NORM_HIGH_RULES = LOSS_HIGH_RULES.replace("LossHigh", "GradNormHigh").replace(
    "metric: loss", "metric: grad_norm")


@pytest.fixture
def database(postgres_cluster: Cluster, postgres_db: str) -> Iterator[str]:
    yield postgres_cluster.admin_conninfo(postgres_db)


@pytest.fixture
def replica(database: str) -> Iterator[Callable[..., Ledger]]:
    opened: list[Ledger] = []

    def make(name: str, rules: str = LOSS_HIGH_RULES) -> Ledger:
        ledger = Ledger(PostgresStorage(database), AlertEngine(parse_rules(rules)),
                        LiveState(), clock=FakeClock(),
                        ownership=Ownership(name, TTL, TTL / 3, clock=FakeClock(0.0)))
        opened.append(ledger)
        return ledger

    yield make
    for ledger in opened:
        ledger.close()


def _queued(database: str) -> list[list[CheckedSample]]:
    with psycopg.connect(database) as conn:
        rows = conn.execute("SELECT series, points, samples FROM evaluation_queue "
                            "WHERE kind = %s ORDER BY position", (REPORT,)).fetchall()
    return [decode_samples(*row) for row in rows]


def _open(ledger: Ledger) -> str:
    run, _ = ledger.open_run(ingest_pb2.OpenRunRequest(run_name="job", world_size=1),
                             EVERYONE)
    return run.run_id


def test_the_owner_gets_the_samples_its_rules_read_and_each_series_newest(
        database: str, replica: Callable[..., Ledger]) -> None:
    owner, receiver = replica("a"), replica("b")
    run_id = _open(owner)
    owner.tick()
    receiver.tick()  # owns nothing: "a" holds the lease
    report = [sample(metric, step, value)
              for step, value in ((1, 1.0), (2, 500.0), (3, 2.0))
              for metric in ("loss", "grad_norm", "learning_rate")]
    assert receiver.apply(batch(run_id, 1, report), EVERYONE).applied
    assert [(s.metric, s.step) for s in _queued(database)[0]] == [
        ("loss", 1), ("loss", 2), ("loss", 3), ("grad_norm", 3), ("learning_rate", 3)]

    changes = owner.tick()
    assert [(c.alert.rule, c.alert.state) for c in changes] == [
        ("LossHigh", common_pb2.ALERT_STATE_FIRING), ("LossHigh", common_pb2.ALERT_STATE_RESOLVED)]
    shown = owner.live.snapshot(FakeClock().now, float("inf")).values[run_id]
    assert sorted((v.metric, v.step, v.value) for v in shown) == [
        ("grad_norm", 3, 2.0), ("learning_rate", 3, 2.0), ("loss", 3, 2.0)]
    assert _queued(database) == []


def _renew(ledger: Ledger) -> list:
    """A tick at which the replica's lease heartbeat is due."""
    assert ledger.ownership is not None and isinstance(ledger.ownership.clock, FakeClock)
    ledger.ownership.clock.now += TTL
    return ledger.tick()


def test_every_replica_queues_what_any_live_replicas_rules_read(
        database: str, replica: Callable[..., Ledger]) -> None:
    # "b" evaluates grad_norm under a rules file "a" does not have (a rolling change).
    receiver, owner = replica("a"), replica("b", GRAD_NORM_HIGH_RULES)
    receiver.tick()
    owner.tick()  # both are live now, and each has said what its rules read
    run_id = _open(receiver)
    _renew(owner)  # "b" takes the run
    _renew(receiver)  # "a" learns what the rules of "b" read
    assert owner.ownership is not None and owner.ownership.owned == {run_id}
    report = [sample(metric, step, 500.0 if metric == "grad_norm" else 1.0)
              for step in (1, 2) for metric in ("loss", "grad_norm")]
    assert receiver.apply(batch(run_id, 1, report), EVERYONE).applied
    assert [(s.metric, s.step) for s in _queued(database)[0]] == [
        ("loss", 1), ("grad_norm", 1), ("loss", 2), ("grad_norm", 2)]
    assert [(c.alert.rule, c.alert.state) for c in owner.tick()] == [
        ("GradNormHigh", common_pb2.ALERT_STATE_FIRING)]


def test_a_report_an_older_server_queued_as_json_is_evaluated(
        database: str, replica: Callable[..., Ledger]) -> None:
    owner = replica("a")
    run_id = _open(owner)
    owner.tick()
    legacy = json.dumps([["loss", "{}", 7, 500.0, 1.0]])
    with psycopg.connect(database) as conn:
        conn.execute("INSERT INTO evaluation_queue (run_id, kind, received_at, step, samples) "
                     "VALUES (%s, %s, %s, %s, %s)", (run_id, REPORT, FakeClock().now, 7, legacy))
    assert [(c.alert.rule, c.alert.state, c.alert.step) for c in owner.tick()] == [
        ("LossHigh", common_pb2.ALERT_STATE_FIRING, 7)]


def test_a_groups_reports_are_queued_in_the_order_they_were_applied(
        database: str, replica: Callable[..., Ledger]) -> None:
    receiver = replica("a")
    first, second = _open(receiver), _open(receiver)
    requests = [ReportRequest.check(batch(run_id, sequence, [sample("loss", step, 1.0)]),
                                    EVERYONE)
                for run_id, sequence, step in ((first, 1, 5), (second, 1, 7), (first, 2, 6))]
    assert all(o.applied for o in receiver.apply_many(requests))  # type: ignore[union-attr]
    with psycopg.connect(database) as conn:
        rows = conn.execute("SELECT run_id, step FROM evaluation_queue "
                            "ORDER BY position").fetchall()
    assert rows == [(first, 5), (second, 7), (first, 6)]
