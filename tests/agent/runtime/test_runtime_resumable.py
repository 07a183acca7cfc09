"""The runner of resumable measurements: how many units a step's slice takes, how it
predicts a unit's cost from earlier units of its kind, and how ranks agree on it (with a
fake clock: no test here depends on real time)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import pytest
import torch

from raresignal.agent.api import Measurement, MeasurementUnits
from raresignal.agent.resumable import START, InFlight, UnitCosts


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def costly_units(clock: FakeClock, costs: Sequence[float], log: list[int]
                 ) -> MeasurementUnits:
    """One unit per cost: advances the clock by it and logs the unit's index."""
    for index, cost in enumerate(costs):
        clock.now += cost
        log.append(index)
        yield
    return [Measurement("sharpness", float(len(costs)))]


def named_units(clock: FakeClock, units: Sequence[tuple[str, float]], log: list[int]
                ) -> MeasurementUnits:
    """One unit per (kind, cost), each named by the yield before it: advances the clock
    by its cost and logs its index."""
    for index, (kind, cost) in enumerate(units):
        yield kind
        clock.now += cost
        log.append(index)
    return [Measurement("sharpness", float(len(units)))]


def seen(seconds: float) -> UnitCosts:
    """The unit costs of an estimator whose unnamed units took ``seconds`` before."""
    costs = UnitCosts()
    costs.record(START, seconds)
    costs.record(None, seconds)
    return costs


def test_each_step_runs_units_until_its_slice_is_used_and_no_more() -> None:
    clock, log = FakeClock(), []
    unit, slice_seconds = 1 / 16, 5 / 16  # exact in binary: no rounding at the boundary
    flight = InFlight("sharpness", 7, costly_units(clock, [unit] * 23, log),
                      costs=seen(unit))
    per_step = []
    while True:
        progress = flight.advance(slice_seconds, clock=clock)
        per_step.append(progress.units)
        assert progress.seconds <= slice_seconds
        if progress.done:
            break
    # Five units fill the slice; the last step also runs the closing call.
    assert per_step == [5, 5, 5, 5, 4]
    assert log == list(range(23))
    assert flight.result == [Measurement("sharpness", 23.0)]
    assert flight.seconds == 23 * unit
    assert flight.steps == 5 and flight.units_run == 24


def test_a_kind_never_seen_runs_only_as_the_step_s_first_unit() -> None:
    """A first measurement knows no unit's cost: its set-up runs alone, then each step
    runs one unit of the unseen kind and, from then on, as many as are predicted to fit."""
    clock, log = FakeClock(), []
    flight = InFlight("sharpness", 0, costly_units(clock, [1 / 16] * 23, log))
    per_step = []
    while True:
        progress = flight.advance(5 / 16, clock=clock)
        per_step.append(progress.units)
        if progress.done:
            break
    assert per_step == [1, 5, 5, 5, 5, 3]
    assert log == list(range(23))


def test_a_unit_is_predicted_from_earlier_units_of_its_kind_not_from_this_step_s() -> None:
    """Cheap units, then a costly kind: once the costly kind has been seen (in an earlier
    measurement of the same estimator), the cheap units of a step no longer let it in
    after them, where the mean of the step's units (a sixteenth) would have."""
    clock, costs = FakeClock(), UnitCosts()
    plan = [("operator", 1 / 16)] * 3 + [("product", 4 / 16)] + [("operator", 1 / 16)] * 3
    slice_seconds = 5 / 16

    def measure() -> tuple[list[list[int]], list[float]]:
        log: list[int] = []
        flight = InFlight("sharpness", 0, named_units(clock, plan, log), costs=costs)
        units, seconds = [], []
        while True:
            before = len(log)
            progress = flight.advance(slice_seconds, clock=clock)
            units.append(log[before:])
            seconds.append(progress.seconds)
            if progress.done:
                return units, seconds

    measure()  # learns each kind's cost
    units, seconds = measure()
    assert units == [[0, 1, 2], [3, 4], [5, 6]]
    assert max(seconds) <= slice_seconds
    assert costs.predict("product") == 4 / 16 and costs.predict("operator") == 1 / 16


def test_a_kind_is_predicted_at_the_longest_of_its_recent_units() -> None:
    costs = UnitCosts(recent=3)
    assert costs.predict("product") is None
    for seconds in (0.5, 0.1, 0.2, 0.1):
        costs.record("product", seconds)
    assert costs.predict("product") == 0.2  # 0.5 has left the three most recent


def test_only_the_leading_measurement_s_first_unit_runs_without_a_prediction() -> None:
    """A measurement that does not lead the step runs even its first unit only when it is
    predicted to fit in what the others left."""
    clock, log = FakeClock(), []
    flight = InFlight("sharpness", 0, costly_units(clock, [2 / 16] * 4, log),
                      costs=seen(2 / 16))
    assert flight.advance(5 / 16, clock=clock, spent=4 / 16, lead=False).units == 0
    assert flight.advance(5 / 16, clock=clock, spent=4 / 16, lead=True).units == 1
    assert flight.advance(5 / 16, clock=clock, spent=3 / 16, lead=False).units == 1


def test_a_unit_longer_than_the_slice_still_advances_one_unit_per_step() -> None:
    clock, log = FakeClock(), []
    flight = InFlight("sharpness", 0, costly_units(clock, [0.2, 0.2, 0.2], log))
    assert [flight.advance(0.05, clock=clock).units for _ in range(3)] == [1, 1, 1]
    assert flight.advance(0.05, clock=clock).done


def test_the_step_s_other_work_counts_against_the_slice() -> None:
    clock, log = FakeClock(), []
    flight = InFlight("sharpness", 0, costly_units(clock, [1 / 16] * 10, log),
                      costs=seen(1 / 16))
    # Three of the slice's five units were taken by other estimators: two units run.
    assert flight.advance(5 / 16, clock=clock, spent=3 / 16).units == 2
    # Other work filled the slice: no unit this step, and the measurement waits.
    progress = flight.advance(5 / 16, clock=clock, spent=6 / 16)
    assert progress.units == 0 and not progress.done
    assert log == [0, 1]


def test_a_failing_unit_ends_the_measurement_with_its_error() -> None:
    def failing() -> MeasurementUnits:
        yield
        raise RuntimeError("no HVP backend")

    flight = InFlight("sharpness", 0, failing())
    progress = flight.advance(10.0, clock=FakeClock())
    assert progress.done and isinstance(progress.error, RuntimeError)
    assert flight.result == ()


def test_closing_a_measurement_in_flight_runs_no_more_of_it() -> None:
    clock, log = FakeClock(), []
    flight = InFlight("sharpness", 0, costly_units(clock, [0.01] * 10, log),
                      costs=seen(0.01))
    flight.advance(0.03, clock=clock)
    flight.close()
    with pytest.raises(StopIteration):
        next(flight.units)
    assert log == [0, 1, 2]


class ThreadRanks:
    """A MAX all-reduce between threads standing for ranks (a barrier per reduction)."""

    def __init__(self, world_size: int) -> None:
        self.values: list[torch.Tensor | None] = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=60)

    def reducer(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            self.values[rank] = tensor.clone()
            self.barrier.wait()
            result = torch.stack(self.values).max(dim=0).values  # type: ignore[arg-type]
            self.barrier.wait()
            return result

        return reduce


def test_ranks_with_different_unit_counts_and_costs_take_every_decision_together() -> None:
    """Rank 1's units are slower and more numerous: every rank stops each step where the
    slowest needs to, and the measurement completes at the same step on both."""
    costs = {0: [1 / 32] * 6, 1: [1 / 16] * 11}  # exact in binary
    ranks = ThreadRanks(2)
    outcomes: dict[int, list[tuple[int, bool]]] = {}
    logs: dict[int, list[int]] = {0: [], 1: []}

    def rank_loop(rank: int) -> None:
        clock = FakeClock()
        flight = InFlight("sharpness", 3, costly_units(clock, costs[rank], logs[rank]),
                          costs=seen(costs[rank][0]))
        steps = []
        while True:
            progress = flight.advance(5 / 32, ranks.reducer(rank), clock=clock)
            steps.append((progress.units, progress.done))
            if progress.done:
                break
        outcomes[rank] = steps

    threads = [threading.Thread(target=rank_loop, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    # Rank 1's units fill the slice after two; rank 0, with units twice as fast, stops
    # with it (then runs its closing call and joins the agreement, running nothing).
    assert [units for units, _ in outcomes[1]] == [2, 2, 2, 2, 2, 2]
    assert [units for units, _ in outcomes[0]] == [2, 2, 2, 1, 0, 0]
    assert [done for _, done in outcomes[0]] == [done for _, done in outcomes[1]]
    assert logs == {0: list(range(6)), 1: list(range(11))}
