"""Accuracy against cost of raresignal's curvature estimators, beside peer tools.

Two questions, each on the same model and the same batch for every method:

lambda_max (sharpness)
  How many Hessian-vector products (HVPs) and how much wall time does raresignal's
  sharpness estimator (Lanczos) need to land within 2% of the exact top eigenvalue,
  from a cold random start and warm-started from its previous eigenvector after a few
  SGD steps (the way it runs during training)? Against PyHessian's power iteration at its
  defaults (maxIter=100, tol=1e-3) and at the loosest tolerance that reaches 2%.
  Exact: the full Hessian + eigvalsh on a small MLP (after 100 and after 400 training
  steps: longer training narrows the gap lambda_2/lambda_1 that power iteration's cost
  depends on); ARPACK Lanczos run to convergence on a larger MLP and a CNN, too large
  for the full Hessian. Every method uses
  double-backward products.

Fisher
  Per-layer trace of the diagonal of the true Fisher (labels sampled from the model),
  from raresignal's Fisher estimator, against BackPACK's DiagGGNExact (exact GGN
  diagonal, which for softmax cross-entropy is the exact Fisher diagonal) and DiagGGNMC
  (sampled labels), with exact enumeration over every label as the reference. On a tiny
  causal transformer (nn.MultiheadAttention), where BackPACK does not apply, raresignal
  is compared with exact enumeration only.

Times are medians of repeats in this one run; compare them as ratios within the run,
never with figures from another run. PyHessian and BackPACK are benchmark-only
dependencies: a peer that cannot be imported is skipped with a message.

Examples::

    python benchmarks/curvature.py --quick                 # about a minute on 2 CPU cores
    python benchmarks/curvature.py --json curvature.json   # the full size, a few minutes
    python benchmarks/curvature.py --parts sharpness --rounds 10 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from curvature_fisher import FisherReport, compare_fisher, load_backpack
from curvature_models import fisher_mlp, larger_mlp, small_cnn, small_mlp, tiny_transformer
from curvature_report import fisher_text, hvp_ratio, sharpness_text
from curvature_sharpness import (
    PYHESSIAN_DEFAULT,
    RARESIGNAL_WARM,
    SharpnessReport,
    compare_sharpness,
    dense_spectrum,
    lanczos_spectrum,
    load_pyhessian,
)

PARTS = ("sharpness", "fisher")


@dataclass(frozen=True)
class Plan:
    """How much of everything to run."""

    rounds: int  # warm-started points after the cold one
    sgd_steps: int  # SGD steps between points
    lr: float
    repeats: int  # repeats of every lambda_max measurement
    fisher_repeats: int  # repeats (new label draws) of every Fisher measurement
    draws: tuple[int, ...]  # label draws per example for the Monte Carlo Fisher methods


QUICK = Plan(rounds=2, sgd_steps=5, lr=0.05, repeats=3, fisher_repeats=8, draws=(1, 4))
FULL = Plan(rounds=10, sgd_steps=5, lr=0.05, repeats=9, fisher_repeats=48, draws=(1, 8))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/curvature.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smaller models, fewer points and repeats: the whole story "
                             "in about a minute (for a smoke run, not for figures)")
    parser.add_argument("--device", default="cpu",
                        help="torch device to measure on, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the models, data and starts (default 0)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="which comparisons to run (default both)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="warm-started lambda_max points after the cold one (default "
                             f"{FULL.rounds}, quick {QUICK.rounds})")
    parser.add_argument("--sgd-steps", type=int, default=None,
                        help=f"SGD steps between lambda_max points (default {FULL.sgd_steps})")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"learning rate of those SGD steps (default {FULL.lr})")
    parser.add_argument("--repeats", type=int, default=None,
                        help="random starts per lambda_max method and point (default "
                             f"{FULL.repeats}, quick {QUICK.repeats})")
    parser.add_argument("--fisher-repeats", type=int, default=None,
                        help="label draws per Fisher method: the error is their median "
                             f"(default {FULL.fisher_repeats}, quick {QUICK.fisher_repeats})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: steadier timings on a shared "
                             "machine)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write every figure, per run, to PATH")
    return parser


def plan_from(args: argparse.Namespace) -> Plan:
    base = QUICK if args.quick else FULL
    chosen = Plan(
        rounds=base.rounds if args.rounds is None else args.rounds,
        sgd_steps=base.sgd_steps if args.sgd_steps is None else args.sgd_steps,
        lr=base.lr if args.lr is None else args.lr,
        repeats=base.repeats if args.repeats is None else args.repeats,
        fisher_repeats=(base.fisher_repeats if args.fisher_repeats is None
                        else args.fisher_repeats),
        draws=base.draws,
    )
    if chosen.rounds < 1 or chosen.sgd_steps < 1 or chosen.repeats < 1 \
            or chosen.fisher_repeats < 1 or chosen.lr <= 0:
        raise SystemExit("--rounds, --sgd-steps, --repeats and --fisher-repeats must be at "
                         "least 1 and --lr positive")
    return chosen


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SystemExit(f"--device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name!r}: CUDA is not available in this torch build "
                         "or on this machine")
    return device


def run_sharpness(plan: Plan, seed: int, quick: bool,
                  device: torch.device) -> list[SharpnessReport]:
    pyhessian = load_pyhessian()
    cases = [(small_mlp, dense_spectrum),
             (partial(small_mlp, warmup_steps=400), dense_spectrum),
             (larger_mlp, lambda w: lanczos_spectrum(w, seed)),
             (small_cnn, lambda w: lanczos_spectrum(w, seed))]
    reports = []
    for make, exact in cases:
        workload = make(seed, quick).to(device)
        report = compare_sharpness(workload, exact, plan.rounds, plan.sgd_steps, plan.lr,
                                   plan.repeats, pyhessian)
        print(sharpness_text(report), end="\n\n", flush=True)
        reports.append(report)
    return reports


def run_fisher(plan: Plan, seed: int, quick: bool, device: torch.device) -> list[FisherReport]:
    backpack = load_backpack()
    reports = []
    for make in (fisher_mlp, tiny_transformer):
        workload = make(seed, quick).to(device)
        report = compare_fisher(workload, plan.fisher_repeats, plan.draws, backpack)
        print(fisher_text(report), end="\n\n", flush=True)
        reports.append(report)
    return reports


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, threads: int) -> dict[str, Any]:
    return {
        "python": platform.python_version(), "torch": torch.__version__,
        "device": str(device), "threads": threads, "machine": platform.machine(),
        "pyhessian": _version("PyHessian"), "backpack": _version("backpack-for-pytorch"),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = plan_from(args)
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    env = environment(device, args.threads)
    print(" ".join(f"{k}={v}" for k, v in env.items()), end="\n\n", flush=True)
    sharpness = (run_sharpness(plan, args.seed, args.quick, device)
                 if "sharpness" in args.parts else [])
    fisher = run_fisher(plan, args.seed, args.quick, device) if "fisher" in args.parts else []
    for report in sharpness:
        ratio = hvp_ratio(report, PYHESSIAN_DEFAULT, RARESIGNAL_WARM)
        if ratio is not None:
            print(f"summary: {report.workload}: PyHessian defaults need {ratio:.1f}x the "
                  "HVPs of warm-started raresignal")
    elapsed = time.perf_counter() - started
    print(f"finished in {elapsed:.0f} s")
    if args.json is not None:
        payload = {"environment": env, "plan": asdict(plan), "seed": args.seed,
                   "quick": args.quick, "seconds": elapsed,
                   "sharpness": [asdict(r) for r in sharpness],
                   "fisher": [asdict(r) for r in fisher]}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
