"""The detectors compared: raresignal's alert engine, and a labelled probe-loss alarm.

Each detector reads a recorded :class:`RunTrace` and returns its alarms: the steps at which
an alarm *starts* (an alarm that stays on is one alarm). The raresignal detector replays
the agent's measurements into the server's own :class:`AlertEngine`, the object the
server feeds from its ingest path, so its verdicts are the server's verdicts. The engine
is driven in-process rather than through a server on a socket: it is pure and synchronous
(the server adds transport, storage and exposition around it, not decisions), and
replaying a recorded trace lets the tuning try many thresholds on one training run.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from detection_traces import RunTrace

from raresignal.protos.v1 import common_pb2
from raresignal.server.alerting.engine import AlertEngine
from raresignal.server.alerting.rules import Rule
from raresignal.server.storage.records import CheckedSample, labels_key

_RUN_ID = "benchmark-run"
RARE_SIGNAL_METRIC_PREFIX = "probe_"


@dataclass(frozen=True)
class Alarm:
    step: int
    source: str  # the alert rule, or the reference alarm's name


def is_rare_signal(rule: Rule) -> bool:
    """A rule that reads a probe's signal: the rules that speak for the rare slice."""
    return rule.condition is not None and rule.condition.metric.startswith(
        RARE_SIGNAL_METRIC_PREFIX)


def raresignal_alarms(trace: RunTrace, rules: Sequence[Rule]) -> list[Alarm]:
    """Every alert episode that reached FIRING when the run's measurements are fed, step by
    step, to a fresh AlertEngine with ``rules`` (an episode firing again within its hold
    is the same alarm). Non-finite values are left out, as the agent leaves them out of
    its reports (the non-finite count is a metric of its own)."""
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


@dataclass(frozen=True)
class MarginAlarm:
    """A value ``margin`` above its running minimum for ``consecutive`` points; the alarm
    re-arms once a point is back within the margin. The running minimum starts after
    ``warmup`` points (a loss falls while a model learns: an early wobble is no loss)."""

    margin: float
    consecutive: int = 2
    warmup: int = 10

    def alarms(self, steps: Sequence[int], values: Sequence[float]) -> list[int]:
        lowest = math.inf
        onsets: list[int] = []
        run = 0
        for index, (step, value) in enumerate(zip(steps, values, strict=True)):
            breached = not math.isfinite(value) or (
                index >= self.warmup and value > lowest + self.margin)
            if math.isfinite(value) and index >= self.warmup:
                lowest = min(lowest, value)
            run = run + 1 if breached else 0
            if run == self.consecutive:
                onsets.append(step)
        return onsets


PROBE_LOSS_MARGIN = 0.5  # nats above the rare probe loss's running minimum


def probe_loss_alarms(trace: RunTrace, alarm: MarginAlarm | None = None) -> list[Alarm]:
    """The reference detector: the labelled rare probe's loss, evaluated exactly at every
    benchmark evaluation, rising ``PROBE_LOSS_MARGIN`` nats above its running minimum
    (what a user with a labelled rare eval set can do)."""
    alarm = alarm or MarginAlarm(PROBE_LOSS_MARGIN)
    return [Alarm(s, "probe_loss_rise") for s in alarm.alarms(trace.eval_steps,
                                                              trace.probe_loss)]
