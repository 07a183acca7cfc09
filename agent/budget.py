"""The overhead budget: decides which estimators run at each step.

The scheduler times every estimator run and the training step (the time between two
``step()`` calls, monitor excluded), keeps smoothed figures, and predicts the steady
overhead as ``(base + Σ cost_e / interval_e) / step_time``. Every
``adjust_every`` steps it doubles the interval of the largest contributor (expensive
estimators first) until the prediction is under the target, or halves one interval (cheap
estimators first) when there is ample room, never below an estimator's default cadence
nor above ``max_interval_factor`` times it.

Under torch.distributed every rank must run the same estimators at the same steps, since
estimators issue collectives. So the decision is taken only at fixed step boundaries,
from timings max-reduced over the ranks (max is exact in floating point, so every rank
gets bit-identical inputs) by a deterministic rule: every rank reaches the same intervals.
Due estimators are a function of the step and those intervals alone.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from raresignal.agent.api import ReduceFn
from raresignal.agent.config import MonitorConfig

_STEP_ALPHA = 0.1  # smoothing of the step time and the monitor's base cost
_COST_ALPHA = 0.3  # smoothing of each estimator's run time
_RELAX_BELOW = 0.5  # tighten only when the prediction is under half the target...
_RELAX_TO = 0.8  # ...and the tightened prediction stays under 80 % of it
# A gap between two step() calls longer than this many smoothed step times is a pause,
# once this many steps have set the smoothed step time.
_PAUSE_FACTOR = 10.0
_PAUSE_MIN_STEPS = 20


@dataclass
class EstimatorSchedule:
    """The cadence and measured cost of one estimator."""

    name: str
    default_interval: int
    expensive: bool
    interval: int
    max_interval: int
    next_due: int
    last_run: int | None = None
    cost_seconds: float | None = None  # smoothed wall time of one run
    last_seconds: float | None = None  # wall time of the last run
    runs: int = 0


def _ema(previous: float | None, value: float, alpha: float) -> float:
    return value if previous is None else previous + alpha * (value - previous)


class BudgetScheduler:
    """Holds every estimator's cadence and keeps the total overhead under a target."""

    def __init__(
        self,
        estimators: Sequence[tuple[str, int, bool] | tuple[str, int, bool, int]],
        target_overhead: float = MonitorConfig.target_overhead,
        max_interval_factor: int = MonitorConfig.max_interval_factor,
        adjust_every: int = MonitorConfig.budget_adjust_every_steps,
        window_steps: int = MonitorConfig.overhead_window_steps,
        reduce_max: ReduceFn | None = None,
    ) -> None:
        names = [entry[0] for entry in estimators]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"estimator names must be unique; repeated: {duplicates}")
        self.target = target_overhead
        self.adjust_every = adjust_every
        self.reduce_max = reduce_max
        self.schedules: dict[str, EstimatorSchedule] = {}
        expensive_rank = 0
        for name, default_interval, expensive, *start in estimators:
            if default_interval < 1:
                raise ValueError(f"estimator {name!r}: default_interval must be >= 1, "
                                 f"got {default_interval}")
            # Expensive estimators start one step apart so that they never pile up; one
            # with a warm-up (a first step) is not due before it, so that no empty run
            # is taken for its cost.
            first = max(start[0] if start else 0, expensive_rank if expensive else 0)
            expensive_rank += int(expensive)
            self.schedules[name] = EstimatorSchedule(
                name, default_interval, expensive, default_interval,
                default_interval * max_interval_factor, first)
        self.step_seconds: float | None = None
        self.base_seconds: float | None = None
        self._steps_seen = 0
        self._window: deque[tuple[float, float]] = deque(maxlen=window_steps)
        self._window_monitor = 0.0
        self._window_train = 0.0

    # -- which estimators run ------------------------------------------------------------

    def due(self, step: int) -> list[str]:
        """Estimators to run at ``step``, in registration order; at most one expensive one
        (the most overdue), the others wait for the following steps."""
        ready = [s for s in self.schedules.values() if step >= s.next_due]
        expensive = [s for s in ready if s.expensive]
        chosen = min(expensive, key=lambda s: s.next_due) if expensive else None
        return [s.name for s in ready if not s.expensive or s is chosen]

    def record_run(self, name: str, step: int, seconds: float) -> None:
        schedule = self.schedules[name]
        schedule.last_run = step
        schedule.next_due = step + schedule.interval
        schedule.last_seconds = seconds
        schedule.runs += 1
        # The first run is cold (lazy allocation, caches, a Lanczos without a warm start):
        # its time stands until the second run replaces it outright, so a one-off does
        # not linger in the average; the cadence it stretched relaxes from there.
        if schedule.runs == 2:
            schedule.cost_seconds = seconds
        else:
            schedule.cost_seconds = _ema(schedule.cost_seconds, seconds, _COST_ALPHA)

    # -- timing and decisions ------------------------------------------------------------

    def end_step(self, step: int, monitor_seconds: float, estimator_seconds: float,
                 train_seconds: float | None) -> None:
        """Records one step's timings; at a decision boundary, adjusts the intervals.

        Must be called at every step on every rank: the boundary issues a collective.
        """
        self._steps_seen += 1
        if self._steps_seen > 1:  # the first step pays one-time costs (thread start, ...)
            self.base_seconds = _ema(self.base_seconds,
                                     max(0.0, monitor_seconds - estimator_seconds),
                                     _STEP_ALPHA)
        if self._is_pause(train_seconds):
            train_seconds = None
        if train_seconds is not None and train_seconds > 0:
            self.step_seconds = _ema(self.step_seconds, train_seconds, _STEP_ALPHA)
            if len(self._window) == self._window.maxlen:
                old_monitor, old_train = self._window[0]
                self._window_monitor -= old_monitor
                self._window_train -= old_train
            self._window.append((monitor_seconds, train_seconds))
            self._window_monitor += monitor_seconds
            self._window_train += train_seconds
        if (step + 1) % self.adjust_every == 0:
            self._adjust()

    def _is_pause(self, train_seconds: float | None) -> bool:
        """A gap far longer than a training step (an evaluation loop, a checkpoint, a
        stalled data loader) says nothing about step time; counting it would let the
        monitor spend as if steps were that long."""
        return (train_seconds is not None and self.step_seconds is not None
                and len(self._window) >= _PAUSE_MIN_STEPS
                and train_seconds > _PAUSE_FACTOR * self.step_seconds)

    @property
    def measured_overhead(self) -> float | None:
        """Monitor time over training time across the recent window of steps."""
        if self._window_train <= 0:
            return None
        return self._window_monitor / self._window_train

    def predicted_overhead(self, timings: Sequence[float] | None = None) -> float | None:
        """The steady overhead the current intervals imply."""
        step_seconds, base, *costs = timings if timings is not None else self._timings()
        if step_seconds <= 0:
            return None
        schedules = self.schedules.values()
        rate = base + sum(cost / s.interval for cost, s in zip(costs, schedules, strict=True))
        return rate / step_seconds

    def _timings(self) -> list[float]:
        return [self.step_seconds or 0.0, self.base_seconds or 0.0,
                *[s.cost_seconds or 0.0 for s in self.schedules.values()]]

    def _agreed_timings(self) -> list[float]:
        local = torch.tensor(self._timings(), dtype=torch.float64)
        if self.reduce_max is not None:
            local = self.reduce_max(local)
        return [float(value) for value in local.tolist()]

    def _adjust(self) -> None:
        timings = self._agreed_timings()
        predicted = self.predicted_overhead(timings)
        if predicted is None:
            return
        costs = dict(zip(self.schedules, timings[2:], strict=True))
        schedules = list(self.schedules.values())

        def rate(s: EstimatorSchedule) -> float:
            return costs[s.name] / s.interval

        if predicted > self.target:
            while predicted > self.target:
                stretchable = [s for s in schedules
                               if s.interval < s.max_interval and costs[s.name] > 0]
                if not stretchable:
                    break
                pick = max(stretchable, key=lambda s: (s.expensive, rate(s)))
                self._set_interval(pick, min(pick.max_interval, pick.interval * 2))
                predicted = self.predicted_overhead(timings) or 0.0
        elif predicted < self.target * _RELAX_BELOW:
            tightenable = [s for s in schedules if s.interval > s.default_interval]
            for pick in sorted(tightenable, key=lambda s: (s.expensive, rate(s))):
                old = pick.interval
                self._set_interval(pick, max(pick.default_interval, math.ceil(old / 2)))
                if (self.predicted_overhead(timings) or 0.0) <= self.target * _RELAX_TO:
                    break
                self._set_interval(pick, old)

    def _set_interval(self, schedule: EstimatorSchedule, interval: int) -> None:
        schedule.interval = interval
        if schedule.last_run is not None:
            schedule.next_due = schedule.last_run + interval

    # -- reading and checkpointing -------------------------------------------------------

    @property
    def intervals(self) -> dict[str, int]:
        return {name: s.interval for name, s in self.schedules.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "schedules": {name: asdict(s) for name, s in self.schedules.items()},
            "step_seconds": self.step_seconds,
            "base_seconds": self.base_seconds,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores cadences and timings of the estimators that still exist."""
        for name, saved in state.get("schedules", {}).items():
            schedule = self.schedules.get(name)
            if schedule is None:
                continue
            for key in ("interval", "next_due", "last_run", "cost_seconds", "last_seconds",
                        "runs"):
                setattr(schedule, key, saved[key])
            schedule.interval = min(max(schedule.interval, schedule.default_interval),
                                    schedule.max_interval)
        self.step_seconds = state.get("step_seconds")
        self.base_seconds = state.get("base_seconds")
