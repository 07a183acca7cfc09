"""Scores recorded runs and writes the report: per family and scenario, held out.

Detectors: the shipped rare-signal rules (those reading a probe's signal), the same rules
tuned leave-one-family-out (tuned on the other families, reported on this one), every
shipped rule (sharpness and drift too, for context), and the labelled probe-loss alarm as
the reference. Targets, on held-out families: zero rare-signal alerts on at least
``MIN_CONTROL_RUNS`` control runs; at least ``MIN_EARLY_SHARE`` of collapses alerted
before the ground truth; a median lead at least ``LEAD_FACTOR`` x the probe-loss alarm's
in the same runs.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from detection_detectors import Alarm, is_rare_signal, probe_loss_alarms, raresignal_alarms
from detection_scoring import Outcome, Summary, score, summarize
from detection_traces import RunTrace
from detection_tuning import AlarmCache, Fold, tune_rules, tuned_rules

from raresignal.server.alerting.rules import Rule

SHIPPED = "rare-signal rules, shipped"
TUNED = "rare-signal rules, tuned on other families"
ALL_SHIPPED = "all shipped rules"
PROBE_LOSS = "probe-loss alarm (labelled, +0.5 nats)"
MIN_CONTROL_RUNS = 40
MIN_EARLY_SHARE = 0.9
LEAD_FACTOR = 2.0

Detect = Callable[[RunTrace], list[Alarm]]


def _outcomes(traces: Sequence[RunTrace], detector: str, detect: Detect) -> list[Outcome]:
    return [score(trace, detector, detect(trace)) for trace in traces]


def score_fold(traces: Sequence[RunTrace], rules: Sequence[Rule], fold: Fold,
               cache: AlarmCache | None = None) -> tuple[list[Outcome], dict[str, Any]]:
    """Tunes the rare-signal rules on the fold's tuning families only, then scores every
    detector on its held-out families (a fold with no tuning family scores the shipped
    rules and the reference alone)."""
    rare = [r for r in rules if is_rare_signal(r)]
    tuning = [t for t in traces if t.plan.family in fold.tuning]
    held_out = [t for t in traces if t.plan.family in fold.held_out]
    choices = tune_rules(rare, tuning, cache) if tuning else {}
    detectors: dict[str, Detect] = {
        SHIPPED: lambda t: raresignal_alarms(t, rare),
        TUNED: lambda t: raresignal_alarms(t, tuned_rules(rare, choices)),
        ALL_SHIPPED: lambda t: raresignal_alarms(t, rules),
        PROBE_LOSS: probe_loss_alarms,
    }
    if not tuning:
        del detectors[TUNED]
    outcomes = [o for name, detect in detectors.items()
                for o in _outcomes(held_out, name, detect)]
    return outcomes, {"tuning": list(fold.tuning), "held_out": list(fold.held_out),
                      "choices": {k: asdict(v) for k, v in choices.items()}}


def run_report(traces: Sequence[RunTrace], rules: Sequence[Rule], fold_list: Sequence[Fold]
               ) -> dict[str, Any]:
    outcomes: list[Outcome] = []
    folds_out = []
    cache: AlarmCache = {}  # the folds share one: each run is replayed once per setting
    for fold in fold_list:
        fold_outcomes, fold_info = score_fold(traces, rules, fold, cache)
        outcomes.extend(fold_outcomes)
        folds_out.append(fold_info)
    return {"outcomes": outcomes, "folds": folds_out}


def _lead(value: float | None) -> str:
    return "-" if value is None else f"{value:+.0f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:+.0%}"


def _rate(summary: Summary) -> str:
    rate = summary.false_alarms_per_unit
    return "-" if rate is None else f"{rate:.1f}"


def format_table(outcomes: Sequence[Outcome]) -> str:
    """Family/scenario x detector: early/detected/collapsed, no-collapse runs, median
    lead (steps and share of the collapse), false-alarm runs and rate."""
    detectors = list(dict.fromkeys(o.detector for o in outcomes))
    groups = list(dict.fromkeys((o.family, o.scenario) for o in outcomes))
    width = max(len(d) for d in detectors)
    header = (f"{'family/scenario':40} {'detector':{width}}  early/det/coll  no-coll  "
              f"lead  lead%  FA runs  FA/10k")
    lines = [header, "-" * len(header)]
    totals = [("all", "collapses", True), ("all", "controls", False)]
    for family, scenario in [*groups, *[(f, s) for f, s, _ in totals]]:
        kind = {s: c for _, s, c in totals}.get(scenario) if family == "all" else None
        for detector in detectors:
            group = [o for o in outcomes if o.detector == detector and (
                (o.family, o.scenario) == (family, scenario) if kind is None
                else o.collapse == kind)]
            if not group:
                continue
            s = summarize(group)
            counts = (f"{s.early}/{s.detected}/{s.scorable}" if group[0].collapse else "-")
            lines.append(f"{family + '/' + scenario:40} {detector:{width}}  {counts:>14}  "
                         f"{s.no_collapse:>7}  {_lead(s.median_lead):>4}  "
                         f"{_share(s.median_lead_share):>5}  "
                         f"{s.false_alarm_runs:>3}/{s.runs:<3}  {_rate(s):>6}")
        lines.append("")
    return "\n".join(lines)


def false_alarm_sources(outcomes: Sequence[Outcome], traces: Sequence[RunTrace],
                        rules: Sequence[Rule]) -> dict[str, dict[str, int]]:
    """Per control scenario, which shipped rules fired (runs per rule)."""
    by_name = {t.name: t for t in traces}
    counts: dict[str, dict[str, int]] = {}
    for o in outcomes:
        if o.detector != ALL_SHIPPED or o.collapse:
            continue
        fired = {a.source for a in raresignal_alarms(by_name[o.run], rules)}
        for rule in fired:
            scenario = counts.setdefault(o.scenario, {})
            scenario[rule] = scenario.get(rule, 0) + 1
    return counts


def paired_leads(outcomes: Sequence[Outcome], detector: str, reference: str
                 ) -> tuple[float | None, float | None, int]:
    """Median leads of ``detector`` and ``reference`` over the runs both detected."""
    def leads(name: str) -> dict[str, int]:
        return {o.run: o.lead for o in outcomes
                if o.detector == name and o.detected and o.lead is not None}

    mine, theirs = leads(detector), leads(reference)
    both = sorted(set(mine) & set(theirs))
    if not both:
        return None, None, 0
    return (statistics.median(mine[r] for r in both),
            statistics.median(theirs[r] for r in both), len(both))


def verdicts(outcomes: Sequence[Outcome], detector: str) -> list[str]:
    """The targets on held-out families, each met or missed with its figure."""
    controls = summarize([o for o in outcomes if o.detector == detector and not o.collapse])
    quiet = controls.runs >= MIN_CONTROL_RUNS and controls.false_alarm_runs == 0
    collapses = summarize([o for o in outcomes if o.detector == detector and o.collapse])
    share = collapses.early / collapses.scorable if collapses.scorable else 0.0
    mine, reference, paired = paired_leads(outcomes, detector, PROBE_LOSS)
    leads = (mine is not None and reference is not None and mine > 0
             and mine >= LEAD_FACTOR * max(reference, 0.0))
    mark = {True: "met", False: "MISSED"}
    return [
        f"  [{mark[quiet]}] rare-signal alerts on controls: {controls.false_alarm_runs} of "
        f"{controls.runs} runs (target: 0 of at least {MIN_CONTROL_RUNS})",
        f"  [{mark[share >= MIN_EARLY_SHARE]}] collapses alerted before the ground truth: "
        f"{collapses.early}/{collapses.scorable} ({share:.0%}; target "
        f"{MIN_EARLY_SHARE:.0%}); {collapses.no_collapse} collapse runs did not collapse",
        f"  [{mark[leads]}] median lead {_lead(mine)} steps against the probe-loss alarm's "
        f"{_lead(reference)} in the {paired} runs both detected (target: "
        f"{LEAD_FACTOR:g}x, and positive)",
    ]
