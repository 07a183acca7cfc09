"""Several resumable measurements in flight in one Monitor: a measurement spread over
steps holds no other estimator back, the flights take turns at the slice, and a completed
run finishes the ones still in flight at close (a failed run drops them)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
import torch
from runtime_toys import classification_data, small_classifier
from torch import nn

from raresignal.agent import Measurement, Monitor, MonitorConfig
from raresignal.agent.api import MeasurementUnits, StepContext
from raresignal.agent.resumable import START

# A slice no unit fits in: the flight whose turn it is runs exactly one unit per step
# (its first unit runs while the slice is empty), the others none.
ONE_UNIT_A_STEP = MonitorConfig(resumable_slice_fraction=1e-9,
                                resumable_slice_min_seconds=1e-9, max_interval_factor=1)


class CountingUnits:
    """A resumable measurement of ``units`` empty units; logs (name, step) of each unit
    and reports how many units it ran under ``metric``."""

    expensive = True
    default_interval = 1000

    def __init__(self, name: str, metric: str, units: int, log: list[tuple[str, int]],
                 clock: list[int]) -> None:
        self.name, self.metric, self.units = name, metric, units
        self.log, self.clock = log, clock

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        raise AssertionError("the monitor runs a resumable estimator in units")

    def run_in_units(self, ctx: StepContext) -> MeasurementUnits:
        for _ in range(self.units):
            self.log.append((self.name, self.clock[0]))
            yield
        return [Measurement(self.metric, float(self.units))]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def _train(monitor: Monitor, model: nn.Module, optimizer: torch.optim.Optimizer,
           clock: list[int], steps: int, after_step: Callable[[], None] = lambda: None
           ) -> None:
    """Trains ``steps`` steps under ``monitor``, the clock showing each step's number."""
    inputs, targets = classification_data()
    for step in range(steps):
        clock[0] = step
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        monitor.step(loss=loss)
        optimizer.step()
        after_step()


def _run(state: str, steps: int = 4) -> tuple[Monitor, list[tuple[str, int]],
                                              list[tuple[int, Measurement]]]:
    log: list[tuple[str, int]] = []
    clock = [0]
    published: list[tuple[int, Measurement]] = []
    model = small_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    long = CountingUnits("long", "sharpness", 50, log, clock)
    short = CountingUnits("short", "hessian_trace", 3, log, clock)
    monitor = Monitor(model, optimizer, estimators=[long, short], config=ONE_UNIT_A_STEP,
                      on_measurements=published.extend)
    _train(monitor, model, optimizer, clock, steps)
    clock[0] = steps  # close
    monitor.close(state)
    return monitor, log, published


def test_a_long_measurement_in_flight_does_not_hold_a_short_one_back() -> None:
    monitor, log, published = _run("aborted", steps=10)
    # "long" starts at step 0, "short" at step 1 while "long" is in flight; they take
    # turns going first, so "short" runs its three units at steps 1, 3 and 5, and its
    # closing call (the generator's return) at step 7.
    assert log[:6] == [("long", 0), ("short", 1), ("long", 2), ("short", 3), ("long", 4),
                       ("short", 5)]
    assert (1, Measurement("hessian_trace", 3.0)) in published
    # Alone in flight after that, "long" runs a unit every step.
    assert log[6:] == [("long", 6), ("long", 8), ("long", 9)]
    assert monitor._budget.schedules["short"].runs == 1
    assert monitor._budget.schedules["long"].runs == 0


@pytest.mark.parametrize("state", ["completed", "failed"])
def test_close_finishes_a_completed_run_s_measurements_and_drops_a_failed_one_s(state: str
                                                                                ) -> None:
    monitor, log, published = _run(state)
    in_steps = [entry for entry in log if entry[1] < 4]
    assert in_steps == [("long", 0), ("short", 1), ("long", 2), ("short", 3)]
    if state == "completed":
        # At close the rest of each ran at once; the values carry their starting steps.
        assert log[4:] == [("short", 4)] + [("long", 4)] * 48
        assert sorted(published, key=lambda item: item[0]) == [
            (0, Measurement("sharpness", 50.0)), (1, Measurement("hessian_trace", 3.0))]
        assert monitor.latest()["sharpness"] == 50.0
    else:
        assert log[4:] == [] and published == []
    assert monitor._flights == []


def test_an_estimator_s_unit_costs_outlive_its_measurements() -> None:
    """The second measurement of an estimator predicts its units from the first's: its
    runner holds the costs the first recorded."""
    log: list[tuple[str, int]] = []
    clock = [0]
    short = CountingUnits("short", "hessian_trace", 2, log, clock)
    short.default_interval = 4
    model = small_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, optimizer, estimators=[short], config=ONE_UNIT_A_STEP)
    flights: list = []

    def keep_new_flights() -> None:
        flights.extend(flight for flight in monitor._flights
                       if all(flight is not seen for seen in flights))

    _train(monitor, model, optimizer, clock, 12, after_step=keep_new_flights)
    monitor.close("aborted")
    assert len(flights) >= 2
    assert all(flight.costs is flights[0].costs for flight in flights)
    assert flights[0].costs.predict(START) is not None
    assert flights[0].costs.predict(None) is not None


class CheapResumable(CountingUnits):
    """A cheap estimator that also offers units: counts its whole runs."""

    expensive = False
    default_interval = 2

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.whole_runs = 0

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        self.whole_runs += 1
        return [Measurement(self.metric, 0.0)]


def test_a_cheap_estimator_runs_in_units_only_once_a_whole_run_outgrows_the_slice() -> None:
    log: list[tuple[str, int]] = []
    clock = [0]
    cheap = CheapResumable("cheap", "probe_loss", 2, log, clock)
    model = small_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, optimizer, estimators=[cheap],
                      config=MonitorConfig(max_interval_factor=1))
    _train(monitor, model, optimizer, clock, 6)
    assert cheap.whole_runs == 3 and log == []  # cheap: whole runs, a regular cadence
    # Its runs now cost more than a step's slice (50 ms at least): the next one is units.
    monitor._budget.schedules["cheap"].cost_seconds = 10.0
    _train(monitor, model, optimizer, clock, 2)
    monitor.close("completed")
    assert cheap.whole_runs == 3 and [name for name, _ in log] == ["cheap", "cheap"]
