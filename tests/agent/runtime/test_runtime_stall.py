"""RunStalled with a real Monitor and the real server: a loop that pauses (a validation
pass) stays quiet, a loop that stops stepping while its process lives fires, and its next
step resolves the alert.

The server's clock is a fake the test moves, so each step takes exactly one second in the
server's eyes however busy the machine is; the agent's sender and its heartbeats run on
real time."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from runtime_toys import LossEstimator

from raresignal.agent import Monitor, MonitorConfig
from raresignal.client.channels import open_channel
from raresignal.protos.v1 import alerts_pb2, alerts_pb2_grpc, common_pb2
from raresignal.server.serving import app
from raresignal.server.serving.app import ServerConfig, ServerHandle, start_in_thread
from raresignal.server.serving.ledger import Ledger

# A floor under the learned window (20 x 1 s), so the learned part decides.
RULES = """
rules:
  - alert: RunStalled
    stall: {step_time_factor: 20, step_time_quantile: 0.95, floor_seconds: 5, history: 64,
            learn_after: 8}
"""
WINDOW = 20.0


class FakeClock:
    """The server's wall clock, moved by the test only."""

    def __init__(self) -> None:
        self._now = 1_700_000_000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


def wait_until(condition: Callable[[], object], seconds: float = 20.0) -> object:
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.02)
    return value


class StalledRunHarness:
    """A monitored toy loop, the server it reports to, and what the server says of it."""

    def __init__(self, server: ServerHandle, clock: FakeClock, spool: Path) -> None:
        self.clock = clock
        self.target = server.grpc_target
        config = MonitorConfig(spool_dir=str(spool), report_interval_seconds=0.05,
                               heartbeat_interval_seconds=0.05, network_timeout_seconds=5.0,
                               reconnect_initial_seconds=0.05, reconnect_max_seconds=0.3,
                               # Every step reports its loss: a stretched cadence would leave
                               # steps the server never hears of, and train() waits for each.
                               max_interval_factor=1)
        self.monitor = Monitor(torch.nn.Linear(2, 2), None, server=self.target,
                               run_name="stalling", estimators=[LossEstimator()],
                               config=config)
        self.step = -1

    def train(self, steps: int) -> None:
        """Each step reaches the server, then one second passes on its clock (so the step
        has stood for one second when this returns)."""
        for _ in range(steps):
            self.monitor.step(loss=torch.tensor(0.5))
            self.step += 1
            wait_until(lambda: self.last_step() >= self.step)
            self.clock.advance(1.0)

    def pause(self, seconds: float) -> None:
        """No step for ``seconds`` of the server's clock; the process lives and heartbeats.
        The clock moves in parts shorter than the window, each heard by the server, so
        that only the frozen step, never silence, can count."""
        while seconds > 0:
            part = min(seconds, WINDOW / 4)
            self.clock.advance(part)
            seconds -= part
            self.heard_after_now()

    def heard_after_now(self) -> None:
        """Waits for two heartbeats: the second was sent, and judged, at the clock's time."""
        sender = self.monitor.sender
        assert sender is not None
        sent = sender.heartbeats_sent
        wait_until(lambda: sender.heartbeats_sent >= sent + 2)

    def last_step(self) -> int:
        run_id = self.monitor.run_id
        if not run_id:
            return -1
        with open_channel(self.target) as channel:
            runs = alerts_pb2_grpc.RunsStub(channel).ListRuns(
                alerts_pb2.ListRunsRequest(), timeout=10).runs
        return next((run.last_step for run in runs if run.run_id == run_id), -1)

    def stall_alerts(self) -> list[common_pb2.Alert]:
        request = alerts_pb2.ListAlertsRequest(filter=alerts_pb2.AlertFilter(
            run_id=self.monitor.run_id or "", rule="RunStalled"))
        with open_channel(self.target) as channel:
            return list(alerts_pb2_grpc.AlertsStub(channel).ListAlerts(request,
                                                                        timeout=10).alerts)


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StalledRunHarness]:
    clock = FakeClock()
    monkeypatch.setattr(app, "Ledger", functools.partial(Ledger, clock=clock))
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    config = ServerConfig(db_path=str(tmp_path / "rs.db"), host="127.0.0.1", grpc_port=0,
                          metrics_port=0, health_port=0, rules_path=str(rules),
                          clock_interval_seconds=0.05)
    with start_in_thread(config) as server:
        harness = StalledRunHarness(server, clock, tmp_path / "spool")
        yield harness
        harness.monitor.close()


def test_a_validation_pause_does_not_stall_the_run(harness: StalledRunHarness) -> None:
    harness.train(24)  # enough steps that one long pause stays out of the 95th percentile
    harness.pause(10.0)  # ten step times, twice the floor, half the learned window
    harness.train(4)
    assert harness.stall_alerts() == []


def test_a_loop_that_stops_stepping_while_alive_stalls_until_it_steps(
        harness: StalledRunHarness) -> None:
    harness.train(24)
    harness.pause(WINDOW - 1.0)  # frozen for exactly the window: not yet beyond it
    assert harness.stall_alerts() == []
    harness.pause(WINDOW / 4)
    (alert,) = wait_until(harness.stall_alerts)  # type: ignore[misc]
    assert alert.state == common_pb2.ALERT_STATE_FIRING
    assert "its step stopped advancing" in alert.summary and alert.step == harness.step
    harness.train(1)
    wait_until(lambda: [a.state for a in harness.stall_alerts()]
               == [common_pb2.ALERT_STATE_RESOLVED])
