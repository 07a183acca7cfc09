"""Runs one resumable measurement over several training steps, a time slice per step.

An estimator that offers ``run_in_units`` (see
:class:`~raresignal.agent.api.ResumableEstimator`) is not run at once: the monitor starts
it, and at each step runs its units until the step's slice is used, then returns to
training. The slice counts the time the step's other estimators took. The leading
measurement's first unit runs unless they filled it, so a measurement advances at every
step it leads that they leave room in; any other unit runs only when it is predicted to
fit in what is left. A unit's cost is predicted from earlier units of its kind (the name
the yield before it gave, see :data:`~raresignal.agent.api.Units`), over the estimator's
measurements so far: the longest of the recent ones, not the mean, since a kind's cost
varies from step to step. A kind never seen yet is predicted to take the whole slice, so
it runs only as a step's leading unit: the cheap first units of a measurement do not
let a costly one of another kind into their step.

Under torch.distributed every rank must run the same units at the same steps, since
units may issue collectives and the measurement's end moves the schedule. So after each
unit (and before the first) the ranks agree, with one MAX all-reduce, on whether to go
on: each offers how much of its slice the next unit would fill and whether it still has
units to run (a rank whose units ended first joins the agreement, running nothing, until
every rank's have). Max is exact in floating point, so every rank takes the same
decision. An estimator whose units issue collectives must have as many units on every
rank; one whose unit counts differ between ranks (e.g. a Lanczos that stops early on each
rank's own batch) must issue none in its units.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from raresignal.agent.api import Measurement, MeasurementUnits, ReduceFn

# The kind of a measurement's first unit: its set-up, up to its first yield.
START = "start"
# How many recent units of a kind its prediction looks back on.
RECENT_UNITS = 16


class UnitCosts:
    """The recent costs of one estimator's units, by kind, across its measurements."""

    def __init__(self, recent: int = RECENT_UNITS) -> None:
        self.recent = recent
        self._seconds: dict[str | None, deque[float]] = {}

    def record(self, kind: str | None, seconds: float) -> None:
        self._seconds.setdefault(kind, deque(maxlen=self.recent)).append(seconds)

    def predict(self, kind: str | None) -> float | None:
        """The longest recent unit of ``kind``; None for a kind never seen."""
        seconds = self._seconds.get(kind)
        return max(seconds) if seconds else None


@dataclass
class Advance:
    """What one step's slice did."""

    units: int  # units this rank ran
    seconds: float  # time spent in them (and in the agreement)
    done: bool  # the measurement is complete on every rank
    error: Exception | None = None  # this rank's units raised (it then ran no more)


@dataclass
class InFlight:
    """A resumable measurement started at ``step`` and not yet complete."""

    name: str
    step: int
    units: MeasurementUnits
    seconds: float = 0.0  # every slice so far: the measurement's cost for the budget
    units_run: int = 0
    steps: int = 0  # steps it has taken a slice of
    result: Sequence[Measurement] = ()
    finished: bool = False  # this rank's units have ended (others may still run theirs)
    error: Exception | None = field(default=None, repr=False)
    # The estimator's unit costs (shared by its measurements) and the next unit's kind.
    costs: UnitCosts = field(default_factory=UnitCosts, repr=False)
    next_kind: str | None = START

    def advance(self, slice_seconds: float, reduce_max: ReduceFn | None = None,
                clock: Callable[[], float] = time.perf_counter, spent: float = 0.0,
                lead: bool = True) -> Advance:
        """Runs units until the slice is used; ``spent`` is what the step's other work
        already took of it. When ``lead``, the first unit runs unless that work filled the
        slice (so a measurement advances at every step it leads that the rest of the
        monitor leaves room in); every other unit only if its predicted cost still fits.
        See the module docstring for the prediction and the agreement between ranks."""
        started = clock()
        ran = 0
        first = True
        error: Exception | None = None
        while True:
            elapsed = clock() - started
            if first and lead:
                fill = spent / slice_seconds
            else:
                fill = (spent + elapsed) / slice_seconds + self._predicted_share(slice_seconds)
            decision = [fill, 0.0 if self.finished else 1.0]
            if reduce_max is not None:
                agreed = reduce_max(torch.tensor(decision, dtype=torch.float64))
                decision = [float(value) for value in agreed.tolist()]
            all_done = decision[1] == 0.0
            if all_done or decision[0] > 1.0:
                break
            first = False
            if not self.finished:
                error = self._run_unit(clock)
                ran += 1
        seconds = clock() - started
        self.seconds += seconds
        self.units_run += ran
        self.steps += 1
        return Advance(ran, seconds, all_done, error)

    def _predicted_share(self, slice_seconds: float) -> float:
        """The share of the slice the next unit is predicted to take: none once this
        rank's units have ended, the whole slice for a kind never seen."""
        if self.finished:
            return 0.0
        predicted = self.costs.predict(self.next_kind)
        return 1.0 if predicted is None else predicted / slice_seconds

    def _run_unit(self, clock: Callable[[], float]) -> Exception | None:
        """Runs the next unit and records its cost under its kind; returns its error."""
        kind, unit_started = self.next_kind, clock()
        error: Exception | None = None
        try:
            named = next(self.units)
            self.next_kind = named if isinstance(named, str) else None
        except StopIteration as done:
            self.finished, self.result = True, list(done.value or ())
        except Exception as failure:  # the monitor logs and counts it
            self.finished, self.error = True, failure
            error = failure
        self.costs.record(kind, clock() - unit_started)
        return error

    def close(self) -> None:
        """Drops the measurement: the estimator's state stays as it was before it began."""
        self.units.close()
