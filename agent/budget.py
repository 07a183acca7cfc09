"""The overhead budget: decides which estimators run at each step, and how much work each
run does.

The scheduler times every estimator run and the training step (the time between two
``step()`` calls, monitor excluded), keeps smoothed figures, and predicts the steady
overhead as ``(base + Σ cost_e / interval_e) / step_time`` (an estimator that ran several
times since the last decision, like the every-step gradient statistics, is priced at the
mean of those runs). Every ``adjust_every`` steps,
while the prediction is over the target, it first makes runs cheaper: it halves the effort
of the largest contributor (expensive estimators first) that can do less work per run
(``set_effort``), down to ``min_effort``; only then does it double intervals, never past an
estimator's floor (``raresignal.agent.cadence``: the longest interval that still gives the
signal enough measurements). When even minimal effort at every floor stays over the
target, it says so once (a warning naming the signals, their cadence, the predicted
overhead and the settings to change) and ``floor_exceeded`` is true until the prediction
is back under 80 % of the target.
With ample room it undoes this in reverse: intervals back towards their planned cadence
(cheap estimators first), then effort back up to full.

Under torch.distributed every rank must run the same estimators at the same steps, with
the same effort, since estimators issue collectives. So the decision is taken only at
fixed step boundaries, from timings max-reduced over the ranks (max is exact in floating
point, so every rank gets bit-identical inputs) by a deterministic rule: every rank
reaches the same intervals and efforts. Due estimators are a function of the step and
those intervals alone.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from raresignal.agent.api import ReduceFn
from raresignal.agent.cadence import plan_cadence
from raresignal.agent.config import MonitorConfig
from raresignal.agent.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

_STEP_ALPHA = 0.1  # smoothing of the step time and the monitor's base cost
_COST_ALPHA = 0.3  # smoothing of each estimator's run time
_RELAX_BELOW = 0.5  # tighten only when the prediction is under half the target...
_RELAX_TO = 0.8  # ...and the tightened prediction stays under 80 % of it
# A gap between two step() calls longer than this many smoothed step times is a pause,
# once this many steps have set the smoothed step time.
_PAUSE_FACTOR = 10.0
_PAUSE_MIN_STEPS = 20

# apply_effort(name, level) -> the level the estimator applied (None: as asked).
EffortFn = Callable[[str, float], float | None]


@dataclass
class EstimatorSchedule:
    """The cadence, effort and measured cost of one estimator."""

    name: str
    default_interval: int
    expensive: bool
    interval: int
    max_interval: int  # the floor cadence: the budget never stretches past it
    next_due: int
    first_step: int = 0
    floor_measurements: int | None = None  # None: the planning config's
    planned_interval: int = 0  # where it starts and what relaxing returns to
    last_run: int | None = None
    cost_seconds: float | None = None  # smoothed wall time of one run at its effort
    last_seconds: float | None = None  # wall time of the last run
    runs: int = 0
    effort: float = 1.0  # share of a full run's work (set_effort)
    lowest_effort: float = 1.0  # the least effort it accepts (1.0: it cannot do less)
    # Runs since the last decision and their total time: an estimator that runs several
    # times between decisions is priced at their mean (see BudgetScheduler._timings).
    window_runs: int = 0
    window_seconds: float = 0.0

    @property
    def rate_cost(self) -> float:
        """The cost of one run the prediction uses: the mean of the runs since the last
        decision when there were several, else the smoothed cost."""
        if self.window_runs > 1:
            return self.window_seconds / self.window_runs
        return self.cost_seconds or 0.0


def _ema(previous: float | None, value: float, alpha: float) -> float:
    return value if previous is None else previous + alpha * (value - previous)


class BudgetScheduler:
    """Holds every estimator's cadence and effort and keeps the total overhead under a
    target, never stretching an estimator past its floor."""

    def __init__(
        self,
        estimators: Sequence[tuple[str, int, bool] | tuple[str, int, bool, int]
                             | tuple[str, int, bool, int, int | None]],
        target_overhead: float = MonitorConfig.target_overhead,
        max_interval_factor: int = MonitorConfig.max_interval_factor,
        adjust_every: int = MonitorConfig.budget_adjust_every_steps,
        window_steps: int = MonitorConfig.overhead_window_steps,
        reduce_max: ReduceFn | None = None,
        total_steps: int | None = None,
        apply_effort: EffortFn | None = None,
        planning: MonitorConfig | None = None,
    ) -> None:
        names = [entry[0] for entry in estimators]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"estimator names must be unique; repeated: {duplicates}")
        self.target = target_overhead
        self.adjust_every = adjust_every
        self.reduce_max = reduce_max
        # The cadence rule's settings and min_effort; the factor given here wins.
        self.planning = replace(planning or MonitorConfig(),
                                max_interval_factor=max_interval_factor)
        # Without a way to apply it, effort stays full: cadence is the only lever.
        self.apply_effort = apply_effort
        self.total_steps: int | None = None
        self.schedules: dict[str, EstimatorSchedule] = {}
        expensive_rank = 0
        for name, default_interval, expensive, *extra in estimators:
            if default_interval < 1:
                raise ValueError(f"estimator {name!r}: default_interval must be >= 1, "
                                 f"got {default_interval}")
            # Expensive estimators start one step apart so that they never pile up; one
            # with a warm-up (a first step) is not due before it, so that no empty run
            # is taken for its cost.
            warmup = extra[0] if extra else 0
            first = max(warmup, expensive_rank if expensive else 0)
            expensive_rank += int(expensive)
            self.schedules[name] = EstimatorSchedule(
                name, default_interval, expensive, default_interval, default_interval, first,
                first_step=warmup, floor_measurements=extra[1] if len(extra) > 1 else None,
                lowest_effort=self.planning.min_effort if apply_effort else 1.0)
        self.plan(total_steps)
        self.floor_exceeded = False
        self._log = RateLimitedLog(log)
        self.predicted: float | None = None  # the overhead predicted at the last decision
        self.step_seconds: float | None = None
        self.base_seconds: float | None = None
        self._steps_seen = 0
        self._window: deque[tuple[float, float]] = deque(maxlen=window_steps)
        self._window_monitor = 0.0
        self._window_train = 0.0

    def plan(self, total_steps: int | None) -> None:
        """Sets every cadence and floor from the run's planned length (None: the defaults),
        by the rule of ``raresignal.agent.cadence``; the next decisions start from there."""
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps
        for s in self.schedules.values():
            cadence = plan_cadence(s.default_interval, s.expensive, total_steps, s.first_step,
                                   self.planning, s.floor_measurements)
            s.planned_interval, s.max_interval = cadence.interval, cadence.floor
            self._set_interval(s, cadence.interval)

    # -- which estimators run ------------------------------------------------------------

    def due(self, step: int, running: Collection[str] = ()) -> list[str]:
        """Estimators to run at ``step``, in registration order; at most one expensive one
        (the most overdue), the others wait for the following steps. ``running`` names
        measurements still in flight (spread over steps): not due again, and not in the
        way of the others, until they complete."""
        ready = [s for s in self.schedules.values()
                 if step >= s.next_due and s.name not in running]
        expensive = [s for s in ready if s.expensive]
        chosen = min(expensive, key=lambda s: s.next_due) if expensive else None
        return [s.name for s in ready if not s.expensive or s is chosen]

    def record_run(self, name: str, step: int, seconds: float) -> None:
        schedule = self.schedules[name]
        schedule.last_run = step
        schedule.next_due = step + schedule.interval
        schedule.last_seconds = seconds
        schedule.runs += 1
        if schedule.runs > 1:  # the cold first run stays out of the mean, as below
            schedule.window_runs += 1
            schedule.window_seconds += seconds
        # The first run is cold (lazy allocation, caches, a Lanczos without a warm start):
        # its time stands until the second run replaces it outright, so a one-off does
        # not linger in the average; the cadence it stretched relaxes from there.
        if schedule.runs == 2:
            schedule.cost_seconds = seconds
        else:
            schedule.cost_seconds = _ema(schedule.cost_seconds, seconds, _COST_ALPHA)

    # -- timing and decisions ------------------------------------------------------------

    def end_step(self, step: int, monitor_seconds: float, estimator_seconds: float,
                 train_seconds: float | None, cold_seconds: float = 0.0) -> None:
        """Records one step's timings; at a decision boundary, adjusts the intervals.
        ``cold_seconds`` is the part of the monitor's time spent in estimators' first
        (cold) runs, which the measured overhead leaves out.

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
            warm_seconds = max(0.0, monitor_seconds - cold_seconds)
            self._window.append((warm_seconds, train_seconds))
            self._window_monitor += warm_seconds
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
        """Monitor time over training time across the recent window of steps, leaving out
        the estimators' first (cold) runs: one-offs (a Lanczos without a warm start, lazy
        allocations) that would otherwise hold a figure of several times the steady
        overhead for a whole window after the warm-up."""
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
        # An estimator run at every step may cost more on some steps than others (the
        # gradient statistics on the two steps around each update ratio); decisions fall
        # on fixed steps, so a smoothed cost read there would be sampled at the same phase
        # every time. The mean over the steps since the last decision is the true rate.
        return [self.step_seconds or 0.0, self.base_seconds or 0.0,
                *[s.rate_cost for s in self.schedules.values()]]

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
        index = {name: 2 + i for i, name in enumerate(self.schedules)}
        schedules = list(self.schedules.values())

        def rate(s: EstimatorSchedule) -> float:
            return timings[index[s.name]] / s.interval

        def predict() -> float:
            return self.predicted_overhead(timings) or 0.0

        if predicted > self.target:
            # Cheaper runs first: every signal keeps its cadence as long as it can.
            while predicted > self.target:
                cheapenable = [s for s in schedules if s.effort > s.lowest_effort
                               and timings[index[s.name]] > 0]
                if not cheapenable:
                    break
                pick = max(cheapenable, key=lambda s: (s.expensive, rate(s)))
                self._set_effort(pick, max(pick.lowest_effort, pick.effort / 2), timings,
                                 index[pick.name])
                predicted = predict()
            while predicted > self.target:
                stretchable = [s for s in schedules if s.interval < s.max_interval
                               and timings[index[s.name]] > 0]
                if not stretchable:
                    break
                pick = max(stretchable, key=lambda s: (s.expensive, rate(s)))
                self._set_interval(pick, min(pick.max_interval, pick.interval * 2))
                predicted = predict()
        elif predicted < self.target * _RELAX_BELOW:
            self._relax(schedules, timings, index, rate, predict)
        self.predicted = predict()
        # Hysteresis: a prediction hovering about the target would otherwise flip the state
        # (and the warning) at every decision.
        if self.floor_exceeded:
            self._note_floors(self.predicted > self.target * _RELAX_TO)
        else:
            self._note_floors(self.predicted > self.target)
        for schedule in schedules:  # the next decision prices the runs from here on
            schedule.window_runs, schedule.window_seconds = 0, 0.0

    def _relax(self, schedules: list[EstimatorSchedule], timings: list[float],
               index: dict[str, int], rate: Callable[[EstimatorSchedule], float],
               predict: Callable[[], float]) -> None:
        """With ample room: one interval back towards its planned cadence (cheap estimators
        first) or, when every cadence is planned, one effort back up."""
        tightenable = [s for s in schedules if s.interval > s.planned_interval]
        for pick in sorted(tightenable, key=lambda s: (s.expensive, rate(s))):
            old = pick.interval
            self._set_interval(pick, max(pick.planned_interval, math.ceil(old / 2)))
            if predict() <= self.target * _RELAX_TO:
                return
            self._set_interval(pick, old)
        if tightenable:
            return
        for pick in sorted((s for s in schedules if s.effort < 1.0),
                           key=lambda s: (s.expensive, rate(s))):
            position = index[pick.name]
            cost = timings[position]
            timings[position] = cost * min(1.0, pick.effort * 2) / pick.effort
            fits = predict() <= self.target * _RELAX_TO
            timings[position] = cost
            if fits:
                self._set_effort(pick, min(1.0, pick.effort * 2), timings, position)
                return

    def _set_effort(self, schedule: EstimatorSchedule, level: float, timings: list[float],
                    position: int) -> None:
        """Asks the estimator for ``level``; the cost it is predicted at (in the agreed
        timings and its own smoothed cost) follows in proportion."""
        applied = self._apply(schedule.name, level)
        if applied >= schedule.effort and level < schedule.effort:
            schedule.lowest_effort = schedule.effort  # it cannot do less per run
            return
        ratio = applied / schedule.effort
        timings[position] *= ratio
        if schedule.cost_seconds is not None:
            schedule.cost_seconds *= ratio
        schedule.effort = applied

    def _apply(self, name: str, level: float) -> float:
        applied = self.apply_effort(name, level) if self.apply_effort else 1.0
        return level if applied is None else float(applied)

    def _set_interval(self, schedule: EstimatorSchedule, interval: int) -> None:
        schedule.interval = interval
        if schedule.last_run is not None:
            schedule.next_due = schedule.last_run + interval

    def _note_floors(self, exceeded: bool) -> None:
        """Says once, at each change, whether the floors fit in the budget."""
        if exceeded == self.floor_exceeded:
            return
        self.floor_exceeded = exceeded
        if exceeded:
            self._log.warning("floors", "raresignal: %s", self.floor_message())
        else:
            log.info("raresignal: the overhead budget holds every estimator's floor again "
                     "(predicted overhead %.1f%%, target %.1f%%)",
                     100 * (self.predicted or 0.0), 100 * self.target)

    def floor_message(self) -> str:
        """Which signals cannot keep their floor within the budget, and what to change."""
        # Every-step estimators included: they cannot be stretched, and are often the most.
        costly = sorted((s for s in self.schedules.values() if s.rate_cost),
                        key=lambda s: -s.rate_cost / s.interval)
        signals = ", ".join(
            f"{s.name} every {'step' if s.interval == 1 else f'{s.interval} steps'} at "
            f"effort {s.effort:g} ({1000 * s.rate_cost:.1f} ms a run)" for s in costly[:4])
        return (f"the overhead budget cannot keep every signal's floor: predicted overhead "
                f"{100 * (self.predicted or 0.0):.1f}% of step time against a target of "
                f"{100 * self.target:.1f}% with {signals}; the floors are kept over "
                f"target. Raise MonitorConfig(target_overhead=...) to accept the cost, or "
                f"lower MonitorConfig(floor_measurements=...) (for probe_loss: "
                f"EstimatorConfig(probe_loss_floor_measurements=...)) or lengthen the "
                f"estimator's EstimatorConfig interval to measure less often")

    # -- reading and checkpointing -------------------------------------------------------

    @property
    def intervals(self) -> dict[str, int]:
        return {name: s.interval for name, s in self.schedules.items()}

    @property
    def efforts(self) -> dict[str, float]:
        return {name: s.effort for name, s in self.schedules.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "schedules": {name: asdict(s) for name, s in self.schedules.items()},
            "step_seconds": self.step_seconds,
            "base_seconds": self.base_seconds,
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores cadences, efforts and timings of the estimators that still exist (and
        the planned length, unless this run was given one)."""
        if self.total_steps is None and state.get("total_steps") is not None:
            self.plan(int(state["total_steps"]))
        for name, saved in state.get("schedules", {}).items():
            schedule = self.schedules.get(name)
            if schedule is None:
                continue
            for key in ("interval", "next_due", "last_run", "cost_seconds", "last_seconds",
                        "runs"):
                setattr(schedule, key, saved[key])
            schedule.interval = min(max(schedule.interval, schedule.planned_interval),
                                    schedule.max_interval)
            effort = float(saved.get("effort", 1.0))
            if effort != schedule.effort:
                schedule.effort = self._apply(name, effort)
            # What the estimator said it can do least, so a resumed budget does not ask
            # again for effort it cannot have.
            schedule.lowest_effort = max(schedule.lowest_effort,
                                         float(saved.get("lowest_effort", 0.0)))
        self.step_seconds = state.get("step_seconds")
        self.base_seconds = state.get("base_seconds")
