"""The detectors compared: raresignal's alert engine and three alarms users have today.

Each detector reads a recorded :class:`RunTrace` and returns its alarms: the steps at which
an alarm *starts* (an alarm that stays on is one alarm). The raresignal detector replays
the agent's measurements into the server's own :class:`AlertEngine` — the same object the
server feeds from its ingest path — so its verdicts are the server's verdicts. The engine
is driven in-process rather than through a server on a socket: the engine is pure and
synchronous (the server adds transport, storage and exposition around it, not decisions),
and replaying a recorded trace lets the tuning try many thresholds on one training run.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from detection_runs import RunTrace

from raresignal.protos.v1 import common_pb2
from raresignal.server.alerting.engine import AlertEngine
from raresignal.server.alerting.rules import Rule
from raresignal.server.storage.records import CheckedSample, labels_key

_RUN_ID = "benchmark-run"


@dataclass(frozen=True)
class Alarm:
    step: int
    source: str  # the alert rule, or the baseline's name


def raresignal_alarms(trace: RunTrace, rules: Sequence[Rule]) -> list[Alarm]:
    """Every alert episode that reached FIRING when the run's measurements are fed, step by
    step, to a fresh AlertEngine with ``rules`` (an episode firing again within its hold is
    the same alarm). Non-finite values are left out, as the agent
    leaves them out of its reports (the non-finite count is a metric of its own)."""
    engine = AlertEngine(rules)
    # A zero report interval switches the stall clock off: the replay has no wall clock.
    engine.track_run(_RUN_ID, trace.name, report_interval_seconds=0.0, last_report_at=0.0)
    # Only the metrics the rules read are fed (the engine ignores the others anyway), so a
    # tuning that replays one rule at a time stays fast.
    metrics = {c.metric for rule in rules for c in (rule.condition, rule.while_condition)
               if c is not None}
    by_step: dict[int, list[CheckedSample]] = defaultdict(list)
    for step, metric, labels, value in trace.samples:
        if metric in metrics and math.isfinite(value):
            by_step[step].append(CheckedSample(metric, labels_key(dict(labels)), step, value,
                                               float(step)))
    alarms: list[Alarm] = []
    for step in sorted(by_step):
        for change in engine.observe(_RUN_ID, by_step[step], now=float(step)):
            if (change.alert.state == common_pb2.ALERT_STATE_FIRING
                    and change.previous_state != common_pb2.ALERT_STATE_RESOLVED):
                alarms.append(Alarm(change.alert.step, change.alert.rule))
    return alarms


def _onsets(steps: Sequence[int], breached: Sequence[bool], consecutive: int) -> list[int]:
    """Steps at which ``breached`` has held for ``consecutive`` points in a row; the alarm
    re-arms once a point is not breached."""
    onsets: list[int] = []
    run = 0
    for step, hit in zip(steps, breached, strict=True):
        run = run + 1 if hit else 0
        if run == consecutive:
            onsets.append(step)
    return onsets


@dataclass(frozen=True)
class RiseAlarm:
    """EWMA of a loss above ``factor`` x its running minimum for ``consecutive`` points.

    The running minimum starts after ``warmup`` points (the loss falls while a model
    learns, so the minimum only means something once it has). A non-finite value is a
    breach at once: no user ignores a NaN loss.
    """

    factor: float
    consecutive: int = 3
    smoothing: float = 0.1  # EWMA weight of the newest point
    warmup: int = 10

    def alarms(self, steps: Sequence[int], values: Sequence[float]) -> list[int]:
        smoothed: float | None = None
        lowest = math.inf
        breached: list[bool] = []
        for index, value in enumerate(values):
            if not math.isfinite(value):
                breached.append(True)
                continue
            smoothed = value if smoothed is None else (
                self.smoothing * value + (1 - self.smoothing) * smoothed)
            if index < self.warmup:
                breached.append(False)
                continue
            lowest = min(lowest, smoothed)
            breached.append(smoothed > self.factor * lowest)
        return _onsets(steps, breached, self.consecutive)


@dataclass(frozen=True)
class SpikeAlarm:
    """A value above median + ``k`` x MAD of the trailing ``window`` values, for
    ``consecutive`` points; the MAD is floored at 1 % of the median (as the server's
    baselines are) so that a flat history does not make every wiggle a spike."""

    k: float
    consecutive: int = 1
    window: int = 100
    warmup: int = 50

    def alarms(self, steps: Sequence[int], values: Sequence[float]) -> list[int]:
        breached: list[bool] = []
        for index, value in enumerate(values):
            if not math.isfinite(value):
                breached.append(True)
                continue
            history = [v for v in values[max(0, index - self.window):index] if math.isfinite(v)]
            if index < self.warmup or len(history) < 2:
                breached.append(False)
                continue
            median = statistics.median(history)
            mad = max(statistics.median(abs(v - median) for v in history), 0.01 * abs(median))
            breached.append(value > median + self.k * mad)
        return _onsets(steps, breached, self.consecutive)


def loss_rise_alarms(trace: RunTrace, alarm: RiseAlarm) -> list[Alarm]:
    """Baseline (a): the training loss curve, as every user logs it."""
    steps = range(len(trace.loss))
    return [Alarm(s, "loss_rise") for s in alarm.alarms(steps, trace.loss)]


def grad_spike_alarms(trace: RunTrace, alarm: SpikeAlarm) -> list[Alarm]:
    """Baseline (b): the pre-clip gradient norm, as most trainers log it."""
    steps = range(len(trace.grad_norm))
    return [Alarm(s, "grad_norm_spike") for s in alarm.alarms(steps, trace.grad_norm)]


def probe_loss_alarms(trace: RunTrace, alarm: RiseAlarm) -> list[Alarm]:
    """Baseline (c): the rare probe's own loss, from a labelled evaluation of the probe at
    every ground-truth evaluation (the best a user with a labelled rare eval set can do)."""
    return [Alarm(s, "probe_loss_rise")
            for s in alarm.alarms(trace.eval_steps, trace.rare_loss)]
