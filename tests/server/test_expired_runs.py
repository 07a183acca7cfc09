"""Finished runs past the metrics TTL leave the live state and the alert engine, are not
loaded into them after a restart, and come back whole when resumed (real SQLite, fake
clock)."""

from __future__ import annotations

import math
from pathlib import Path

from server_support import FakeClock, batch, sample

from raresignal.protos.v1 import ingest_pb2
from raresignal.server.alerting.engine import AlertEngine
from raresignal.server.alerting.rules import parse_rules
from raresignal.server.serving.auth import TokenStore
from raresignal.server.serving.ledger import Ledger
from raresignal.server.serving.live import LiveState
from raresignal.server.storage.sqlite import SQLiteStorage

RULES = parse_rules("""
rules:
  - alert: LossHigh
    metric: loss
    op: ">"
    threshold: 100
""")
STATE_KEY = "LossHigh/fire/loss/{}"
PRINCIPAL = TokenStore(None).principal(())
TTL = 60.0


def open_ledger(path: Path, clock: FakeClock) -> Ledger:
    return Ledger(SQLiteStorage(str(path)), AlertEngine(RULES), LiveState(), clock=clock,
                  finished_run_ttl_seconds=TTL)


def finished_run(ledger: Ledger, name: str) -> str:
    run, _ = ledger.open_run(ingest_pb2.OpenRunRequest(run_name=name, world_size=1),
                             PRINCIPAL)
    ledger.apply(batch(run.run_id, 1, [sample("loss", 1, 2.5)]), PRINCIPAL)
    ledger.close_run(run.run_id, 0, PRINCIPAL)
    return run.run_id


def held(ledger: Ledger, clock: FakeClock) -> set[str]:
    """The runs whose series the live state holds (whatever the TTL would show)."""
    return {run.run_id for run in ledger.live.snapshot(clock.now, math.inf).runs}


def test_expired_runs_leave_memory_and_stay_out_after_a_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    ledger = open_ledger(tmp_path / "rs.db", clock)
    old = finished_run(ledger, "old")
    clock.now += TTL / 2
    recent = finished_run(ledger, "recent")
    assert held(ledger, clock) == {old, recent}
    clock.now += TTL / 2 + 1
    ledger.tick()
    assert held(ledger, clock) == {recent}
    assert ledger.engine.state(old, STATE_KEY) is None
    assert ledger.engine.state(recent, STATE_KEY) is not None
    assert ledger.live.snapshot(clock.now, TTL).finished_runs == 2
    ledger.close()

    reopened = open_ledger(tmp_path / "rs.db", clock)
    assert held(reopened, clock) == {recent}
    assert reopened.engine.state(old, STATE_KEY) is None
    assert reopened.live.snapshot(clock.now, TTL).finished_runs == 2
    # The run itself stays listed and readable.
    assert {run.run_id for run in reopened.list_runs(True, PRINCIPAL)} == {old, recent}
    assert [p.value for p in reopened.get_series(old, "loss", {}, 0, PRINCIPAL)] == [2.5]
    reopened.close()


def test_a_resumed_expired_run_comes_back_with_its_values_and_state(tmp_path: Path) -> None:
    clock = FakeClock()
    ledger = open_ledger(tmp_path / "rs.db", clock)
    run_id = finished_run(ledger, "back")
    clock.now += TTL + 1
    ledger.tick()
    assert held(ledger, clock) == set()
    ledger.open_run(ingest_pb2.OpenRunRequest(run_name="back", world_size=1,
                                              resume_run_id=run_id), PRINCIPAL)
    snap = ledger.live.snapshot(clock.now, TTL)
    assert [(v.metric, v.labels, v.value) for v in snap.values[run_id]] == [("loss", {}, 2.5)]
    assert snap.finished_runs == 0
    state = ledger.engine.state(run_id, STATE_KEY)
    assert state is not None
    ledger.close()
