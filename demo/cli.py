"""raresignal demo: watch a rare skill collapse, and the alert fire before it is gone.

Run ``python -m raresignal.demo --help`` for the options. The demo

1. starts a raresignal server in the background (its SQLite file goes in --out),
2. trains a small transformer with the Lightning callback on a synthetic task: a common
   rule on most examples and a rare rule on a few percent, with a held-out probe of each,
3. half-way through, drops the rare slice from the data mix and raises weight decay
   (skip this with --healthy: the control run, which must raise no alert),
4. prints each alert the moment the server fires it, and
5. writes a PNG report of what the monitor measured, alerts marked as vertical lines.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from raresignal.demo.app import DemoResult, DemoSettings, describe_cadences, run_demo


def _verdict(result: DemoResult) -> str:
    half = result.half_accuracy_step
    lines = [f"rare probe accuracy: peak {result.peak_rare_accuracy:.2f} at step "
             f"{result.peak_step}; " + (f"fell to half at step {half}" if half is not None
                                        else "never fell to half")]
    if result.healthy:
        lines.append("no alert fired, as expected for the control run" if not result.alerts
                     else f"{len(result.alerts)} alert(s) fired in the control run")
    elif result.alerts:
        first = result.first_alert_step
        margin = f", {half - first} steps before accuracy halved" if half and first else ""
        lines.append(f"first alert at step {first}{margin}")
    else:
        lines.append("no alert fired")
    lines.append(f"report: {result.report}")
    lines.append(f"store: {result.database} (browse it again with "
                 f"`raresignal server --db {result.database}`, then scrape /metrics)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m raresignal.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Scrape the live Prometheus metrics at the /metrics address printed at the "
               "start; every series is raresignal_<metric>{run=...}. The monitor runs "
               "with its defaults, its cadences scaled from the planned length, e.g. "
               + describe_cadences(DemoSettings.steps))
    parser.add_argument("--healthy", action="store_true",
                        help="the control run: same training, no collapse, no alert expected")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps to train (default {DemoSettings.steps}, "
                             f"{DemoSettings.quick().steps} with --quick)")
    parser.add_argument("--collapse-step", type=int, default=None,
                        help="step at which the collapse is induced (default: half-way)")
    parser.add_argument("--out", type=Path, default=DemoSettings.out,
                        help="folder for the SQLite store, server log, report and summary "
                             f"(default: ./{DemoSettings.out})")
    parser.add_argument("--quick", action="store_true",
                        help="a shorter run with the same story (what the tests use)")
    parser.add_argument("--seed", type=int, default=DemoSettings.seed,
                        help="seed of the model, the data and the probes "
                             f"(default {DemoSettings.seed})")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (for logs and CI)")
    return parser


def settings_from(args: argparse.Namespace) -> DemoSettings:
    base = DemoSettings.quick() if args.quick else DemoSettings()
    steps = args.steps if args.steps is not None else base.steps
    collapse = args.collapse_step if args.collapse_step is not None else (
        base.collapse_step if args.steps is None else steps // 2)
    if steps < 1 or not 0 <= collapse < steps:
        raise SystemExit(f"need --steps >= 1 and 0 <= --collapse-step < --steps; got "
                         f"{steps} and {collapse}")
    return DemoSettings(steps=steps, collapse_step=collapse, healthy=args.healthy,
                        out=args.out, seed=args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)  # a model this small only loses time to thread hand-offs
    result = run_demo(settings_from(args), progress=not args.no_progress)
    print(_verdict(result))
    return 0

