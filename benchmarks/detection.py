"""Detection quality: do raresignal's rare-signal alerts warn of a collapsing rare skill
early, on task families they were never tuned on, without crying wolf on healthy runs?

Every run trains a small model on CPU for 5000 steps (--steps) with the real agent at its
shipped defaults: ``Monitor(model, optimizer, probes=..., common_probe=...)`` with no hand-
set cadence or reference step, budget on; the one thing the benchmark tells it is the
run's planned length. Seven task families, each with a common skill and a rare one:

  minority_class      a 3 % minority class of a Gaussian mixture (MLP)
  token_rule          a rare compositional token rule (two-block transformer)
  digits              a rare digit class of scikit-learn's 8x8 digits (small CNN)
  char_lm             a rare context deciding the next character (tiny GRU)
  compositional_mlp   a common rule and a rare compositional rule on 5 % (tanh MLP)
  pulse_cnn           a rare pulse on periodic signals, a class of its own (1-D CNN with
                      batch norm; recorded after the shipped rules were chosen)
  keyword_text        a rare intent marked by two keywords among 24 tokens (mean-pooled
                      bag-of-words MLP; recorded after RareProbeLossJumpOnUpdateSurge was
                      chosen)

and these scenarios. Each run draws its change step from its seed, uniformly in 30-70 %
of its length; the change ramps in over --ramp-steps:

  collapse  drop_rare, lr_spike, weight_decay_jump, finetune_other_task
  control   continued, rare_learned_late (the rare slice enters at the change step),
            rare_thinning, warmup_cosine (the whole run), warm_restarts (SGDR: the
            learning rate back at its peak at 10, 30 and 70 %), batch_size_change,
            checkpoint_resume (model, optimizer and Monitor state saved and loaded into
            new ones), edge_of_stability_gd and edge_of_stability_adam (one fixed
            batch the whole run, gradient descent with sharpness at 2 / lr, Adam with
            preconditioned sharpness at 38 / lr; only families with a rate known to
            reach the edge)

Controls run the full length. Ground truth of a collapse: the first step at which the
held-out rare accuracy (evaluated exactly every --eval-every steps by the benchmark, on a
set the agent never sees) falls halfway from its peak to chance; a collapse run that never
falls that far is "no collapse" and is scored apart. The agent's measurements are replayed
into the server's own alert engine with the shipped rules (or --rules FILE) and compared
with a labelled reference: the rare probe's loss 0.5 nats above its running minimum.

The agent reads the rare probe's loss every 10 steps, and keeps that in a run planned
for 5000 steps (at least 500 readings). --probe-loss-every N re-scores recorded runs as
if it had read it every N steps, from the benchmark's own exact evaluations of the same
probe (a multiple of --eval-every): recordings made while the agent's floor let its
budget stretch that to every 25 steps on these small models are scored at 10 this way,
and the rules must hold at both.

Held-out families: the rare-signal rules are tuned on some families and reported on the
others; by default every family is held out in turn (leave-one-family-out). Targets on
held-out families: no rare-signal alert on at least 40 control runs; at least 90 % of
collapses alerted before the ground truth; median lead at least 2x the probe-loss alarm's.

Examples::

    python benchmarks/detection.py --save-traces traces/          # record all, then score
    python benchmarks/detection.py --save-traces traces/ --jobs 2 # (default) resumes too
    python benchmarks/detection.py --load-traces traces/          # re-score in minutes
    python benchmarks/detection.py --load-traces traces/ --rules candidate.yaml
    python benchmarks/detection.py --load-traces traces/ --rules candidate.yaml --no-tuning
    python benchmarks/detection.py --load-traces traces/ --tune-families digits char_lm
    python benchmarks/detection.py --load-traces traces/ --probe-loss-every 10
    python benchmarks/detection.py --quick --save-traces /tmp/q   # 600-step smoke run
    python benchmarks/detection.py --families digits --scenarios continued --seeds 0

The recording prints its estimate before it starts and a progress bar as runs finish.
A recording that is killed resumes: runs whose trace file is complete are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from detection_families import FAMILIES
from detection_recording import QUICK, RecordingConfig, plan_runs, record
from detection_report import (
    ALL_SHIPPED,
    SHIPPED,
    TUNED,
    false_alarm_sources,
    format_table,
    run_report,
    verdicts,
)
from detection_scenarios import SCENARIOS
from detection_traces import read_traces, with_probe_loss_every
from detection_tuning import Fold, folds

from raresignal.server.alerting.rules import load_rules


def build_parser() -> argparse.ArgumentParser:
    defaults = RecordingConfig()
    parser = argparse.ArgumentParser(
        prog="python benchmarks/detection.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK.steps}-step runs of seed {QUICK.seeds[0]}: the "
                             "pipeline end to end in minutes (too short for the agent's "
                             "warm-ups: no figure to quote)")
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES),
                        default=list(FAMILIES), help="task families (default: all)")
    parser.add_argument("--scenarios", nargs="+", choices=[s.name for s in SCENARIOS],
                        default=[s.name for s in SCENARIOS],
                        help="scenarios (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help=f"seeds per family x scenario (default {list(defaults.seeds)})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps per run (default {defaults.steps})")
    parser.add_argument("--ramp-steps", type=int, default=None,
                        help=f"steps over which a change ramps in (default "
                             f"{defaults.ramp_steps}; 0: all at once)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help=f"steps between exact held-out evaluations (default "
                             f"{defaults.eval_every})")
    parser.add_argument("--jobs", type=int, default=defaults.jobs,
                        help="runs recorded at once, one process and thread each "
                             "(default %(default)s)")
    parser.add_argument("--save-traces", type=Path, default=None, metavar="DIR",
                        help="record into DIR, one JSON-lines file per run; runs already "
                             "there are skipped (default: a temporary folder)")
    parser.add_argument("--load-traces", type=Path, default=None, metavar="DIR",
                        help="score the runs recorded in DIR instead of training")
    parser.add_argument("--rules", type=Path, default=None, metavar="FILE",
                        help="a candidate rules file to score instead of the shipped "
                             "server/alerting/default_rules.yaml")
    parser.add_argument("--tune-families", nargs="+", default=None, metavar="FAMILY",
                        help="tune on these families and report on the others (default: "
                             "every family held out in turn)")
    parser.add_argument("--no-tuning", action="store_true",
                        help="score the rules as given and the reference alarm only, "
                             "every family at once, without the leave-one-family-out "
                             "tuning (seconds instead of minutes: for comparing rules "
                             "files on recorded traces)")
    parser.add_argument("--probe-loss-every", type=int, default=None, metavar="N",
                        help="score as if the agent had read the rare probe's loss every N "
                             "steps (a multiple of --eval-every): its readings are replaced "
                             "by the benchmark's exact evaluations of the same probe. The "
                             "agent reads it every 10 steps in a 5000-step run; recordings "
                             "made while its budget could stretch that hold every 25")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="write every outcome and tuning choice to PATH")
    return parser


def recording_config(args: argparse.Namespace) -> RecordingConfig:
    config = QUICK if args.quick else RecordingConfig()
    given = {"steps": args.steps, "ramp_steps": args.ramp_steps,
             "eval_every": args.eval_every,
             "seeds": tuple(dict.fromkeys(args.seeds)) if args.seeds else None}
    return replace(config, jobs=args.jobs, **{k: v for k, v in given.items()
                                              if v is not None})


def print_report(report: dict[str, Any], sources: dict[str, dict[str, int]]) -> None:
    for fold in report["folds"]:
        tuned_on = ", ".join(fold["tuning"]) or "nothing (the rules as given only)"
        print(f"tuned on {tuned_on}; held out: {', '.join(fold['held_out'])}")
    print("\n== held-out families ==")
    print(format_table(report["outcomes"]))
    print("Shipped rules firing on controls (runs per rule):")
    for scenario, rules in sources.items():
        print(f"  {scenario}: {rules}")
    scored = {outcome.detector for outcome in report["outcomes"]}
    for detector in (d for d in (SHIPPED, TUNED) if d in scored):
        print(f"\nTargets, {detector}, held-out families:")
        print("\n".join(verdicts(report["outcomes"], detector)))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rules = load_rules(args.rules)
    started = time.perf_counter()
    if args.load_traces is not None:
        traces = read_traces(args.load_traces)
        if not traces:
            raise SystemExit(f"no recorded run in {args.load_traces}")
    else:
        config = recording_config(args)
        plans = plan_runs(args.families, args.scenarios, config)
        with tempfile.TemporaryDirectory() as scratch:
            directory = args.save_traces or Path(scratch)
            record(plans, directory, config.jobs)
            wanted = {p.file_name for p in plans}
            traces = [t for t in read_traces(directory) if t.plan.file_name in wanted]
    if args.probe_loss_every is not None:
        try:
            traces = [with_probe_loss_every(t, args.probe_loss_every) for t in traces]
        except ValueError as error:
            raise SystemExit(f"--probe-loss-every: {error}") from None
    families = list(dict.fromkeys(t.plan.family for t in traces))
    if args.no_tuning and args.tune_families:
        raise SystemExit("--no-tuning and --tune-families exclude each other")
    try:
        fold_list = ([Fold((), tuple(families))] if args.no_tuning
                     else folds(families, args.tune_families))
    except ValueError as error:
        raise SystemExit(f"--tune-families: {error}") from None
    report = run_report(traces, rules, fold_list)
    sources = false_alarm_sources(report["outcomes"], traces, rules)
    print_report(report, sources)
    print(f"\n{len(traces)} runs, {time.perf_counter() - started:.0f} s in all")
    if args.json:
        out = {"folds": report["folds"], "false_alarm_sources": sources,
               "outcomes": [asdict(o) for o in report["outcomes"]],
               "runs": [{"run": t.name, **asdict(t.plan), "seconds": round(t.seconds, 2),
                         "estimator_errors": t.estimator_errors} for t in traces],
               "detectors": [SHIPPED, TUNED, ALL_SHIPPED]}
        args.json.write_text(json.dumps(out, indent=2))
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
