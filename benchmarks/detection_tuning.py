"""Threshold choice on the tuning families, and leave-one-family-out.

The rare-signal rules (those reading a probe's signal) are tuned, each on its own: every
threshold of a grid is scored on the tuning runs with :func:`detection_scoring.merit`: a
threshold with a false alarm never beats one without; among quiet ones the most early
detections win, then detections, then median lead time; ties go to the less sensitive
threshold. A threshold is
taken only with a notch of margin: the next more sensitive one must be quiet too.
Grids run from least to most sensitive. A rule's grid pairs each threshold with a `for`
(evaluations in a row) from its shipped value down to 1 and an evaluation smoothing from
its shipped value down to 0.3. The chosen settings are then reported on the held-out
families, whose runs the choice never saw: a family of another kind, not a new seed of a
family it tuned on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import yaml
from detection_detectors import Alarm, is_rare_signal, raresignal_alarms
from detection_scoring import Outcome, merit, score
from detection_traces import RunTrace

from raresignal.server.alerting.rules import RATIO_KINDS, Relative, Rule

# Fire thresholds tried per rule, least sensitive first; resolve thresholds keep the
# shipped fire/resolve proportion, so hysteresis keeps its direction. A rule relative to
# its baseline gets the grid of its kind (the shipped file may change a rule's kind);
# an absolute rule gets the grid of its metric.
RATIO_GRID = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)  # fraction of the baseline, for "<" rules
RISE_RATIO_GRID = (20.0, 10.0, 5.0, 3.0, 2.0, 1.5)  # multiple of the baseline, for ">" rules
FOR_GRID = (3, 2, 1)  # evaluations in a row, tried below a rule's shipped `for`
SMOOTHING_GRID = (0.5, 0.3)  # EWMA weight of the newest value, tried below the shipped one
MAD_GRID = (30.0, 20.0, 10.0, 5.0, 3.0)  # MADs from the baseline
ABSOLUTE_GRIDS: dict[str, tuple[float, ...]] = {
    "probe_bulk_residual": (0.02, 0.05, 0.1, 0.2, 0.3, 0.5),
    "probe_retention": (0.05, 0.1, 0.2, 0.3, 0.5, 0.7),
    "probe_interference": (-0.6, -0.4, -0.2, -0.1, -0.05),
    "sharpness_ratio": (3.0, 2.0, 1.5, 1.1, 1.0),
    # Nats above the running best (RareProbeLossRise).
    "probe_loss": (1.0, 0.7, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1),
}


def grid_for(rule: Rule) -> tuple[float, ...] | None:
    """The thresholds to try for ``rule``; None for a rule the tuning leaves alone."""
    condition = rule.condition
    if condition is None or rule.alert == "NonFiniteGradients":
        return None
    if condition.relative_to is Relative.BASELINE_MAD:
        return MAD_GRID
    if condition.relative_to in RATIO_KINDS:
        return RATIO_GRID if condition.points_down else RISE_RATIO_GRID
    return ABSOLUTE_GRIDS.get(condition.metric)


DetectFn = Callable[[RunTrace], list[Alarm]]
# One rule's alarms per trace, kept across folds: a leave-one-family-out report tunes on
# each family many times over, and a rule's alarms on a run do not depend on the fold.
# Keyed by the trace's identity, so a cache must not outlive the traces it was filled on.
AlarmCache = dict[tuple[Rule, int], list[Alarm]]


def for_grid(rule: Rule) -> tuple[int, ...]:
    """`for` values to try: the shipped one, then every FOR_GRID value (longest first).
    The grid does not depend on the shipped value, so tuning the tuned rules again
    chooses them again."""
    return tuple(dict.fromkeys((rule.for_evaluations, *FOR_GRID)))


def smoothing_grid(rule: Rule) -> tuple[float, ...]:
    """Evaluation smoothings to try: the shipped one, then none (1), then every
    SMOOTHING_GRID value (lightest first)."""
    return tuple(dict.fromkeys((rule.smoothing, 1.0, *SMOOTHING_GRID)))


def settings_grid(rule: Rule) -> tuple[tuple[int, float], ...]:
    """(`for`, smoothing) pairs to try; both grids lead with the shipped value, so the
    shipped pair comes first."""
    return tuple((n, a) for a in smoothing_grid(rule) for n in for_grid(rule))


def with_threshold(rule: Rule, threshold: float, for_evaluations: int | None = None,
                   smoothing: float | None = None) -> Rule:
    """The rule with a new fire threshold (and resolve threshold in the same proportion)
    and, if given, a new `for` and evaluation smoothing."""
    assert rule.condition is not None
    shipped = rule.condition.threshold
    ratio = rule.resolve_threshold / shipped if shipped else 1.0
    return replace(rule, condition=replace(rule.condition, threshold=threshold),
                   resolve_threshold=threshold * ratio,
                   for_evaluations=for_evaluations or rule.for_evaluations,
                   smoothing=smoothing or rule.smoothing)


def evaluate(traces: Sequence[RunTrace], name: str, detect: DetectFn) -> list[Outcome]:
    return [score(trace, name, detect(trace)) for trace in traces]


@dataclass(frozen=True)
class Choice:
    """The threshold picked for one detector or rule, and how it did on the tuning runs."""

    name: str
    value: float | None  # None: no threshold of the grid was free of false alarms
    quiet: bool
    tried: tuple[tuple[float, tuple[float, ...]], ...]  # (threshold, merit) per grid point
    for_evaluations: int | None = None  # a rule's chosen `for`
    smoothing: float | None = None  # a rule's chosen evaluation smoothing


def choose(name: str, grid: Sequence[float], traces: Sequence[RunTrace],
           detector_for: Callable[[float], DetectFn]) -> Choice:
    """The best grid point by merit, with a notch of margin: a point counts only if the
    next more sensitive one was quiet too (the tuning runs are few, and the most
    sensitive quiet point is quiet by luck as often as by design). With no such point,
    every point counts."""
    scored = [(value, merit(evaluate(traces, name, detector_for(value)))) for value in grid]
    quiet_at = [m[0] == 0 for _, m in scored]
    eligible = [i for i in range(len(scored) - 1) if quiet_at[i] and quiet_at[i + 1]]
    best_value, best_merit = None, None
    for index in eligible or range(len(scored)):
        value, value_merit = scored[index]
        if best_merit is None or value_merit > best_merit:
            best_value, best_merit = value, value_merit
    assert best_merit is not None
    quiet = best_merit[0] == 0
    return Choice(name, best_value if quiet else None, quiet, tuple(scored))


def choose_rule(rule: Rule, grid: Sequence[float], traces: Sequence[RunTrace],
                cache: AlarmCache | None = None) -> Choice:
    """Threshold, `for` and smoothing of one rule: per (`for`, smoothing) pair the best
    threshold as :func:`choose` picks it, its margin checked at that same pair; then the
    pair whose pick did best (ties to the earlier pair: the shipped one first). With no
    quiet pick at all, the shipped pair's choice, which shows its false alarms."""
    choices = [replace(choose(rule.alert, grid, traces, _detector_at(rule, n, a, cache)),
                       for_evaluations=n, smoothing=a) for n, a in settings_grid(rule)]
    quiet = [c for c in choices if c.value is not None]
    if not quiet:
        return choices[0]
    return max(quiet, key=lambda c: dict(c.tried)[c.value])


def _detector_at(rule: Rule, for_evaluations: int, smoothing: float,
                 cache: AlarmCache | None = None) -> Callable[[float], DetectFn]:
    return lambda value: rule_detector(with_threshold(rule, value, for_evaluations,
                                                      smoothing), cache)


def rule_detector(rule: Rule, cache: AlarmCache | None = None) -> DetectFn:
    """One rule's alarms, looked up in ``cache`` when given one."""
    if cache is None:
        return rules_detector([rule])

    def detect(trace: RunTrace) -> list[Alarm]:
        key = (rule, id(trace))
        if key not in cache:
            cache[key] = raresignal_alarms(trace, [rule])
        return cache[key]
    return detect


def rules_detector(rules: Sequence[Rule]) -> DetectFn:
    return lambda trace: raresignal_alarms(trace, rules)


def tune_rules(rules: Sequence[Rule], traces: Sequence[RunTrace],
               cache: AlarmCache | None = None) -> dict[str, Choice]:
    """Each tunable rare-signal rule on its own, on the tuning runs (``cache``: see
    :data:`AlarmCache`)."""
    choices: dict[str, Choice] = {}
    for rule in rules:
        grid = grid_for(rule) if is_rare_signal(rule) else None
        if grid is None:
            continue
        choices[rule.alert] = choose_rule(rule, grid, traces, cache)
    return choices


def tuned_rules(rules: Sequence[Rule], choices: dict[str, Choice]) -> list[Rule]:
    """The rule set with every tuned threshold applied; a rule with no quiet threshold on
    the tuning runs is left out (it could only add false alarms)."""
    out: list[Rule] = []
    for rule in rules:
        choice = choices.get(rule.alert)
        if choice is None:
            out.append(rule)
        elif choice.value is not None:
            out.append(with_threshold(rule, choice.value, choice.for_evaluations,
                                      choice.smoothing))
    return out


def candidate_rules_yaml(shipped_text: str, choices: dict[str, Choice]) -> str:
    """The shipped rules file with the tuned thresholds written in, as a candidate for
    ``--rules`` and for review. A rule with no quiet threshold keeps its shipped values
    and is named in the header, since dropping a rule is a decision, not a measurement."""
    document = yaml.safe_load(shipped_text)
    unquiet = []
    for entry in document["rules"]:
        choice = choices.get(entry.get("alert"))
        if choice is None:
            continue
        if choice.value is None:
            unquiet.append(entry["alert"])
            continue
        shipped = float(entry["threshold"])
        resolve = float(entry.get("resolve_threshold", shipped))
        entry["threshold"] = choice.value
        entry["resolve_threshold"] = round(choice.value * (resolve / shipped if shipped
                                                           else 1.0), 6)
        if choice.for_evaluations is not None:
            entry["for"] = choice.for_evaluations
        if choice.smoothing is not None and choice.smoothing < 1.0:
            entry["smoothing"] = choice.smoothing
        elif choice.smoothing is not None:
            entry.pop("smoothing", None)  # the raw value: a shipped smoothing is dropped
    header = ("# Candidate rules chosen by benchmarks/detection.py on its tuning "
              "families.\n"
              + (f"# No quiet threshold in the grid for: {', '.join(unquiet)}.\n"
                 if unquiet else ""))
    return header + yaml.safe_dump(document, sort_keys=False, width=100)


@dataclass(frozen=True)
class Fold:
    """One split of the families: tune on ``tuning``, report on ``held_out``."""

    tuning: tuple[str, ...]
    held_out: tuple[str, ...]


def folds(families: Sequence[str], tune_families: Sequence[str] | None) -> list[Fold]:
    """The given split, or (by default) every family held out in turn and tuned on the
    others. A fold never holds out a family it tunes on. Runs of a single family make one
    fold with nothing to tune on: the shipped rules are still scored on them."""
    names = tuple(dict.fromkeys(families))
    if tune_families:
        tuning = tuple(dict.fromkeys(tune_families))
        held_out = tuple(f for f in names if f not in tuning)
        if not held_out:
            raise ValueError("every family is tuned on: none is left to report on")
        return [Fold(tuning, held_out)]
    if len(names) < 2:
        return [Fold((), names)]
    return [Fold(tuple(f for f in names if f != held), (held,)) for held in names]
