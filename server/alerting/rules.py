"""Alert rules: the YAML format, its validation, and the defaults shipped with the server.

A rule compares one catalogue metric, per series (per probe, per layer group...), with a
threshold that is either absolute or relative to a baseline learned per run after a
warm-up (a ratio of the baseline median, or a number of MADs from it). It fires after
``for`` consecutive evaluations and resolves only once the value has crossed a separate
``resolve_threshold`` (hysteresis), so a value hovering at the threshold does not flap.
After a firing alert resolves, its episode is held open until ``hold`` evaluations have
passed without the condition: a relapse within the hold (``for`` evaluations, as for a new
alert) fires the same alert (same id, same labels) again instead of opening a new episode,
so a series drifting about the threshold is one alert.

Format::

    defaults:                      # optional, applies to every rule
      baseline: {warmup: 3, window: 10, smoothing: 0.5}
    rules:
      - alert: RareSignalFisherCollapse
        metric: probe_fisher_mass_ratio
        op: "<"                    # < <= > >=
        threshold: 0.2
        relative_to: baseline_ratio  # absolute | baseline_ratio | baseline_mad |
                                     # trailing_ratio | running_best
        resolve_threshold: 0.3
        for: 3
        hold: 5                    # optional: evaluations without the condition after
                                   # which a resolved alert's episode ends (0: at once)
        median_over_steps: 0       # optional: compare the median of the series' values
                                   # of the last N steps (before the smoothing): one
                                   # outlying reading moves a median of 3 not at all
        smoothing: 1               # optional: EWMA weight of the newest value in the value
                                   # compared (1: the raw value)
        severity: critical         # critical | warning | info
        summary: "Probe {probe} ... {value:.3g} ..."
        while:                     # optional second condition on a metric of the same
          metric: probe_loss       # series labels, e.g. "loss not improving"
          op: ">="
          threshold: 0.95
          relative_to: baseline_ratio
          baseline: {warmup: 3}    # optional: the while metric's own baseline (default:
                                   # the rule's)
          for: 1                   # optional: the condition held on the while metric's
                                   # last N evaluations (a lasting change, not one reading)
        ignore_labels:             # optional: series with any of these label values are
          probe: [common]          # not evaluated (here: the common reference probe)
        gained: 0.5                # optional, running_best and trailing_ratio rules:
                                   # evaluate once the best lies this far past the first
                                   # value (default for running_best: the threshold)
        best_over_steps: 1000      # optional, running_best rules: compare with the best
                                   # of the last N steps (0: of the whole run); it stands
                                   # still while an alert is open
      - alert: RunStalled
        stall:                     # makes this the stall rule; every key is optional
          step_time_factor: 20     # stalled: the step is frozen, or nothing is heard, for
          step_time_quantile: 0.95 # longer than factor x this quantile of the run's recent
          floor_seconds: 300       # times between step advances, and at least the floor
          history: 64              # step advances the quantile is taken over
          learn_after: 8           # advances seen before a frozen step counts (until
                                   # then only silence does)
        severity: warning
        summary: "Run {run}: {reason} for {value:.0f} s"

The stall rule reads the run's clock, not a metric: the agent's reports and heartbeats
(which its sender thread sends while the process lives) tell the server that the run is
heard and at which step. Learning the window from the run's own pace keeps validation
passes, checkpoints and the monitor's own work quiet while a hung loop (heard, step
frozen) or a dead process (nothing heard) still fires; a run's next step resolves it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from raresignal.protos.catalog import CATALOG

SEVERITIES = ("critical", "warning", "info")
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


class RulesError(ValueError):
    """A rule file that cannot be used; the message names the file, rule and field."""


class Relative(str, Enum):
    ABSOLUTE = "absolute"
    BASELINE_RATIO = "baseline_ratio"  # boundary = threshold x baseline median
    BASELINE_MAD = "baseline_mad"  # boundary = median -/+ threshold x MAD
    # boundary = the best value seen since the warm-up +/- threshold, in the metric's own
    # units: the lowest for a rule on a rise (op > or >=), the highest for one on a fall.
    # A loss that must not climb back from where training brought it. Evaluated only once
    # the best lies at least threshold past the series' first value: a value
    # can only lose ground it gained (a skill not yet learned is not being lost).
    RUNNING_BEST = "running_best"
    # boundary = threshold x the median of the series' previous ``window`` values (after
    # the warm-up), a baseline that follows the run: a jump against the last few hundred
    # steps, where a frozen baseline would also count a slow schedule as a change.
    TRAILING_RATIO = "trailing_ratio"


@dataclass(frozen=True)
class BaselineSpec:
    """How a per-run baseline is learned: ``warmup`` evaluations are skipped, then the
    next ``window`` values (EWMA-smoothed with weight ``smoothing`` on the newest; 1 =
    raw) give the median and the MAD, frozen from then on."""

    warmup: int = 3
    window: int = 10
    smoothing: float = 1.0
    # The MAD used is at least this fraction of |median|, so a constant baseline does not
    # turn the smallest change into infinitely many MADs.
    mad_floor_fraction: float = 0.01


@dataclass(frozen=True)
class StallSpec:
    """When a run counts as stalled: its step frozen, or nothing heard from it, for longer
    than :meth:`window` seconds. The times between the step advances the server sees are
    a step time, or the report interval when steps are faster."""

    step_time_factor: float = 20.0
    step_time_quantile: float = 0.95
    # The least window, whatever the pace: validation passes and checkpoints of a fast run
    # last minutes while its steps take a fraction of a second.
    floor_seconds: float = 300.0
    history: int = 64
    # Until this many advances are seen (a new run, or after a server restart) the pace is
    # unknown, and only silence counts: a run's first step may compile for minutes.
    learn_after: int = 8

    def window(self, gaps: Sequence[float]) -> float:
        """Seconds of frozen step or silence that count as a stall, given recent gaps."""
        if not gaps:
            return self.floor_seconds
        ordered = sorted(gaps)
        pace = ordered[min(len(ordered) - 1, int(self.step_time_quantile * len(ordered)))]
        return max(self.floor_seconds, self.step_time_factor * pace)


@dataclass(frozen=True)
class Condition:
    metric: str
    op: str
    threshold: float
    relative_to: Relative = Relative.ABSOLUTE

    def holds(self, value: float, boundary: float) -> bool:
        return _OPS[self.op](value, boundary)

    @property
    def points_down(self) -> bool:
        """True when the condition is about a value falling (< or <=)."""
        return self.op in ("<", "<=")


@dataclass(frozen=True)
class Rule:
    alert: str
    severity: str
    summary: str
    condition: Condition | None = None  # None for the stall rule
    resolve_threshold: float = 0.0
    for_evaluations: int = 1
    baseline: BaselineSpec = BaselineSpec()
    while_condition: Condition | None = None
    stall: StallSpec | None = None  # set for the stall rule only
    # EWMA weight of the newest value in the value compared with the threshold (1: raw).
    # The baseline is learned with its own smoothing, from the raw values.
    smoothing: float = 1.0
    # The value smoothed is the median of the series' raw values of its last
    # ``median_over_steps`` steps (0: the newest value alone): a single outlying reading (a
    # catapult's spike, one unlucky probe subsample) does not move a median of three, a
    # lasting change moves it a reading or two later. A window in steps, not in readings,
    # keeps the rule's meaning whatever cadence the agent's budget gives the metric.
    median_over_steps: int = 0
    # (label, values) pairs: a series whose label takes one of the values is not evaluated.
    ignore_labels: tuple[tuple[str, frozenset[str]], ...] = ()
    # Evaluations without the condition after which a resolved alert's episode ends; until
    # then a relapse fires the same episode again. A few evaluations cover a value drifting
    # back and forth across the threshold without merging a later, separate incident.
    hold: int = 5
    # The ``while`` metric's baseline, when it differs from the rule's.
    while_baseline: BaselineSpec | None = None
    # The ``while`` condition counts once it held on this many of the while metric's
    # evaluations in a row (the latest included).
    while_for: int = 1
    # A running-best rule evaluates once its best lies this far past the first value
    # (None: its threshold).
    gained: float | None = None
    # A running-best rule compares with the best of its last ``best_over_steps`` steps (0:
    # of the whole run): a value that drifts slowly over thousands of steps is not lost.
    best_over_steps: int = 0

    def ignores(self, labels: Mapping[str, str]) -> bool:
        """Whether this rule leaves the series with these labels alone."""
        return any(labels.get(label) in values for label, values in self.ignore_labels)

    @property
    def is_stall(self) -> bool:
        return self.condition is None

    def boundary(self, threshold: float, median: float | None, mad: float | None,
                 best: float | None = None) -> float:
        """The value the metric is compared with, for a fire or a resolve threshold."""
        assert self.condition is not None
        return boundary(self.condition, threshold, median, mad, best)


def boundary(condition: Condition, threshold: float, median: float | None,
             mad: float | None, best: float | None = None) -> float:
    if condition.relative_to is Relative.ABSOLUTE:
        return threshold
    if condition.relative_to is Relative.RUNNING_BEST:
        assert best is not None
        return best - threshold if condition.points_down else best + threshold
    assert median is not None
    if condition.relative_to in RATIO_KINDS:
        return threshold * median
    assert mad is not None
    return median - threshold * mad if condition.points_down else median + threshold * mad


# Relative kinds whose boundary is a multiple of a median.
RATIO_KINDS = frozenset({Relative.BASELINE_RATIO, Relative.TRAILING_RATIO})

_RULE_KEYS = {"alert", "metric", "op", "threshold", "relative_to", "resolve_threshold", "for",
              "hold", "severity", "summary", "while", "baseline", "smoothing",
              "ignore_labels", "gained", "median_over_steps",
              "best_over_steps"}
_STALL_RULE_KEYS = {"alert", "stall", "severity", "summary"}
_STALL_KEYS = {"step_time_factor", "step_time_quantile", "floor_seconds", "history",
               "learn_after"}
# What a stall rule's summary may say as {reason}.
STALL_REASONS = ("its step stopped advancing", "nothing was heard from it")
_CONDITION_KEYS = {"metric", "op", "threshold", "relative_to"}
_WHILE_KEYS = _CONDITION_KEYS | {"baseline", "for"}
_BASELINE_KEYS = {"warmup", "window", "smoothing", "mad_floor_fraction"}


class _Where:
    """Builds error messages that say where in the file a problem is."""

    def __init__(self, source: str, place: str) -> None:
        self.source, self.place = source, place

    def error(self, message: str) -> RulesError:
        return RulesError(f"{self.source}: {self.place}: {message}")


def _number(where: _Where, field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise where.error(f"{field} must be a finite number, got {value!r}")
    return float(value)


def _integer(where: _Where, field: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise where.error(f"{field} must be an integer >= {minimum}, got {value!r}")
    return value


def _unknown_keys(where: _Where, entry: Mapping[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise where.error(f"unknown {what} key(s) {', '.join(map(repr, unknown))} "
                          f"(allowed: {', '.join(sorted(allowed))})")


def _condition(where: _Where, entry: Any, field: str,
               allowed: set[str] = _CONDITION_KEYS) -> Condition:
    if not isinstance(entry, Mapping):
        raise where.error(f"{field} must be a mapping")
    _unknown_keys(where, entry, allowed, field)
    metric = entry.get("metric")
    if metric not in CATALOG:
        raise where.error(f"{field}: unknown metric {metric!r} (not in the raresignal "
                          "catalogue)")
    op = entry.get("op")
    if op not in _OPS:
        raise where.error(f"{field}: unknown op {op!r} (use one of {', '.join(_OPS)})")
    if "threshold" not in entry:
        raise where.error(f"{field}: threshold is missing")
    threshold = _number(where, f"{field}.threshold", entry["threshold"])
    try:
        relative = Relative(entry.get("relative_to", "absolute"))
    except ValueError:
        raise where.error(f"{field}: unknown relative_to {entry.get('relative_to')!r} (use one "
                          f"of {', '.join(r.value for r in Relative)})") from None
    if relative is Relative.BASELINE_MAD and threshold < 0:
        raise where.error(f"{field}.threshold is a number of MADs and must be >= 0")
    if relative is Relative.RUNNING_BEST and threshold < 0:
        raise where.error(f"{field}.threshold is a distance from the best value and must "
                          "be >= 0")
    return Condition(metric, op, threshold, relative)


def _baseline(where: _Where, entry: Any, base: BaselineSpec) -> BaselineSpec:
    if entry is None:
        return base
    if not isinstance(entry, Mapping):
        raise where.error("baseline must be a mapping")
    _unknown_keys(where, entry, _BASELINE_KEYS, "baseline")
    smoothing = _number(where, "baseline.smoothing", entry.get("smoothing", base.smoothing))
    if not 0 < smoothing <= 1:
        raise where.error(f"baseline.smoothing must be in (0, 1], got {smoothing}")
    floor = _number(where, "baseline.mad_floor_fraction",
                    entry.get("mad_floor_fraction", base.mad_floor_fraction))
    if floor < 0:
        raise where.error("baseline.mad_floor_fraction must be >= 0")
    return BaselineSpec(
        warmup=_integer(where, "baseline.warmup", entry.get("warmup", base.warmup), 0),
        window=_integer(where, "baseline.window", entry.get("window", base.window), 1),
        smoothing=smoothing,
        mad_floor_fraction=floor,
    )


def _stall(where: _Where, entry: Any) -> StallSpec:
    if entry is None:
        return StallSpec()
    if not isinstance(entry, Mapping):
        raise where.error("stall must be a mapping")
    _unknown_keys(where, entry, _STALL_KEYS, "stall")
    base = StallSpec()
    factor = _number(where, "stall.step_time_factor",
                     entry.get("step_time_factor", base.step_time_factor))
    quantile = _number(where, "stall.step_time_quantile",
                       entry.get("step_time_quantile", base.step_time_quantile))
    floor = _number(where, "stall.floor_seconds", entry.get("floor_seconds", base.floor_seconds))
    if factor < 1:
        raise where.error(f"stall.step_time_factor must be >= 1, got {factor:g}")
    if not 0 < quantile <= 1:
        raise where.error(f"stall.step_time_quantile must be in (0, 1], got {quantile:g}")
    if floor <= 0:
        raise where.error(f"stall.floor_seconds must be > 0, got {floor:g}")
    history = _integer(where, "stall.history", entry.get("history", base.history), 1)
    learn_after = _integer(where, "stall.learn_after",
                           entry.get("learn_after", base.learn_after), 1)
    if learn_after > history:
        raise where.error(f"stall.learn_after ({learn_after}) must be at most stall.history "
                          f"({history})")
    return StallSpec(step_time_factor=factor, step_time_quantile=quantile,
                     floor_seconds=floor, history=history, learn_after=learn_after)


def _ignore_labels(where: _Where, entry: Any, metric: str
                   ) -> tuple[tuple[str, frozenset[str]], ...]:
    """``{label: value or [values]}``, on labels the rule's metric has."""
    if entry is None:
        return ()
    if not isinstance(entry, Mapping) or not entry:
        raise where.error("ignore_labels must be a mapping of label to value(s), e.g. "
                          "{probe: [common]}")
    known = CATALOG[metric].labels
    pairs = []
    for label, values in entry.items():
        if label not in known:
            raise where.error(f"ignore_labels: metric {metric!r} has no label {label!r} "
                              f"(its labels: {', '.join(known) or 'none'})")
        values = [values] if isinstance(values, str) else values
        if (not isinstance(values, list) or not values
                or not all(isinstance(v, str) for v in values)):
            raise where.error(f"ignore_labels.{label} must be a label value or a list of "
                              f"them, got {values!r}")
        pairs.append((str(label), frozenset(values)))
    return tuple(pairs)


def _check_resolve(where: _Where, condition: Condition, fire: float, resolve: float) -> None:
    """The resolve boundary must lie on the healthy side of the fire boundary (or equal it),
    so an alert resolves only once the value has moved back past the fire boundary."""
    if condition.relative_to in (Relative.BASELINE_MAD, Relative.RUNNING_BEST):
        # Both thresholds count away from the reference, towards the unhealthy side.
        if resolve > fire:
            raise where.error(f"resolve_threshold {resolve:g} must be at most threshold "
                              f"{fire:g} MADs (hysteresis)")
        return
    # Absolute and ratio boundaries grow with the threshold.
    if condition.points_down and resolve < fire:
        raise where.error(f"resolve_threshold {resolve:g} must be at least threshold {fire:g} "
                          f"for op {condition.op!r} (hysteresis)")
    if not condition.points_down and resolve > fire:
        raise where.error(f"resolve_threshold {resolve:g} must be at most threshold {fire:g} "
                          f"for op {condition.op!r} (hysteresis)")


def _check_summary(where: _Where, summary: str, metric: str | None) -> None:
    fields: dict[str, Any] = {"run": "r", "run_id": "id", "value": 1.0, "threshold": 1.0,
                              "step": 1, "alert": "a"}
    if metric is None:
        fields["reason"] = STALL_REASONS[0]
    else:
        fields.update({key: "x" for key in CATALOG[metric].labels})
    try:
        summary.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise where.error(f"summary {summary!r} cannot be formatted ({exc!r}); it may use "
                          f"{{{'}, {'.join(sorted(fields))}}}") from None


def _rule(source: str, index: int, entry: Any, base: BaselineSpec) -> Rule:
    where = _Where(source, f"rules[{index}]")
    if not isinstance(entry, Mapping):
        raise where.error("each rule must be a mapping")
    name = entry.get("alert")
    if not isinstance(name, str) or not name.isidentifier():
        raise where.error(f"alert must be a name like RareSignalAbsorbed, got {name!r}")
    where = _Where(source, f"rules[{index}] ({name})")
    severity = entry.get("severity", "warning")
    if severity not in SEVERITIES:
        raise where.error(f"unknown severity {severity!r} (use one of {', '.join(SEVERITIES)})")
    if "stalled_for_intervals" in entry:
        raise where.error("a stall rule's window follows the run's step times: write "
                          f"`stall:` with any of {', '.join(sorted(_STALL_KEYS))} instead of "
                          "stalled_for_intervals")
    if "stall" in entry:
        _unknown_keys(where, entry, _STALL_RULE_KEYS, "stall rule")
        summary = entry.get("summary", "Run {run}: {reason} for {value:.0f} s")
        if not isinstance(summary, str):
            raise where.error("summary must be text")
        _check_summary(where, summary, None)
        return Rule(alert=name, severity=severity, summary=summary,
                    stall=_stall(where, entry["stall"]))
    _unknown_keys(where, entry, _RULE_KEYS, "rule")
    condition = _condition(where, {k: entry[k] for k in _CONDITION_KEYS if k in entry}, "rule")
    resolve = _number(where, "resolve_threshold",
                      entry.get("resolve_threshold", condition.threshold))
    _check_resolve(where, condition, condition.threshold, resolve)
    while_condition, while_baseline, while_for = None, None, 1
    rule_baseline = _baseline(where, entry.get("baseline"), base)
    if "while" in entry:
        while_condition = _condition(where, entry["while"], "while", _WHILE_KEYS)
        if "baseline" in entry["while"]:
            while_baseline = _baseline(where, entry["while"]["baseline"], rule_baseline)
        while_for = _integer(where, "while.for", entry["while"].get("for", 1), 1)
        missing = set(CATALOG[while_condition.metric].labels) - set(
            CATALOG[condition.metric].labels)
        if missing:
            raise where.error(f"while: metric {while_condition.metric!r} has label(s) "
                              f"{sorted(missing)} that {condition.metric!r} lacks, so the "
                              "two series cannot be matched")
    smoothing = _number(where, "smoothing", entry.get("smoothing", 1.0))
    if not 0 < smoothing <= 1:
        raise where.error(f"smoothing must be in (0, 1], got {smoothing}")
    summary = entry.get("summary", f"{name}: {condition.metric} is {{value:.4g}}")
    if not isinstance(summary, str):
        raise where.error("summary must be text")
    _check_summary(where, summary, condition.metric)
    gained = None
    if "gained" in entry:
        if condition.relative_to not in (Relative.RUNNING_BEST, Relative.TRAILING_RATIO):
            raise where.error("gained applies to a rule relative_to: running_best or "
                              "trailing_ratio only")
        gained = _number(where, "gained", entry["gained"])
        if gained < 0:
            raise where.error(f"gained must be >= 0, got {gained:g}")
    best_over_steps = 0
    if "best_over_steps" in entry:
        if condition.relative_to is not Relative.RUNNING_BEST:
            raise where.error("best_over_steps applies to a rule relative_to: running_best "
                              "only")
        best_over_steps = _integer(where, "best_over_steps", entry["best_over_steps"], 1)
    return Rule(
        alert=name,
        severity=severity,
        summary=summary,
        condition=condition,
        resolve_threshold=resolve,
        for_evaluations=_integer(where, "for", entry.get("for", 1), 1),
        hold=_integer(where, "hold", entry.get("hold", Rule.hold), 0),
        baseline=rule_baseline,
        while_condition=while_condition,
        while_baseline=while_baseline,
        while_for=while_for,
        gained=gained,
        smoothing=smoothing,
        median_over_steps=_integer(where, "median_over_steps",
                                   entry.get("median_over_steps", 0), 0),
        best_over_steps=best_over_steps,
        ignore_labels=_ignore_labels(where, entry.get("ignore_labels"), condition.metric),
    )


def parse_rules(text: str, source: str = "<rules>") -> list[Rule]:
    """Rules from YAML text; RulesError says what is wrong and where."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RulesError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(document, Mapping) or not isinstance(document.get("rules"), list):
        raise RulesError(f"{source}: expected a mapping with a 'rules' list")
    unknown = sorted(set(document) - {"rules", "defaults"})
    if unknown:
        raise RulesError(f"{source}: unknown top-level key(s) {unknown} (allowed: defaults, "
                         "rules)")
    defaults = document.get("defaults") or {}
    if not isinstance(defaults, Mapping) or set(defaults) - {"baseline"}:
        raise RulesError(f"{source}: defaults may only hold 'baseline'")
    base = _baseline(_Where(source, "defaults"), defaults.get("baseline"), BaselineSpec())
    rules = [_rule(source, i, entry, base) for i, entry in enumerate(document["rules"])]
    seen: set[str] = set()
    for rule in rules:
        if rule.alert in seen:
            raise RulesError(f"{source}: alert {rule.alert!r} is defined twice")
        seen.add(rule.alert)
    return rules


DEFAULT_RULES_FILE = "default_rules.yaml"


def default_rules_text() -> str:
    """The text of the rules file shipped with the server (comments included)."""
    return resources.files(__package__).joinpath(DEFAULT_RULES_FILE).read_text()


def load_rules(path: str | Path | None = None) -> list[Rule]:
    """Rules from a file, or the defaults shipped with the server when ``path`` is None."""
    if path is None:
        return parse_rules(default_rules_text(), DEFAULT_RULES_FILE)
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RulesError(f"{path}: cannot read rules file: {exc.strerror}") from None
    return parse_rules(text, str(path))
