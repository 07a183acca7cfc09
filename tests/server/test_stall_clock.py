"""The ledger feeds the stall clock: heartbeats keep a paused run quiet, and a restarted
server gives every run a full window before calling it silent (real SQLite, fake clock)."""

from __future__ import annotations

from pathlib import Path

from server_support import FakeClock, batch, sample

from raresignal.protos.v1 import common_pb2, ingest_pb2
from raresignal.server.alerting.engine import AlertEngine
from raresignal.server.alerting.rules import parse_rules
from raresignal.server.serving.auth import TokenStore
from raresignal.server.serving.ledger import Ledger
from raresignal.server.serving.live import LiveState
from raresignal.server.storage.sqlite import SQLiteStorage

RULES = parse_rules("""
rules:
  - alert: RunStalled
    stall: {floor_seconds: 30, learn_after: 2}
""")
PRINCIPAL = TokenStore(None).principal(())
FIRING = common_pb2.ALERT_STATE_FIRING


def open_ledger(path: Path, clock: FakeClock) -> Ledger:
    return Ledger(SQLiteStorage(str(path)), AlertEngine(RULES), LiveState(), clock=clock)


def start_run(ledger: Ledger, clock: FakeClock) -> str:
    run, _ = ledger.open_run(ingest_pb2.OpenRunRequest(run_name="r", world_size=1,
                                                       report_interval_seconds=1.0), PRINCIPAL)
    for step in range(1, 4):
        clock.now += 1.0
        ledger.apply(batch(run.run_id, step, [sample("step", step, step)]), PRINCIPAL)
    return run.run_id


def beat(ledger: Ledger, run_id: str, step: int) -> list[object]:
    return list(ledger.heartbeat(ingest_pb2.HeartbeatRequest(
        run_id=run_id, sender_id="rank0-test", step=step), PRINCIPAL))


def test_heartbeats_keep_a_paused_run_heard_and_a_frozen_one_stalls(tmp_path: Path) -> None:
    clock = FakeClock()
    ledger = open_ledger(tmp_path / "rs.db", clock)
    run_id = start_run(ledger, clock)
    for _ in range(3):  # 30 s without a step, heard every 10 s: up to the floor
        clock.now += 10.0
        assert beat(ledger, run_id, 3) == [] and ledger.tick() == []
    clock.now += 1.0
    (fired,) = ledger.tick()
    assert fired.alert.state == FIRING and "step stopped advancing" in fired.alert.summary
    # Stored with the run: a restarted server still knows the alert is open.
    assert [a.rule for a in ledger.storage.alerts(states=(FIRING,), limit=10)] == [
        "RunStalled"]
    ledger.close()


def test_a_restarted_server_counts_silence_from_its_start(tmp_path: Path) -> None:
    clock = FakeClock()
    ledger = open_ledger(tmp_path / "rs.db", clock)
    run_id = start_run(ledger, clock)
    ledger.close()
    clock.now += 3600.0  # the server was down for an hour
    ledger = open_ledger(tmp_path / "rs.db", clock)
    clock.now += 30.0
    assert ledger.tick() == []  # a full window since the restart: not yet
    assert beat(ledger, run_id, 3) == []  # the process lives
    clock.now += 31.0
    (fired,) = ledger.tick()  # silent for longer than the floor since that heartbeat
    assert "nothing was heard" in fired.alert.summary
    ledger.close()
