"""The alert engine: samples and time in, alert state transitions out.

It is pure and synchronous (no I/O, no clock of its own), so every behaviour — baseline
learning, ``for``, hysteresis, the hold after a resolve, deduplication, the stall clock
(fed by reports and heartbeats) — is unit-testable by feeding values and timestamps. The
server stores what :meth:`AlertEngine.take_writes` returns in the same transaction as the
samples that caused it, and restores the engine from storage on restart (all but the stall
clock's learned pace, which the next steps teach it again).
"""

from __future__ import annotations

import hashlib
import json
import statistics
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from raresignal.protos.catalog import CATALOG
from raresignal.protos.v1 import common_pb2
from raresignal.server.alerting.rules import (
    RATIO_KINDS,
    STALL_REASONS,
    BaselineSpec,
    Condition,
    Relative,
    Rule,
    boundary,
)
from raresignal.server.storage.records import (
    AlertChange,
    AlertRecord,
    CheckedSample,
    EngineWrites,
    labels_key,
)

PENDING = common_pb2.ALERT_STATE_PENDING
FIRING = common_pb2.ALERT_STATE_FIRING
RESOLVED = common_pb2.ALERT_STATE_RESOLVED
UNSPECIFIED = common_pb2.ALERT_STATE_UNSPECIFIED

_FIRE = "fire"
_WHILE = "while"
_STALL = "stall"


# Slots: the server keeps one of these per (rule, series), hundreds of thousands under a
# full quota, and a slotted instance is a fraction of one with a __dict__.
@dataclass(slots=True)
class SeriesState:
    """What the engine remembers about one (run, rule, series): baseline and episode."""

    seen: int = 0
    smoothed: float | None = None
    window: list[float] = field(default_factory=list)
    median: float | None = None
    mad: float | None = None
    last_step: int = -1
    last_value: float | None = None
    consecutive: int = 0
    episodes: int = 0
    alert_id: str | None = None
    evaluated: float | None = None  # the smoothed value a rule with smoothing compares
    # After a firing alert resolves, its episode (``alert_id``) stays open until this many
    # more evaluations pass without the condition, so that a relapse fires the same alert
    # again; the record's times are kept here, as the resolved record leaves the active
    # alerts (and only the active ones are reloaded on restart).
    hold_left: int = 0
    started_at: float = 0.0
    fired_at: float = 0.0
    # A rule relative to its running best: the series' first value, and the best since
    # the warm-up (a trailing-ratio rule with ``gained``: since the first value).
    start: float | None = None
    best: float | None = None
    # ...with ``best_over_steps``: [step, value] of the compared values that can still be
    # the best of the window, oldest (the window's best) first.
    trailing: list[list[float]] | None = None
    # A rule with ``median_over_steps``: the series' raw values of its last steps and
    # those steps, newest last (None for every other rule, so that they carry no list).
    recent: list[float] | None = None
    recent_steps: list[int] | None = None

    @property
    def baseline_ready(self) -> bool:
        return self.median is not None

    def to_dict(self) -> dict[str, Any]:
        # What dataclasses.asdict gives, written out: this runs for every series a batch
        # touches, and asdict's generic deep copy costs several times more.
        return {"seen": self.seen, "smoothed": self.smoothed, "window": list(self.window),
                "median": self.median, "mad": self.mad, "last_step": self.last_step,
                "last_value": self.last_value, "consecutive": self.consecutive,
                "episodes": self.episodes, "alert_id": self.alert_id,
                "evaluated": self.evaluated, "hold_left": self.hold_left,
                "started_at": self.started_at, "fired_at": self.fired_at, "start": self.start,
                "best": self.best,
                "trailing": None if self.trailing is None else [list(p) for p in self.trailing],
                "recent": None if self.recent is None else list(self.recent),
                "recent_steps": None if self.recent_steps is None else list(self.recent_steps)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeriesState:
        return cls(**data)

    def median_over_steps(self, steps: int, step: int, value: float) -> float:
        """The median of the raw values read in the last ``steps`` steps (``step - steps``
        included), ``value`` at ``step`` the newest."""
        recent, stamps = self.recent, self.recent_steps
        if recent is None or stamps is None or len(recent) != len(stamps):
            recent, stamps = [], []  # nothing kept yet (or kept by an older server)
        recent.append(value)
        stamps.append(step)
        first = bisect_left(stamps, step - steps)
        del recent[:first], stamps[:first]
        self.recent, self.recent_steps = recent, stamps
        return statistics.median(recent)

    def feed_best(self, warmup: int, value: float, lower_is_better: bool, step: int,
                  over_steps: int = 0) -> bool:
        """Keeps the first value (where the series started), counts one evaluation
        towards the warm-up, then keeps the best value seen (this one included) and, with
        ``over_steps``, the best of the last ``over_steps`` steps; True once there is a
        best to compare with. While an episode is open the window stands still: the
        alert compares with the best from before the climb, not with the climb."""
        if self.start is None:
            self.start = value
        if self.seen < warmup:
            self.seen += 1
            return False
        if self.best is None:
            self.best = value
        else:
            self.best = min(self.best, value) if lower_is_better else max(self.best, value)
        if over_steps and self.alert_id is None:
            trailing = self.trailing if self.trailing is not None else []
            # A monotone queue: a value no better than a newer one can never again be
            # the window's best.
            while trailing and (trailing[-1][1] >= value if lower_is_better
                                else trailing[-1][1] <= value):
                trailing.pop()
            trailing.append([step, value])
            while trailing[0][0] < step - over_steps:
                trailing.pop(0)
            self.trailing = trailing
        return True

    def best_to_compare(self, over_steps: int) -> float | None:
        """The best the rule compares with: of its window, or of the whole run."""
        if over_steps and self.trailing:
            return self.trailing[0][1]
        return self.best

    def track_gain(self, value: float, lower_is_better: bool) -> None:
        """Keeps the first value and the best, for a rule on another baseline that waits
        until the series gained ground (``gained``)."""
        if self.start is None:
            self.start = value
        if self.best is None:
            self.best = value
        else:
            self.best = min(self.best, value) if lower_is_better else max(self.best, value)

    def improved_by(self, margin: float, lower_is_better: bool) -> bool:
        """Whether the best lies at least ``margin`` past the start: a value can only be
        losing ground it gained, so a rule relative to its best waits for that."""
        if self.start is None or self.best is None:
            return False
        gained = self.start - self.best if lower_is_better else self.best - self.start
        return gained >= margin

    def feed_baseline(self, spec: BaselineSpec, value: float) -> None:
        """Learns the baseline from the evaluations after the warm-up, then freezes it."""
        if self.median is not None:
            return
        self.seen += 1
        if self.seen <= spec.warmup:
            return
        if self.smoothed is None:
            self.smoothed = value
        else:
            self.smoothed = spec.smoothing * value + (1 - spec.smoothing) * self.smoothed
        self.window.append(self.smoothed)
        if len(self.window) >= spec.window:
            median = statistics.median(self.window)
            mad = statistics.median(abs(x - median) for x in self.window)
            self.median = median
            self.mad = max(mad, spec.mad_floor_fraction * abs(median), 1e-12)
            self.window = []

    def feed_trailing(self, spec: BaselineSpec, value: float) -> bool:
        """A baseline that follows the series: after the warm-up, the median of the
        previous ``spec.window`` raw values, set before this one joins them; True once
        there are that many to compare with."""
        if self.seen < spec.warmup:
            self.seen += 1
            return False
        ready = len(self.window) >= spec.window
        if ready:
            self.median = statistics.median(self.window)
            del self.window[:len(self.window) - spec.window + 1]
        self.window.append(value)
        return ready


@dataclass
class RunClock:
    """What the stall rule knows of a run: when it was last heard, and its pace."""

    run_name: str
    report_interval_seconds: float  # 0: the run has no wall clock (a replay); never stalls
    last_report_at: float  # the last report or heartbeat
    last_step: int = 0
    finished: bool = False
    step_advanced_at: float = 0.0
    # Seconds between the recent step advances the server saw (not stored: relearned).
    gaps: deque[float] = field(default_factory=deque)

    def heard(self, step: int, now: float, history: int) -> None:
        """A report or heartbeat at ``now`` says the run is at ``step``."""
        self.last_report_at = max(self.last_report_at, now)
        if step > self.last_step:
            self.gaps.append(max(0.0, now - self.step_advanced_at))
            while len(self.gaps) > history:
                self.gaps.popleft()
            self.last_step = step
            self.step_advanced_at = now


def _alert_id(run_id: str, rule: str, labels_key: str, episode: int) -> str:
    digest = hashlib.sha256(f"{run_id}\0{rule}\0{labels_key}\0{episode}".encode())
    return digest.hexdigest()[:20]


def _project(labels: dict[str, str], metric: str) -> str:
    """The label set of ``metric``'s series that matches a series with ``labels``."""
    return labels_key({k: v for k, v in labels.items() if k in CATALOG[metric].labels})


class AlertEngine:
    """Evaluates rules per run and series as samples arrive, and the stall rule on ticks."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = list(rules)
        self._by_metric: dict[str, list[tuple[Rule, str]]] = {}
        for rule in self.rules:
            if rule.condition is not None:
                self._by_metric.setdefault(rule.condition.metric, []).append((rule, _FIRE))
            if rule.while_condition is not None:
                self._by_metric.setdefault(rule.while_condition.metric, []).append(
                    (rule, _WHILE))
        self._while_metrics = {r.while_condition.metric for r in self.rules
                               if r.while_condition is not None}
        # Per metric, what each sample of it is evaluated against, prepared once:
        # (rule, is the fire condition, state-key prefix, its kind of reference, and how
        # that reference is learned).
        self._plans: dict[str, list[tuple[Rule, bool, str, Relative, BaselineSpec]]] = {}
        for metric, entries in self._by_metric.items():
            # A rule whose `while` reads its own metric sees this sample there first.
            for rule, role in sorted(entries, key=lambda entry: entry[1] != _WHILE):
                condition = rule.condition if role == _FIRE else rule.while_condition
                assert condition is not None
                spec = (rule.baseline if role == _FIRE or rule.while_baseline is None
                        else rule.while_baseline)
                self._plans.setdefault(metric, []).append(
                    (rule, role == _FIRE, f"{rule.alert}/{role}/{metric}/",
                     condition.relative_to, spec))
        self._stall_rules = [rule for rule in self.rules if rule.is_stall]
        self._gap_history = max((r.stall.history for r in self._stall_rules if r.stall),
                                default=1)
        self._runs: dict[str, RunClock] = {}
        self._states: dict[str, dict[str, SeriesState]] = {}
        self._active: dict[str, AlertRecord] = {}
        self._dirty_states: set[tuple[str, str]] = set()
        self._dirty_alerts: dict[str, AlertRecord] = {}
        self._changes: list[AlertChange] = []
        self._decoded: dict[str, dict[str, str]] = {}
        # (rule, label key) -> whether the rule ignores that series, decided once.
        self._ignored: dict[tuple[str, str], bool] = {}

    @property
    def metrics(self) -> frozenset[str]:
        """The metrics some rule reads (in its condition or its ``while``): the samples of
        any other metric change nothing here."""
        return frozenset(self._by_metric)

    # -- runs ------------------------------------------------------------------------

    def track_run(self, run_id: str, run_name: str, report_interval_seconds: float,
                  last_report_at: float, last_step: int = 0, finished: bool = False) -> None:
        """Registers a run (opened, resumed, or loaded on restart)."""
        # The pace is relearned from here: until then only silence counts as a stall.
        self._runs[run_id] = RunClock(run_name, report_interval_seconds, last_report_at,
                                      last_step, finished, step_advanced_at=last_report_at)
        self._states.setdefault(run_id, {})

    def close_run(self, run_id: str, now: float) -> list[AlertChange]:
        """A finished run stops stalling, and its open alerts resolve."""
        clock = self._runs.get(run_id)
        if clock is not None:
            clock.finished = True
        changes: list[AlertChange] = []
        for alert in [a for a in self._active.values() if a.run_id == run_id]:
            self._transition(alert, RESOLVED, now, changes)
        for key, state in self._states.get(run_id, {}).items():
            if state.alert_id is not None:
                _end_episode(state)
                self._dirty_states.add((run_id, key))
        return changes

    # -- evaluation ------------------------------------------------------------------

    def observe(self, run_id: str, samples: Sequence[CheckedSample],
                now: float) -> list[AlertChange]:
        """Evaluates every rule on each new step of each series in ``samples``."""
        clock = self._runs[run_id]
        changes: list[AlertChange] = []
        newest = max((s.step for s in samples), default=clock.last_step)
        clock.heard(newest, now, self._gap_history)
        self._evaluate_stall(run_id, clock, now, changes)
        relevant = [s for s in samples if s.metric in self._by_metric]
        if not relevant:
            return changes
        # Oldest step first; at one step, "while" metrics first so a rule sees them fresh.
        while_metrics = self._while_metrics
        relevant.sort(key=lambda s: (s.step, s.metric not in while_metrics))
        states = self._states[run_id]
        dirty = self._dirty_states
        plans = self._plans
        last_step = clock.last_step
        for sample in relevant:
            step = sample.step
            if step > last_step:
                last_step = step
            for rule, is_fire, prefix, relative, spec in plans[sample.metric]:
                if rule.ignore_labels and self._ignores(rule, sample.labels_key):
                    continue
                key = prefix + sample.labels_key
                state = states.get(key)
                if state is None:
                    state = states[key] = SeriesState()
                if step <= state.last_step:
                    continue  # each step of a series is evaluated once
                state.last_step = step
                state.last_value = sample.value
                dirty.add((run_id, key))
                value = sample.value
                if is_fire and rule.median_over_steps:
                    value = state.median_over_steps(rule.median_over_steps, step, value)
                if is_fire and rule.smoothing < 1.0:
                    if state.evaluated is not None:
                        value = (rule.smoothing * value
                                 + (1.0 - rule.smoothing) * state.evaluated)
                    state.evaluated = value
                ready = True
                if relative is Relative.ABSOLUTE:
                    pass
                elif relative is Relative.RUNNING_BEST:
                    # The compared value (smoothed, for a smoothing rule) sets the best.
                    condition = rule.condition if is_fire else rule.while_condition
                    assert condition is not None
                    ready = state.feed_best(
                        spec.warmup, value, lower_is_better=not condition.points_down,
                        step=step, over_steps=rule.best_over_steps if is_fire else 0)
                elif relative is Relative.TRAILING_RATIO:
                    ready = state.feed_trailing(spec, sample.value)
                    if is_fire and rule.gained is not None:
                        assert rule.condition is not None
                        state.track_gain(sample.value,
                                         lower_is_better=not rule.condition.points_down)
                elif state.median is None:
                    # Not ready before this value: it only feeds the baseline.
                    state.feed_baseline(spec, sample.value)
                    ready = False
                if is_fire:
                    if ready:
                        self._evaluate(run_id, rule, state, sample, value, now, changes)
                else:
                    # How many of the while metric's evaluations in a row held, this one
                    # included (a rule's `while.for`).
                    condition = rule.while_condition
                    assert condition is not None
                    held = ready and _holds(condition, state, condition.threshold)
                    state.consecutive = state.consecutive + 1 if held else 0
        clock.last_step = last_step
        return changes

    def heartbeat(self, run_id: str, step: int, now: float) -> list[AlertChange]:
        """The run's process is alive at ``step``: heard, though perhaps not advancing."""
        clock = self._runs[run_id]
        changes: list[AlertChange] = []
        if clock.finished:
            return changes
        clock.heard(step, now, self._gap_history)
        self._evaluate_stall(run_id, clock, now, changes)
        return changes

    def tick(self, now: float) -> list[AlertChange]:
        """The clock rule: a run whose step froze, or that went silent, for too long."""
        changes: list[AlertChange] = []
        for run_id, clock in self._runs.items():
            self._evaluate_stall(run_id, clock, now, changes)
        return changes

    def _boundaries(self, rule: Rule, state: SeriesState) -> tuple[float, float] | None:
        condition = rule.condition
        assert condition is not None
        if condition.relative_to is Relative.ABSOLUTE:
            return condition.threshold, rule.resolve_threshold
        # The ground a series must have gained before it can lose it: `gained` (running-
        # best and trailing-ratio rules only), a running-best rule's threshold otherwise.
        gain = (rule.gained if rule.gained is not None else condition.threshold
                if condition.relative_to is Relative.RUNNING_BEST else None)
        if gain is not None and not state.improved_by(
                gain, lower_is_better=not condition.points_down):
            return None
        if condition.relative_to in RATIO_KINDS and (state.median or 0.0) <= 0:
            return None  # a ratio of a non-positive baseline means nothing
        best = state.best_to_compare(rule.best_over_steps)
        return (rule.boundary(condition.threshold, state.median, state.mad, best),
                rule.boundary(rule.resolve_threshold, state.median, state.mad, best))

    def _labels(self, key: str) -> dict[str, str]:
        """The label mapping of a canonical label key (decoded once per key)."""
        labels = self._decoded.get(key)
        if labels is None:
            if len(self._decoded) > 65_536:
                self._decoded.clear()
            labels = self._decoded[key] = json.loads(key)
        return dict(labels)

    def _ignores(self, rule: Rule, labels_key: str) -> bool:
        decided = self._ignored.get((rule.alert, labels_key))
        if decided is None:
            if len(self._ignored) > 65_536:
                self._ignored.clear()
            decided = self._ignored[(rule.alert, labels_key)] = rule.ignores(
                self._labels(labels_key))
        return decided

    def _while_holds(self, run_id: str, rule: Rule, labels: dict[str, str]) -> bool:
        condition = rule.while_condition
        if condition is None:
            return True
        key = f"{rule.alert}/{_WHILE}/{condition.metric}/{_project(labels, condition.metric)}"
        state = self._states[run_id].get(key)
        if state is None or state.last_value is None:
            return False
        return state.consecutive >= rule.while_for

    def _evaluate(self, run_id: str, rule: Rule, state: SeriesState, sample: CheckedSample,
                  value: float, now: float, changes: list[AlertChange]) -> None:
        """One evaluation of ``value`` (the sample's, smoothed when the rule smooths)."""
        bounds = self._boundaries(rule, state)
        if bounds is None:
            return
        fire_at, resolve_at = bounds
        condition = rule.condition
        assert condition is not None
        alert = self._active.get(state.alert_id) if state.alert_id else None
        if alert is None:
            if state.hold_left:
                self._evaluate_held(run_id, rule, state, sample, value, fire_at, now, changes)
                return
            if not condition.holds(value, fire_at):
                return  # the common case: nothing to alert on, no labels needed
            labels = self._labels(sample.labels_key)
            if not self._while_holds(run_id, rule, labels):
                return
            state.episodes += 1
            state.consecutive = 1
            alert = self._new_alert(run_id, rule, labels, sample.labels_key, state.episodes,
                                    value, fire_at, sample.step, now)
            state.alert_id = alert.alert_id
            self._active[alert.alert_id] = alert
            target = FIRING if rule.for_evaluations <= 1 else PENDING
            self._transition(alert, target, now, changes, previous=UNSPECIFIED)
            return
        labels = self._labels(sample.labels_key)
        self._update_value(alert, rule, labels, value, fire_at, sample.step)
        if alert.state == PENDING:
            if condition.holds(value, fire_at) and self._while_holds(run_id, rule, labels):
                state.consecutive += 1
                if state.consecutive >= rule.for_evaluations:
                    self._transition(alert, FIRING, now, changes)
                return
        elif condition.holds(value, resolve_at) and self._while_holds(run_id, rule, labels):
            return  # firing, and not yet back past the resolve boundary
        if alert.state == FIRING and rule.hold:
            state.hold_left = rule.hold
            state.started_at, state.fired_at = alert.started_at, alert.fired_at
            state.consecutive = 0
        else:
            _end_episode(state)  # a pending alert that never fired ends at once
        self._transition(alert, RESOLVED, now, changes)

    def _evaluate_held(self, run_id: str, rule: Rule, state: SeriesState,
                       sample: CheckedSample, value: float, fire_at: float, now: float,
                       changes: list[AlertChange]) -> None:
        """One evaluation within the hold. A relapse that lasts ``for`` evaluations, as a new
        alert would have to, fires the resolved episode again; each evaluation without the
        condition runs the hold down, and the last one ends the episode."""
        condition = rule.condition
        assert condition is not None and state.alert_id is not None
        relapse = condition.holds(value, fire_at)
        if relapse:
            labels = self._labels(sample.labels_key)
            relapse = self._while_holds(run_id, rule, labels)
        if relapse:
            state.consecutive += 1
            if state.consecutive < rule.for_evaluations:
                return  # stays resolved: a relapse shorter than `for` fires nothing
            alert = self._new_alert(run_id, rule, labels, sample.labels_key, state.episodes,
                                    value, fire_at, sample.step, state.started_at)
            alert.fired_at = state.fired_at
            state.hold_left = 0
            self._active[alert.alert_id] = alert
            self._transition(alert, FIRING, now, changes, previous=RESOLVED)
            return
        state.consecutive = 0
        state.hold_left -= 1
        if not state.hold_left:
            _end_episode(state)

    # -- the stall rule ----------------------------------------------------------------

    def _evaluate_stall(self, run_id: str, clock: RunClock, now: float,
                        changes: list[AlertChange]) -> None:
        """Fires or resolves each stall rule for one run at ``now``."""
        if clock.finished or clock.report_interval_seconds <= 0:
            return
        silent = now - clock.last_report_at
        frozen = now - clock.step_advanced_at
        for rule in self._stall_rules:
            spec = rule.stall
            assert spec is not None
            gaps = list(clock.gaps)[-spec.history:]
            window = spec.window(gaps)
            if silent > window:
                self._fire_stall(run_id, clock, rule, STALL_REASONS[1], silent, window, now,
                                 changes)
            elif len(gaps) >= spec.learn_after and frozen > window:
                self._fire_stall(run_id, clock, rule, STALL_REASONS[0], frozen, window, now,
                                 changes)
            else:
                self._resolve_stall(run_id, rule, now, changes)

    def _fire_stall(self, run_id: str, clock: RunClock, rule: Rule, reason: str,
                    value: float, window: float, now: float,
                    changes: list[AlertChange]) -> None:
        key = f"{rule.alert}/{_STALL}"
        state = self._states[run_id].setdefault(key, SeriesState())
        alert = self._active.get(state.alert_id) if state.alert_id else None
        if alert is not None:
            alert.value = value
            return
        state.episodes += 1
        alert = self._new_alert(run_id, rule, {}, "{}", state.episodes, value, window,
                                clock.last_step, now, reason=reason)
        state.alert_id = alert.alert_id
        self._active[alert.alert_id] = alert
        self._dirty_states.add((run_id, key))
        self._transition(alert, FIRING, now, changes, previous=UNSPECIFIED)

    def _resolve_stall(self, run_id: str, rule: Rule, now: float,
                       changes: list[AlertChange]) -> None:
        key = f"{rule.alert}/{_STALL}"
        state = self._states.get(run_id, {}).get(key)
        if state is None or state.alert_id is None:
            return
        alert = self._active.get(state.alert_id)
        state.alert_id = None
        self._dirty_states.add((run_id, key))
        if alert is not None:
            self._transition(alert, RESOLVED, now, changes)

    # -- alerts ------------------------------------------------------------------------

    def _new_alert(self, run_id: str, rule: Rule, labels: dict[str, str], labels_key: str,
                   episode: int, value: float, threshold: float, step: int,
                   now: float, reason: str = "") -> AlertRecord:
        alert = AlertRecord(
            alert_id=_alert_id(run_id, rule.alert, labels_key, episode), run_id=run_id,
            run_name=self._runs[run_id].run_name, rule=rule.alert, labels=dict(labels),
            state=UNSPECIFIED, severity=rule.severity, summary="", value=value,
            threshold=threshold, step=step, started_at=now)
        self._update_value(alert, rule, labels, value, threshold, step, reason)
        return alert

    def _update_value(self, alert: AlertRecord, rule: Rule, labels: dict[str, str],
                      value: float, threshold: float, step: int, reason: str = "") -> None:
        alert.value, alert.threshold, alert.step = value, threshold, step
        if rule.condition is None:
            fields: dict[str, Any] = {"reason": reason}
        else:
            fields = {key: labels.get(key, "") for key in CATALOG[rule.condition.metric].labels}
        alert.summary = rule.summary.format(
            run=alert.run_name, run_id=alert.run_id, alert=rule.alert, value=value,
            threshold=threshold, step=step, **fields)
        self._dirty_alerts[alert.alert_id] = alert

    def _transition(self, alert: AlertRecord, target: int, now: float,
                    changes: list[AlertChange], previous: int | None = None) -> None:
        before = alert.state if previous is None else previous
        alert.state = target
        if target == FIRING and not alert.fired_at:
            alert.fired_at = now  # an episode firing again keeps the time it first fired
        if target == RESOLVED:
            alert.resolved_at = now
            self._active.pop(alert.alert_id, None)
        self._dirty_alerts[alert.alert_id] = alert
        change = AlertChange(replace(alert, labels=dict(alert.labels)), before, now)
        changes.append(change)
        self._changes.append(change)

    # -- persistence -------------------------------------------------------------------

    def take_writes(self) -> EngineWrites:
        """Everything changed since the last call, to store with the batch that caused it."""
        writes = EngineWrites(
            rule_states=[(run_id, key, self._states[run_id][key].to_dict())
                         for run_id, key in sorted(self._dirty_states)],
            alerts=[replace(a, labels=dict(a.labels)) for a in self._dirty_alerts.values()],
            changes=self._changes,
        )
        self._dirty_states = set()
        self._dirty_alerts = {}
        self._changes = []
        return writes

    def discard_writes(self) -> None:
        self._dirty_states, self._dirty_alerts, self._changes = set(), {}, []

    def restore(self, rule_states: Iterable[tuple[str, str, dict[str, Any]]],
                open_alerts: Iterable[AlertRecord]) -> None:
        """Loads stored state (after :meth:`track_run` for each run)."""
        for run_id, key, data in rule_states:
            self._states.setdefault(run_id, {})[key] = SeriesState.from_dict(data)
        for alert in open_alerts:
            if alert.state in (PENDING, FIRING):
                self._active[alert.alert_id] = alert

    def forget_run(self, run_id: str) -> None:
        """Drops a run's in-memory state and clock (before reloading it from storage, or
        when another replica takes it over)."""
        self._runs.pop(run_id, None)
        self._states.pop(run_id, None)
        for alert_id in [a for a, alert in self._active.items() if alert.run_id == run_id]:
            del self._active[alert_id]

    def active_alerts(self) -> list[AlertRecord]:
        return list(self._active.values())

    def state(self, run_id: str, key: str) -> SeriesState | None:
        return self._states.get(run_id, {}).get(key)


def _end_episode(state: SeriesState) -> None:
    """The series has no open episode any more: a later firing starts a new one."""
    state.alert_id = None
    state.consecutive = 0
    state.hold_left = 0
    state.started_at = state.fired_at = 0.0


def _holds(condition: Condition, state: SeriesState, threshold: float) -> bool:
    if condition.relative_to is Relative.RUNNING_BEST:
        if state.best is None:
            return False
    elif condition.relative_to is not Relative.ABSOLUTE:
        if not state.baseline_ready:
            return False
        if condition.relative_to in RATIO_KINDS and (state.median or 0.0) <= 0:
            return False
    assert state.last_value is not None
    return condition.holds(state.last_value,
                           boundary(condition, threshold, state.median, state.mad, state.best))
