"""The one rule that turns an estimator's default cadence and the run's planned length into
the cadence it starts at and the floor the overhead budget keeps.

With ``L`` planned steps, an estimator with default interval ``d`` and first step ``f``
(``n = L - f`` steps in which it can run) and the settings of ``MonitorConfig``
(``N = planned_measurements``, ``M = floor_measurements``, ``m = min_planned_interval``,
``F = max_interval_factor``; an estimator whose signal needs more runs declares its own
``M``, e.g. the probes' forward-only loss, which the default alert reads)::

    interval = min(d, max(m, n // N))           # N runs, not more often than every m steps
    floor    = min(d * F, max(interval, n // M))  # the budget keeps at least M runs

so a short run gets every signal several times and a long one keeps the defaults. With no
planned length ``interval = d`` and ``floor = d * F``. A cheap estimator due every step
(``d = 1``, not expensive: the loss and gradient statistics) is never stretched: its
floor is 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from raresignal.agent.config import MonitorConfig


@dataclass(frozen=True)
class Cadence:
    """Where an estimator starts (``interval``) and the longest interval the budget may
    stretch it to (``floor``), both in optimizer steps."""

    interval: int
    floor: int


def plan_cadence(default_interval: int, expensive: bool, total_steps: int | None,
                 first_step: int = 0, config: MonitorConfig | None = None,
                 floor_measurements: int | None = None) -> Cadence:
    """The cadence and floor of one estimator (the rule in the module docstring);
    ``floor_measurements`` overrides the config's ``M`` for this estimator."""
    config = config or MonitorConfig()
    if default_interval == 1 and not expensive:
        return Cadence(1, 1)
    longest = default_interval * config.max_interval_factor
    if total_steps is None:
        return Cadence(default_interval, longest)
    steps = max(0, total_steps - first_step)
    interval = min(default_interval,
                   max(config.min_planned_interval, steps // config.planned_measurements))
    floor = min(longest, max(interval, steps // (floor_measurements
                                                 or config.floor_measurements)))
    return Cadence(interval, floor)


def planned_warmup(default_step: int, total_steps: int | None, fraction: float) -> int:
    """A warm-up of ``default_step`` steps, cut to ``fraction`` of a shorter planned run so
    that what it waits for still happens."""
    if total_steps is None:
        return default_step
    return min(default_step, int(total_steps * fraction))
