"""Detection quality: does raresignal warn of a collapsing rare signal early, without
crying wolf, and better than the alarms users already have?

Every run trains a small model on CPU with the real agent (``raresignal.agent.Monitor``
and its default estimators, at fixed cadences), and from a switch step ramps in one change
(over --ramp-steps; 0 applies it at once):

  collapse   drop_rare            the rare slice leaves the data mix
             lr_spike             the learning rate jumps past stability
             weight_decay_jump    weight decay jumps (over-regularisation)
             finetune_other_task  training moves to a task without the rare rule
  healthy    continued            nothing changes
             lr_decay             the learning rate decays to 0.3x
             reshuffle            a new data order and more of the rare slice

on two task families: ``token_rule`` (a rare compositional rule in a token task, learned
by a two-block transformer) and ``minority_class`` (a 3 % minority class of a Gaussian
mixture, learned by an MLP).

Ground truth is the first step at which the rare probe's accuracy, evaluated exactly every
few steps by the benchmark, falls below half its peak. The agent's measurements are fed to
the server's own alert engine (``raresignal.server.alerting.engine.AlertEngine``) with the shipped
rules (or --rules FILE), and compared with three alarms users have today: training loss
rising (EWMA above k x its running minimum), gradient-norm spikes (above median + k MAD),
and the rare probe's own loss rising (which needs a labelled rare eval set). Alarms on
healthy runs, or before the switch of a collapse run, are false alarms.

Thresholds of every detector are chosen on the tuning seeds (zero false alarms first, then
early detections, then lead time) and reported on the held-out seeds. The report ends with
the thresholds the evidence supports for server/alerting/default_rules.yaml.

Examples::

    python benchmarks/detection.py --quick                  # 2 seeds, about 10 minutes
    python benchmarks/detection.py --seeds 0 1 2 3 --json detection.json   # about 40 min
    python benchmarks/detection.py --seeds 0 --families token_rule --save-traces t0.json
    python benchmarks/detection.py --load-traces all.json --tuning-seeds 8  # re-score
    python benchmarks/detection.py --rules my-rules.yaml    # score a candidate rule file

A token-rule run takes about a minute on one core, a minority-class run about 20 s.
Runs recorded with --save-traces (one process per family and seed parallelises well)
and merged into one JSON list re-score in a minute or two with --load-traces.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from detection_detectors import raresignal_alarms
from detection_runs import RunPlan, RunTrace, train_run
from detection_scenarios import SCENARIOS, SCENARIOS_BY_NAME
from detection_scoring import Outcome, Summary, ground_truth_step, summarize
from detection_tasks import FAMILIES
from detection_tuning import (
    BASELINE_GRIDS,
    Choice,
    baseline_detector,
    baseline_value,
    candidate_rules_yaml,
    evaluate,
    rules_detector,
    tune_baselines,
    tune_rules,
    tuned_rules,
)

from raresignal.server.alerting.rules import Rule, default_rules_text, load_rules

SHIPPED = "raresignal (shipped rules)"
TUNED = "raresignal (tuned rules)"
BASELINE_LABELS = {"loss_rise": "loss rise", "grad_norm_spike": "grad-norm spike",
                   "probe_loss_rise": "probe-loss rise"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/detection.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="seeds 0 (tuning) and 1 (held out) only: the whole story in a "
                             "few minutes")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="seeds to run for every family x scenario (default 0 1 2 3)")
    parser.add_argument("--tuning-seeds", type=int, default=None, metavar="N",
                        help="how many of the seeds (the first N) choose thresholds; the "
                             "rest are held out (default: half, at least one held out)")
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES),
                        default=sorted(FAMILIES), help="task families to run")
    parser.add_argument("--scenarios", nargs="+", choices=[s.name for s in SCENARIOS],
                        default=[s.name for s in SCENARIOS], help="scenarios to run")
    parser.add_argument("--steps", type=int, default=RunPlan.steps,
                        help="optimizer steps per run (default %(default)s)")
    parser.add_argument("--switch-step", type=int, default=RunPlan.switch_step,
                        help="step at which the scenario's change lands (default "
                             "%(default)s; the rare rule must be learned by then)")
    parser.add_argument("--ramp-steps", type=int, default=RunPlan.ramp_steps,
                        help="steps over which the change ramps in (default %(default)s; "
                             "0 applies it all at once, the harshest case)")
    parser.add_argument("--rules", type=Path, default=None,
                        help="a candidate rules file to score instead of the shipped "
                             "server/alerting/default_rules.yaml")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="write every figure, ground truth and choice to PATH")
    parser.add_argument("--write-rules", type=Path, default=None, metavar="PATH",
                        help="write the shipped rules with the tuned thresholds to PATH "
                             "(a candidate to review and to score with --rules)")
    parser.add_argument("--save-traces", type=Path, default=None, metavar="PATH",
                        help="write the recorded runs to PATH, to re-score them later")
    parser.add_argument("--load-traces", type=Path, default=None, metavar="PATH",
                        help="score runs recorded with --save-traces instead of training")
    return parser


def collect_traces(families: Sequence[str], scenarios: Sequence[str], seeds: Sequence[int],
                   plan: RunPlan) -> list[RunTrace]:
    """Trains every family x scenario x seed, one after the other, reporting as it goes."""
    traces: list[RunTrace] = []
    total = len(families) * len(scenarios) * len(seeds)
    for family_name in families:
        family = FAMILIES[family_name]()
        for scenario_name in scenarios:
            for seed in seeds:
                trace = train_run(family, SCENARIOS_BY_NAME[scenario_name], seed, plan)
                traces.append(trace)
                truth = ground_truth_step(trace.eval_steps, trace.rare_accuracy)
                peak = max((a for s, a in zip(trace.eval_steps, trace.rare_accuracy,
                                              strict=True) if s < trace.switch_step),
                           default=0.0)
                print(f"[{len(traces)}/{total}] {trace.name}: {trace.seconds:.1f} s, rare "
                      f"accuracy peak before switch {peak:.2f}, ground truth "
                      f"{truth if truth is not None else '-'}", flush=True)
    return traces


def score_all(traces: Sequence[RunTrace], detectors: dict[str, Any]) -> list[Outcome]:
    return [o for name, detect in detectors.items() for o in evaluate(traces, name, detect)]


def _lead(summary: Summary) -> str:
    return "-" if summary.median_lead is None else f"{summary.median_lead:+.0f}"


def format_table(outcomes: Sequence[Outcome], detectors: Sequence[str]) -> str:
    """Scenario x detector: detected/collapsed, early, median lead; healthy: false alarms."""
    scenarios = list(dict.fromkeys((o.family, o.scenario, o.collapse) for o in outcomes))
    width = max(len(d) for d in detectors)
    header = (f"{'family/scenario':34} {'detector':{width}}  detected  early  "
              f"median lead  false-alarm runs")
    lines = [header, "-" * len(header)]
    for family, scenario, collapse in [*scenarios, ("all", "collapse", True),
                                       ("all", "healthy", False)]:
        for detector in detectors:
            group = [o for o in outcomes if o.detector == detector and o.collapse == collapse
                     and (family == "all" or (o.family, o.scenario) == (family, scenario))]
            if not group:
                continue
            s = summarize(group)
            detected = f"{s.detected}/{s.scorable}" if collapse else "-"
            early = f"{s.early}/{s.scorable}" if collapse else "-"
            lines.append(f"{family + '/' + scenario:34} {detector:{width}}  {detected:>8}  "
                         f"{early:>5}  {_lead(s) if collapse else '-':>11}  "
                         f"{s.false_alarm_runs}/{s.runs}")
        lines.append("")
    return "\n".join(lines)


def _rule_threshold(rule: Rule) -> float:
    assert rule.condition is not None
    return rule.condition.threshold


def format_evidence(shipped: Sequence[Rule], choices: dict[str, Choice]) -> str:
    lines = ["Thresholds the tuning runs support for server/alerting/default_rules.yaml "
             "(per rule, alone):"]
    by_name = {rule.alert: rule for rule in shipped}
    for name, choice in choices.items():
        rule = by_name[name]
        assert rule.condition is not None
        tried = ", ".join(f"{value:g}:{'quiet' if m[0] == 0 else f'{-m[0]:.0f} FA'}"
                          f"/{m[1]:.0f} early" for value, m in choice.tried)
        verdict = (f"threshold {choice.value:g}, for {choice.for_evaluations}, smoothing "
                   f"{choice.smoothing:g}" if choice.value is not None
                   else "no quiet threshold in the grid (left out of the tuned set)")
        lines.append(f"  {name:26} {rule.condition.metric} {rule.condition.op} "
                     f"({rule.condition.relative_to.value}): shipped {_rule_threshold(rule):g}"
                     f" -> {verdict}\n      tried {tried}")
    return "\n".join(lines)


def first_sources(outcomes: Sequence[Outcome], detector: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        if o.detector == detector and o.first_source:
            counts[o.first_source] = counts.get(o.first_source, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def false_alarm_sources(traces: Sequence[RunTrace], rules: Sequence[Rule]) -> dict[str, int]:
    """Which rules raise the false alarms (healthy runs, or before a switch)."""
    counts: dict[str, int] = {}
    for trace in traces:
        for alarm in raresignal_alarms(trace, rules):
            if not trace.collapse or alarm.step < trace.switch_step:
                counts[alarm.source] = counts.get(alarm.source, 0) + 1
    return counts


def verdicts(outcomes: Sequence[Outcome]) -> list[str]:
    """The benchmark's targets, each met or missed with its figure."""
    lines = []
    tuned = [o for o in outcomes if o.detector == TUNED]
    for family, scenario in dict.fromkeys((o.family, o.scenario) for o in tuned if o.collapse):
        s = summarize([o for o in tuned if (o.family, o.scenario) == (family, scenario)])
        ok = s.scorable > 0 and s.early == s.scorable
        lines.append(f"  [{'met' if ok else 'MISSED'}] {family}/{scenario}: detected early in "
                     f"{s.early}/{s.scorable} collapsed runs (median lead {_lead(s)})")
    mine = summarize([o for o in tuned if o.collapse])
    probe = summarize([o for o in outcomes if o.detector == BASELINE_LABELS["probe_loss_rise"]
                       and o.collapse])
    better = (mine.median_lead is not None and (probe.median_lead is None
                                                or mine.median_lead > probe.median_lead))
    lines.append(f"  [{'met' if better else 'MISSED'}] median lead {_lead(mine)} steps vs "
                 f"probe-loss alarm {_lead(probe)}")
    healthy = summarize([o for o in tuned if not o.collapse])
    lines.append(f"  [{'met' if healthy.false_alarm_runs == 0 else 'MISSED'}] healthy runs "
                 f"with an alert: {healthy.false_alarm_runs}/{healthy.runs}")
    return lines


def run_benchmark(traces: Sequence[RunTrace], tuning_seeds: Sequence[int],
                  shipped: Sequence[Rule]) -> dict[str, Any]:
    """Tunes on the tuning seeds, scores every detector, returns the whole report."""
    tuning = [t for t in traces if t.seed in tuning_seeds]
    held_out = [t for t in traces if t.seed not in tuning_seeds]
    rule_choices = tune_rules(shipped, tuning)
    baseline_choices = tune_baselines(tuning)
    detectors: dict[str, Any] = {SHIPPED: rules_detector(shipped),
                                 TUNED: rules_detector(tuned_rules(shipped, rule_choices))}
    for name, choice in baseline_choices.items():
        detectors[BASELINE_LABELS[name]] = baseline_detector(name,
                                                             baseline_value(name, choice))
    return {
        "tuning_seeds": sorted(tuning_seeds),
        "held_out_seeds": sorted({t.seed for t in held_out}),
        "detectors": list(detectors),
        "rule_choices": {k: asdict(v) for k, v in rule_choices.items()},
        "baseline_choices": {k: {**asdict(v), "reported_at": baseline_value(k, v)}
                             for k, v in baseline_choices.items()},
        "held_out": score_all(held_out, detectors),
        "tuning": score_all(tuning, detectors),
        "false_alarm_sources_shipped": false_alarm_sources(traces, shipped),
        "false_alarm_sources_tuned_held_out": false_alarm_sources(
            held_out, tuned_rules(shipped, rule_choices)),
        "_rule_choices": rule_choices,
    }


def print_report(report: dict[str, Any], shipped: Sequence[Rule]) -> None:
    detectors = report["detectors"]
    for part, seeds in (("held_out", report["held_out_seeds"]),
                        ("tuning", report["tuning_seeds"])):
        if not report[part]:
            continue
        print(f"\n== {part.replace('_', '-')} seeds {seeds} ==")
        print(format_table(report[part], detectors))
    outcomes = report["held_out"] or report["tuning"]
    for detector in (SHIPPED, TUNED):
        print(f"first alert by rule, {detector}: {first_sources(outcomes, detector)}")
    print(f"false alarms by rule, shipped rules, all seeds: "
          f"{report['false_alarm_sources_shipped']}")
    print(f"false alarms by rule, tuned rules, held-out seeds: "
          f"{report['false_alarm_sources_tuned_held_out']}")
    print()
    print(format_evidence(shipped, report["_rule_choices"]))
    print("Baseline thresholds chosen on the tuning seeds:")
    for name, choice in report["baseline_choices"].items():
        quiet = "" if choice["quiet"] else " (no quiet threshold: least sensitive shown)"
        print(f"  {BASELINE_LABELS[name]}: {choice['reported_at']:g}{quiet} "
              f"(grid {BASELINE_GRIDS[name]})")
    print("\nTargets (held-out seeds):" if report["held_out"] else "\nTargets (tuning seeds):")
    print("\n".join(verdicts(outcomes)))


def _json_ready(report: dict[str, Any], traces: Sequence[RunTrace]) -> dict[str, Any]:
    out = {k: v for k, v in report.items() if not k.startswith("_")}
    out["held_out"] = [asdict(o) for o in report["held_out"]]
    out["tuning"] = [asdict(o) for o in report["tuning"]]
    out["runs"] = [{"run": t.name, "seconds": round(t.seconds, 2),
                    "ground_truth": ground_truth_step(t.eval_steps, t.rare_accuracy),
                    "switch_step": t.switch_step, "estimator_errors": t.estimator_errors}
                   for t in traces]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else [0, 1, 2, 3])
    seeds = list(dict.fromkeys(seeds))
    loaded = ([RunTrace.from_json(t) for t in json.loads(args.load_traces.read_text())]
              if args.load_traces else None)
    if loaded is not None:
        seeds = list(dict.fromkeys(t.seed for t in loaded))
    n_tuning = args.tuning_seeds if args.tuning_seeds is not None else max(1, len(seeds) // 2)
    if not 1 <= n_tuning <= len(seeds):
        raise SystemExit(f"--tuning-seeds must be between 1 and {len(seeds)}, got {n_tuning}")
    shipped = load_rules(args.rules)
    started = time.perf_counter()
    if loaded is not None:
        traces = loaded
    else:
        plan = RunPlan(steps=args.steps, switch_step=args.switch_step,
                       ramp_steps=args.ramp_steps)
        traces = collect_traces(args.families, args.scenarios, seeds, plan)
    if args.save_traces:
        args.save_traces.write_text(json.dumps([t.to_json() for t in traces]))
    report = run_benchmark(traces, seeds[:n_tuning], shipped)
    print_report(report, shipped)
    print(f"\n{len(traces)} runs, {time.perf_counter() - started:.0f} s in all")
    if args.write_rules:
        shipped_text = args.rules.read_text() if args.rules else default_rules_text()
        args.write_rules.write_text(candidate_rules_yaml(shipped_text,
                                                         report["_rule_choices"]))
        load_rules(args.write_rules)  # the candidate must be a valid rules file
        print(f"candidate rules written to {args.write_rules}")
    if args.json:
        args.json.write_text(json.dumps(_json_ready(report, traces), indent=2))
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
