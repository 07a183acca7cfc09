"""The budget makes runs cheaper before it stretches cadences, never stretches past an
estimator's floor, and says so (a log line, a metric) when the floors do not fit."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
from runtime_server import stored_series
from runtime_toys import (
    LossEstimator,
    SleepyEstimator,
    classification_data,
    small_classifier,
    train_monitored,
)

from raresignal.agent import Measurement, Monitor, MonitorConfig, StepContext
from raresignal.agent.budget import BudgetScheduler
from raresignal.server.serving.app import ServerHandle

STEP_SECONDS = 0.010


class Efforts:
    """The estimators' side of set_effort: which levels they accept, and a log of every
    change with the interval each estimator had then."""

    def __init__(self, scalable: set[str]) -> None:
        self.scalable = scalable
        self.levels: dict[str, float] = {}
        self.events: list[tuple[str, float, dict[str, int]]] = []
        self.scheduler: BudgetScheduler | None = None

    def __call__(self, name: str, level: float) -> float:
        if name not in self.scalable:
            return 1.0
        self.levels[name] = level
        assert self.scheduler is not None
        self.events.append((name, level, dict(self.scheduler.intervals)))
        return level


# The cadence rule's settings these tests are worked out with: 40 planned measurements and
# a floor of 10, so the budget has a wide span between the starting cadence and the floor
# (the defaults keep a narrower one; tests/agent/test_cadence.py holds them).
WIDE_SPAN = {"planned_measurements": 40, "floor_measurements": 10}


def _scheduler(estimators: list[tuple[str, int, bool]], efforts: Efforts,
               total_steps: int) -> BudgetScheduler:
    scheduler = BudgetScheduler(estimators, target_overhead=0.03, total_steps=total_steps,
                                apply_effort=efforts, planning=MonitorConfig(**WIDE_SPAN))
    efforts.scheduler = scheduler
    return scheduler


def _drive(scheduler: BudgetScheduler, efforts: Efforts, steps: int,
           full_costs: Mapping[str, float], start: int = 0) -> None:
    """Synthetic timings: a run costs its full cost times its current effort."""
    for step in range(start, start + steps):
        spent = 0.0
        for name in scheduler.due(step):
            seconds = full_costs[name] * efforts.levels.get(name, 1.0)
            scheduler.record_run(name, step, seconds)
            spent += seconds
        scheduler.end_step(step, spent, spent, STEP_SECONDS)


def test_effort_is_lowered_to_its_minimum_before_any_interval_is_stretched() -> None:
    efforts = Efforts({"costly"})
    scheduler = _scheduler([("cheap", 1, False), ("costly", 10, True)], efforts, 1000)
    assert scheduler.intervals == {"cheap": 1, "costly": 10}  # min(10, 1000 // 40)
    # 16 ms every 10 steps of 10 ms: 16 % at full effort, 4 % at a quarter: still over 3 %.
    _drive(scheduler, efforts, 40, {"cheap": 1e-5, "costly": 16e-3})
    assert [(name, level) for name, level, _ in efforts.events] == [
        ("costly", 0.5), ("costly", 0.25)]
    assert all(intervals["costly"] == 10 for _, _, intervals in efforts.events)
    assert scheduler.efforts["costly"] == MonitorConfig().min_effort
    assert scheduler.intervals == {"cheap": 1, "costly": 20}
    predicted = scheduler.predicted_overhead()
    assert predicted is not None and predicted <= 0.03
    assert not scheduler.floor_exceeded


def test_without_set_effort_the_interval_is_the_only_lever() -> None:
    efforts = Efforts(set())
    scheduler = _scheduler([("costly", 10, True)], efforts, 1000)
    _drive(scheduler, efforts, 40, {"costly": 16e-3})
    assert efforts.events == []
    assert scheduler.efforts == {"costly": 1.0}
    assert scheduler.intervals == {"costly": 80}  # 16 ms / 80 / 10 ms = 2 %


def test_an_estimator_too_costly_for_its_floor_stays_at_it_and_the_budget_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    efforts = Efforts({"probes"})
    scheduler = _scheduler([("cheap", 1, False), ("probes", 200, True)], efforts, 1000)
    floor = scheduler.schedules["probes"].max_interval
    assert floor == 100  # 1000 // 10 measurements
    with caplog.at_level(logging.INFO, logger="raresignal.agent.budget"):
        _drive(scheduler, efforts, 300, {"cheap": 1e-5, "probes": 1.0})
        assert scheduler.intervals == {"cheap": 1, "probes": floor}
        assert scheduler.efforts["probes"] == 0.25
        assert scheduler.floor_exceeded
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        # One line for the state change, not one per decision.
        assert len(warnings) == 1
        assert "probes every 100 steps at effort 0.25" in warnings[0]
        assert "MonitorConfig(target_overhead=...)" in warnings[0]
        assert "predicted overhead 25" in warnings[0]  # 0.25 s / 100 / 10 ms
        # Just under the target (2.7 % + 0.1 %) is not yet "fits again": no flip, no
        # second line (20 runs: the smoothed cost has forgotten the old one).
        _drive(scheduler, efforts, 2000, {"cheap": 1e-5, "probes": 0.108}, start=300)
        assert scheduler.predicted == pytest.approx(0.028, rel=0.01)
        assert scheduler.floor_exceeded
        assert scheduler.intervals["probes"] == floor
        # The cost falls (a smaller probe set): the floors fit again, said once at INFO.
        _drive(scheduler, efforts, 1000, {"cheap": 1e-5, "probes": 1e-3}, start=2300)
    assert not scheduler.floor_exceeded
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "holds every estimator's floor again" in infos[0]


def test_with_room_again_cadence_comes_back_before_effort() -> None:
    efforts = Efforts({"costly"})
    scheduler = _scheduler([("costly", 10, True)], efforts, 1000)
    _drive(scheduler, efforts, 40, {"costly": 16e-3})
    assert scheduler.intervals == {"costly": 20} and scheduler.efforts == {"costly": 0.25}
    efforts.events.clear()
    _drive(scheduler, efforts, 600, {"costly": 1e-4}, start=40)
    assert scheduler.intervals == {"costly": 10} and scheduler.efforts == {"costly": 1.0}
    assert all(intervals["costly"] == 10 for _, _, intervals in efforts.events)


def test_planning_after_the_first_steps_rescales_the_cadences() -> None:
    scheduler = BudgetScheduler([("cheap", 1, False), ("probes", 200, True)],
                                target_overhead=0.5, planning=MonitorConfig(**WIDE_SPAN))
    for step in range(5):
        for name in scheduler.due(step):
            scheduler.record_run(name, step, 0.0)
    assert scheduler.intervals == {"cheap": 1, "probes": 200}
    scheduler.plan(400)
    assert scheduler.intervals == {"cheap": 1, "probes": 10}
    assert scheduler.schedules["probes"].max_interval == 40
    assert scheduler.schedules["probes"].next_due == 10  # its last run (step 0) + 10


def test_effort_and_plan_survive_a_checkpoint() -> None:
    efforts = Efforts({"costly"})
    first = _scheduler([("costly", 10, True)], efforts, 1000)
    _drive(first, efforts, 40, {"costly": 16e-3})
    resumed_efforts = Efforts({"costly"})
    second = BudgetScheduler([("costly", 10, True)], apply_effort=resumed_efforts,
                             planning=MonitorConfig(**WIDE_SPAN))
    resumed_efforts.scheduler = second
    second.load_state_dict(first.state_dict())
    assert second.total_steps == 1000
    assert second.efforts == first.efforts and resumed_efforts.levels == {"costly": 0.25}
    assert second.schedules["costly"].max_interval == 100


class ScalableSleeper(SleepyEstimator):
    """Sleeps its cost times its effort; accepts any effort."""

    def __init__(self, name: str, seconds: float, default_interval: int) -> None:
        super().__init__(name, seconds, default_interval)
        self.effort = 1.0

    def set_effort(self, level: float) -> float:
        self.effort = level
        return level

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        time.sleep(self.seconds * self.effort)
        return [Measurement("hessian_vector_products", 1.0)]


def test_the_monitor_streams_the_floor_state_effort_and_floor_to_the_server(
        server: ServerHandle, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model = small_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    inputs, targets = classification_data()
    # 0.2 s of work every 20 steps at least (the floor of 200 planned steps): 2.5 ms a
    # step at a quarter effort, against a target of 0.1 % of a tiny model's step.
    sleeper = ScalableSleeper("toy_sleepy", seconds=0.2, default_interval=10)
    monitor = Monitor(model, optimizer, server=server.grpc_target, run_name="floors",
                      estimators=[LossEstimator(), sleeper], total_steps=200,
                      config=MonitorConfig(target_overhead=0.001, report_interval_seconds=0.01,
                                           spool_dir=str(tmp_path / "spool"), **WIDE_SPAN))
    train_monitored(monitor, model, optimizer, inputs, targets, 200)
    assert monitor.intervals == {"toy_loss": 1, "toy_sleepy": 20}
    assert monitor.efforts["toy_sleepy"] == 0.25 and sleeper.effort == 0.25
    latest = monitor.latest()
    assert latest["agent_budget_floor_exceeded"] == 1.0
    assert latest["agent_estimator_floor_interval_steps{estimator=toy_sleepy}"] == 20
    assert latest["agent_estimator_effort_ratio{estimator=toy_sleepy}"] == 0.25
    assert monitor.close() is True
    run_id = monitor.run_id
    assert run_id is not None
    stored = stored_series(server.grpc_target, run_id, "agent_budget_floor_exceeded")
    assert stored and stored[max(stored)] == 1.0


def test_ranks_with_different_costs_reach_the_same_efforts_and_intervals() -> None:
    """Each rank decides from the timings max-reduced over the ranks, so the effort and
    interval decisions agree although each rank measured its own costs."""
    levels: list[Efforts] = [Efforts({"costly"}), Efforts({"costly"})]
    ranks: list[BudgetScheduler] = []
    for rank, efforts in enumerate(levels):
        other = 1 - rank
        scheduler = BudgetScheduler(
            [("cheap", 1, False), ("costly", 10, True)], target_overhead=0.03,
            total_steps=1000, apply_effort=efforts,
            reduce_max=lambda local, other=other: torch.maximum(
                local, torch.tensor(ranks[other]._timings(), dtype=torch.float64)))
        efforts.scheduler = scheduler
        ranks.append(scheduler)
    full_costs = [{"cheap": 1e-5, "costly": 9e-3}, {"cheap": 3e-5, "costly": 16e-3}]
    for step in range(200):
        due = [scheduler.due(step) for scheduler in ranks]
        assert due[0] == due[1], step
        for scheduler, efforts, costs in zip(ranks, levels, full_costs, strict=True):
            for name in due[0]:
                scheduler.record_run(name, step, costs[name] * efforts.levels.get(name, 1.0))
        for scheduler in ranks:
            scheduler.end_step(step, 0.0, 0.0, STEP_SECONDS)
        assert ranks[0].efforts == ranks[1].efforts and ranks[0].intervals == ranks[1].intervals
    # The slower rank's costs decided for both: 16 ms at a quarter is 4 % at interval 10.
    assert ranks[0].efforts["costly"] == 0.25 and ranks[0].intervals["costly"] == 20
