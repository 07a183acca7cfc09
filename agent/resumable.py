"""Runs one resumable measurement over several training steps, a time slice per step.

An expensive estimator that offers ``run_in_units`` (see
:class:`~raresignal.agent.api.ResumableEstimator`) is not run at once: the monitor starts
it, and at each step runs its units until the step's slice is used, then returns to
training. At least one unit runs per step, so a measurement always advances; a unit is
stopped short of the slice when the mean unit so far would overrun it.

Under torch.distributed every rank must run the same units at the same steps, since
units may issue collectives and the measurement's end moves the schedule. So after each
unit the ranks agree, with one MAX all-reduce, on whether to go on: each offers how much of
its slice the next unit would fill and whether it still has units to run (a rank whose
units ended first joins the agreement, running nothing, until every rank's have). Max is
exact in floating point, so every rank takes the same decision.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from raresignal.agent.api import Measurement, MeasurementUnits, ReduceFn


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

    def advance(self, slice_seconds: float, reduce_max: ReduceFn | None = None,
                clock: Callable[[], float] = time.perf_counter) -> Advance:
        """Runs units until the slice is used (at least one unit, unless this rank's have
        ended); see the module docstring for the agreement between ranks."""
        started = clock()
        ran = 0
        error: Exception | None = None
        while True:
            if not self.finished:
                try:
                    next(self.units)
                except StopIteration as done:
                    self.finished, self.result = True, list(done.value or ())
                except Exception as failure:  # the monitor logs and counts it
                    self.finished, self.error = True, failure
                    error = failure
                ran += 1
            elapsed = clock() - started
            next_fill = (elapsed + elapsed / max(ran, 1)) / slice_seconds
            decision = [next_fill, 0.0 if self.finished else 1.0]
            if reduce_max is not None:
                agreed = reduce_max(torch.tensor(decision, dtype=torch.float64))
                decision = [float(value) for value in agreed.tolist()]
            all_done = decision[1] == 0.0
            if all_done or decision[0] > 1.0:
                break
        seconds = clock() - started
        self.seconds += seconds
        self.units_run += ran
        self.steps += 1
        return Advance(ran, seconds, all_done, error)

    def close(self) -> None:
        """Drops the measurement: the estimator's state stays as it was before it began."""
        self.units.close()
