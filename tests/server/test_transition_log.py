"""The log line per alert state change: in full up to a limit per run and window, then
one line with the count held back."""

from __future__ import annotations

import logging

import pytest

from raresignal.protos.v1 import common_pb2
from raresignal.server.alerting.transition_log import TransitionLog
from raresignal.server.storage.records import AlertChange, AlertRecord

FIRING = common_pb2.ALERT_STATE_FIRING
RESOLVED = common_pb2.ALERT_STATE_RESOLVED


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def change(run: str, step: int, state: int = FIRING) -> AlertChange:
    alert = AlertRecord(alert_id=f"{run}-a", run_id=f"id-{run}", run_name=run, rule="Flap",
                        labels={"probe": "rare"}, state=state, severity="warning", summary="",
                        value=0.25, threshold=0.3, step=step, started_at=0.0)
    return AlertChange(alert, RESOLVED if state == FIRING else FIRING, float(step))


@pytest.fixture
def logger() -> logging.Logger:
    return logging.getLogger("raresignal.test.transitions")


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [record.getMessage() for record in caplog.records]
    caplog.clear()
    return lines


def test_a_storm_is_cut_to_the_limit_then_summarised(
        logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=logger.name)
    clock = Clock()
    transitions = TransitionLog(logger, lines_per_window=3, window_seconds=60.0, clock=clock)
    transitions.record([change("flappy", step, FIRING if step % 2 else RESOLVED)
                        for step in range(1, 101)])
    assert messages(caplog) == [
        "alert firing: Flap {'probe': 'rare'} (run flappy, value 0.25, step 1)",
        "alert resolved: Flap {'probe': 'rare'} (run flappy, value 0.25, step 2)",
        "alert firing: Flap {'probe': 'rare'} (run flappy, value 0.25, step 3)"]
    clock.now = 59.0
    transitions.record([change("flappy", 101)])
    transitions.record([])
    assert messages(caplog) == []  # the window is not over yet: nothing more, no summary
    clock.now = 61.0
    transitions.record([])  # a clock tick with no change closes the window
    assert messages(caplog) == [
        "alert changes of run flappy: 98 more in 61 s not logged (limit 3 per run)"]
    transitions.record([change("flappy", 102)])  # a new window logs again
    assert messages(caplog) == [
        "alert firing: Flap {'probe': 'rare'} (run flappy, value 0.25, step 102)"]


def test_the_limit_is_per_run(logger: logging.Logger,
                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=logger.name)
    transitions = TransitionLog(logger, lines_per_window=2, clock=Clock())
    transitions.record([change("flappy", step) for step in range(1, 11)] + [change("calm", 5)])
    assert [line.split("(run ")[1].split(",")[0] for line in messages(caplog)] == [
        "flappy", "flappy", "calm"]


def test_a_quiet_window_ends_without_a_summary(logger: logging.Logger,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=logger.name)
    clock = Clock()
    transitions = TransitionLog(logger, lines_per_window=2, clock=clock)
    transitions.record([change("calm", 1), change("calm", 2, RESOLVED)])
    clock.now = 120.0
    transitions.record([])
    assert len(messages(caplog)) == 2
