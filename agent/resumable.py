"""Runs one resumable measurement over several training steps, a time slice per step.

An expensive estimator that offers ``run_in_units`` (see
:class:`~raresignal.agent.api.ResumableEstimator`) is not run at once: the monitor starts
it, and at each step runs its units until the step's slice is used, then returns to
training. The slice counts the time the step's other estimators took; the first unit
runs unless they filled it, so a measurement advances at every step they leave room in,
and no further unit runs when the mean unit so far would overrun the slice.

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
                clock: Callable[[], float] = time.perf_counter, spent: float = 0.0
                ) -> Advance:
        """Runs units until the slice is used; ``spent`` is what the step's other work
        already took of it. The first unit runs unless that work filled the slice (so a
        measurement advances at every step the rest of the monitor leaves room in); each
        further one only if the mean unit so far still fits. See the module docstring for
        the agreement between ranks."""
        started = clock()
        ran = 0
        first = True
        error: Exception | None = None
        while True:
            elapsed = clock() - started
            unit = elapsed / ran if ran else 0.0
            fill = (spent if first else spent + elapsed + unit) / slice_seconds
            decision = [fill, 0.0 if self.finished else 1.0]
            if reduce_max is not None:
                agreed = reduce_max(torch.tensor(decision, dtype=torch.float64))
                decision = [float(value) for value in agreed.tolist()]
            all_done = decision[1] == 0.0
            if all_done or decision[0] > 1.0:
                break
            first = False
            if not self.finished:
                try:
                    next(self.units)
                except StopIteration as done:
                    self.finished, self.result = True, list(done.value or ())
                except Exception as failure:  # the monitor logs and counts it
                    self.finished, self.error = True, failure
                    error = failure
                ran += 1
        seconds = clock() - started
        self.seconds += seconds
        self.units_run += ran
        self.steps += 1
        return Advance(ran, seconds, all_done, error)

    def close(self) -> None:
        """Drops the measurement: the estimator's state stays as it was before it began."""
        self.units.close()
