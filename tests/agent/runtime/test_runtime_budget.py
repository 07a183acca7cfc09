"""The budget scheduler holds the monitor's overhead under its target."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch
from runtime_toys import (
    LossEstimator,
    SleepyEstimator,
    classification_data,
    small_classifier,
    train_monitored,
)
from torch import nn

from raresignal.agent import Measurement, Monitor, MonitorConfig
from raresignal.agent.api import MeasurementUnits, StepContext
from raresignal.agent.budget import BudgetScheduler


def _drive(scheduler: BudgetScheduler, steps: int, step_seconds: float,
           costs: dict[str, float], start: int = 0) -> list[list[str]]:
    """Runs the scheduler with fixed, synthetic timings; returns who ran at each step."""
    ran = []
    for step in range(start, start + steps):
        due = scheduler.due(step)
        for name in due:
            scheduler.record_run(name, step, costs[name])
        spent = sum(costs[name] for name in due)
        scheduler.end_step(step, spent, spent, step_seconds)
        ran.append(due)
    return ran


def test_expensive_estimators_never_share_a_step() -> None:
    scheduler = BudgetScheduler([("a", 5, True), ("b", 5, True), ("c", 5, True),
                                 ("cheap", 1, False)], target_overhead=1e9)
    ran = _drive(scheduler, 100, 1.0, {"a": 0.1, "b": 0.1, "c": 0.1, "cheap": 0.0})
    for due in ran:
        assert sum(name in ("a", "b", "c") for name in due) <= 1
        assert "cheap" in due
    for name in ("a", "b", "c"):
        runs = [step for step, due in enumerate(ran) if name in due]
        assert len(runs) == 20  # every 5 steps, just shifted by the stagger
        assert {b - a for a, b in itertools.pairwise(runs)} == {5}


def test_stretches_the_expensive_estimator_first_until_the_prediction_fits() -> None:
    scheduler = BudgetScheduler([("cheap", 1, False), ("costly", 1, True)],
                                target_overhead=0.03, max_interval_factor=1024)
    # Step 10 ms; the costly estimator takes 6 ms; the cheap one 0.01 ms.
    _drive(scheduler, 10, 0.010, {"cheap": 1e-5, "costly": 6e-3})
    # 6 ms / interval / 10 ms <= 3 % - 0.1 % needs interval >= 21; doubling gives 32.
    assert scheduler.intervals == {"cheap": 1, "costly": 32}
    predicted = scheduler.predicted_overhead()
    assert predicted is not None and predicted <= 0.03


def test_an_estimator_too_costly_for_any_cadence_stops_at_its_bound() -> None:
    scheduler = BudgetScheduler([("huge", 2, True)], target_overhead=0.03,
                                max_interval_factor=8)
    _drive(scheduler, 30, 0.001, {"huge": 1.0})
    assert scheduler.intervals == {"huge": 16}


def test_cadence_comes_back_when_the_estimator_gets_cheap() -> None:
    scheduler = BudgetScheduler([("costly", 4, True)], target_overhead=0.03,
                                max_interval_factor=1024)
    _drive(scheduler, 20, 0.010, {"costly": 6e-3})
    stretched = scheduler.intervals["costly"]
    assert stretched > 4
    # The cost falls a hundredfold (e.g. a warm start kicked in): the EMA follows and the
    # interval halves at successive boundaries back to the default, never below.
    _drive(scheduler, 600, 0.010, {"costly": 6e-5}, start=20)
    assert scheduler.intervals["costly"] == 4


def test_state_round_trip_keeps_cadences_and_due_steps() -> None:
    first = BudgetScheduler([("cheap", 1, False), ("costly", 1, True)])
    _drive(first, 20, 0.010, {"cheap": 1e-5, "costly": 6e-3})
    second = BudgetScheduler([("cheap", 1, False), ("costly", 1, True)])
    second.load_state_dict(first.state_dict())
    assert second.intervals == first.intervals
    assert [second.due(step) for step in range(20, 120)] == [
        first.due(step) for step in range(20, 120)]


def test_duplicate_names_are_refused() -> None:
    try:
        BudgetScheduler([("a", 1, False), ("a", 2, True)])
    except ValueError as error:
        assert "'a'" in str(error)
    else:
        raise AssertionError("duplicate estimator names were accepted")


def test_monitor_lowers_a_sleeping_estimators_cadence_until_overhead_is_under_target(
) -> None:
    torch.set_num_threads(1)
    model = small_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    inputs, targets = classification_data()
    sleepy = SleepyEstimator("toy_sleepy", seconds=0.015)
    config = MonitorConfig(target_overhead=0.03, max_interval_factor=256,
                           overhead_window_steps=150)
    monitor = Monitor(model, optimizer, server=None, run_name="budget",
                      estimators=[LossEstimator(), sleepy], config=config)
    overhead_after_warmup = None
    for step in range(400):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        # The "training work" the overhead is measured against: long enough that the
        # monitor's own bookkeeping stays far below 3% on a loaded machine.
        time.sleep(0.025)
        monitor.step(loss=loss, batch=(inputs, targets))
        optimizer.step()
        if step == 10:
            overhead_after_warmup = monitor.latest()["agent_overhead_ratio"]

    latest = monitor.latest()
    # The estimator ran every step at first: 15 ms on 25 ms steps is far over 3 %.
    assert overhead_after_warmup is not None and overhead_after_warmup > 0.03
    # Its cadence was stretched (15 ms / 25 ms / 3 % = 20 steps at least), the cheap
    # estimator's was not, and the overhead measured over the last 150 steps is in budget.
    assert monitor.intervals["toy_sleepy"] >= 20
    assert monitor.intervals["toy_loss"] == 1
    assert latest["agent_overhead_ratio"] < 0.03
    assert latest["agent_estimator_interval_steps{estimator=toy_sleepy}"] == (
        monitor.intervals["toy_sleepy"])
    assert latest["agent_estimator_seconds{estimator=toy_sleepy}"] >= 0.015
    assert len(sleepy.runs) < 400 / 10


def test_a_pause_between_steps_does_not_count_as_a_long_step() -> None:
    scheduler = BudgetScheduler([("costly", 1, True)], target_overhead=0.03,
                                max_interval_factor=1024)
    _drive(scheduler, 40, 0.010, {"costly": 6e-3})
    before = scheduler.step_seconds
    # An evaluation loop of 30 s between two steps: step time and cadence stay put.
    scheduler.end_step(40, 0.0, 0.0, 30.0)
    assert scheduler.step_seconds == before
    interval = scheduler.intervals["costly"]
    _drive(scheduler, 9, 0.010, {"costly": 6e-3}, start=41)
    assert scheduler.intervals["costly"] == interval


def test_a_cold_first_run_counts_until_the_second_run_replaces_it() -> None:
    scheduler = BudgetScheduler([("warm_started", 1, True)], target_overhead=0.03)
    scheduler.record_run("warm_started", 0, 5.0)  # cold: lazy set-up, no warm start
    assert scheduler.schedules["warm_started"].cost_seconds == 5.0
    scheduler.record_run("warm_started", 1, 1e-2)
    assert scheduler.schedules["warm_started"].cost_seconds == 1e-2  # not averaged in
    scheduler.record_run("warm_started", 2, 2e-2)
    assert scheduler.schedules["warm_started"].cost_seconds == pytest.approx(1.3e-2)


def test_an_every_step_estimator_is_priced_at_its_mean_not_at_the_decision_step(
        caplog: pytest.LogCaptureFixture) -> None:
    """Costly on the two steps around each tenth (like the update ratio) and decided on at
    every tenth: the prediction is the mean rate, not the cost of the step decided at, and
    the warning that the floors do not fit names it."""
    scheduler = BudgetScheduler([("stats", 1, False)], target_overhead=0.01,
                                adjust_every=10)
    with caplog.at_level(logging.WARNING, logger="raresignal.agent.budget"):
        for step in range(200):
            seconds = 9e-3 if step % 10 in (9, 0) else 1e-3
            scheduler.record_run("stats", step, seconds)
            scheduler.end_step(step, seconds, seconds, 0.1)
    # Mean 2.6 ms a step of 100 ms; the last run alone (9 ms) would say 9%.
    assert scheduler.predicted == pytest.approx(0.026)
    assert "stats every step at effort 1 (" in caplog.text


def test_an_estimator_with_a_warm_up_is_not_due_before_it_nor_stretched_by_it() -> None:
    # "warm" measures nothing before step 100; were it run there, its near-zero time would
    # be taken for its cost and the expensive estimator it is would be stretched first,
    # to its bound, before it ever measured.
    scheduler = BudgetScheduler([("cheap", 1, False), ("warm", 10, True, 100),
                                 ("costly", 10, True)], target_overhead=0.03,
                                max_interval_factor=64)
    ran = _drive(scheduler, 200, 0.010, {"cheap": 1e-5, "warm": 2e-3, "costly": 2e-3})
    runs = [step for step, due in enumerate(ran) if "warm" in due]
    assert runs and runs[0] == 100
    assert scheduler.intervals["warm"] < 640


def test_the_measured_overhead_leaves_the_cold_first_runs_out() -> None:
    scheduler = BudgetScheduler([("costly", 100, True)], window_steps=10)
    # A cold first run of 4.99 s in a step whose monitor time was 5 s, then 10 ms a step.
    scheduler.end_step(0, 5.0, 5.0, 1.0, cold_seconds=4.99)
    for step in range(1, 10):
        scheduler.end_step(step, 0.01, 0.0, 1.0)
    assert scheduler.measured_overhead == pytest.approx(0.01)


class _Units:
    """A resumable measurement of three units of 1 ms each."""

    name = "toy_units"
    expensive = True
    default_interval = 4

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        raise AssertionError("the monitor runs a resumable estimator in units")

    def run_in_units(self, ctx: StepContext) -> MeasurementUnits:
        for _ in range(3):
            time.sleep(1e-3)
            yield
        return [Measurement("sharpness", 1.0)]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def test_a_monitor_counts_only_first_runs_and_their_slices_as_cold(monkeypatch) -> None:
    """The cold time the monitor hands the budget at each step is the time of estimators
    with no complete run yet: a whole first run, every slice of a first measurement in
    units; none of a later run."""
    model = small_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    inputs, targets = classification_data()
    sleepy = SleepyEstimator("toy_sleepy", seconds=2e-3, default_interval=3,
                             expensive=False)
    # A slice no unit fits in: one unit per step.
    config = MonitorConfig(resumable_slice_fraction=1e-9, resumable_slice_min_seconds=1e-9,
                           max_interval_factor=1)
    monitor = Monitor(model, optimizer, estimators=[sleepy, _Units()], config=config)
    budget = monitor._budget
    cold: list[float] = []
    runs: dict[str, list[tuple[int, float]]] = {"toy_sleepy": [], "toy_units": []}
    end_step, record_run = budget.end_step, budget.record_run

    def record_end(step, monitor_seconds, estimator_seconds, train_seconds, cold_seconds=0.0):
        cold.append(cold_seconds)
        end_step(step, monitor_seconds, estimator_seconds, train_seconds, cold_seconds)

    def record(name, step, seconds):
        runs[name].append((step, seconds))
        record_run(name, step, seconds)

    monkeypatch.setattr(budget, "end_step", record_end)
    monkeypatch.setattr(budget, "record_run", record)
    train_monitored(monitor, model, optimizer, inputs, targets, 16)
    # The first measurement in units spans several steps (one unit each, none where the
    # whole run filled the slice); a second one starts a cadence after it.
    assert [step for step, _ in runs["toy_sleepy"]] == [0, 3, 6, 9, 12, 15]
    (completed, first_seconds), _ = runs["toy_units"]
    assert completed >= 3
    assert sum(cold) == pytest.approx(runs["toy_sleepy"][0][1] + first_seconds)
    assert cold[0] > 0.0
    assert cold[completed + 1:] == [0.0] * (len(cold) - completed - 1)
