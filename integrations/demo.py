"""raresignal demo: watch a rare skill collapse, and the alert fire before it is gone.

Run ``python -m raresignal.integrations.demo --help`` for the options. The demo

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
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import lightning.pytorch as pl
import torch
from tqdm import tqdm

from raresignal.agent import MonitorConfig
from raresignal.agent.api import Probe, series_key
from raresignal.agent.estimators import EstimatorConfig
from raresignal.integrations.alert_watch import AlertWatcher
from raresignal.integrations.demo_report import AlertMark, write_report
from raresignal.integrations.demo_task import TaskConfig, make_examples
from raresignal.integrations.demo_training import CollapseInducer, DemoModule, TokenStream
from raresignal.integrations.lightning import RaresignalCallback
from raresignal.protos.transport import client_channel_options
from raresignal.protos.v1 import alerts_pb2, alerts_pb2_grpc, common_pb2
from raresignal.server.process import ServerProcess

RARE_PROBE = "rare"
COMMON_PROBE = "common"
# Every signal the alert rules read (and the report draws), read back from the server's
# storage after the run and written to series-<kind>.json: the evidence behind the rules.
SIGNAL_METRICS = ("probe_accuracy", "probe_loss", "probe_fisher_mass_ratio",
                  "probe_absorption", "probe_bulk_residual", "probe_retention",
                  "probe_interference", "sharpness_ratio", "subspace_overlap",
                  "fisher_effective_rank", "nonfinite_values")
PROBE_METRICS = frozenset(m for m in SIGNAL_METRICS if m.startswith("probe_"))

# The demo's cadences, in optimizer steps. A real run is hundreds of thousands of steps
# and the defaults (probes every 200, Fisher every 100, sharpness and drift every 500)
# fit it; the demo's few hundred steps need dense curves, so it measures far more often
# and switches the overhead budget off. The alert rules stay the server's defaults.
DEMO_CADENCES = {"probes_interval": 5, "fisher_interval": 5, "sharpness_interval": 10,
                 "drift_interval": 10, "noise_scale_interval": 10}
DEMO_RETENTION_REFERENCE_STEP = 290
# Interference over the net update of 20 steps: the default spans the 200 steps between
# two probe runs, and 5 steps' updates still carry most of the batches' noise.
DEMO_INTERFERENCE_HORIZON = 20


@dataclass(frozen=True)
class DemoSettings:
    """How long to train and whether to induce the collapse."""

    steps: int = 600
    collapse_step: int = 300
    healthy: bool = False
    out: Path = Path("raresignal-demo")
    seed: int = 0

    @classmethod
    def quick(cls, **overrides: object) -> DemoSettings:
        """The reduced run the tests use: the same story in fewer steps."""
        return cls(**{"steps": 460, "collapse_step": 300, **overrides})  # type: ignore[arg-type]


@dataclass
class DemoResult:
    """What happened, as the demo writes it to summary.json."""

    run_id: str
    healthy: bool
    collapse_step: int | None
    peak_rare_accuracy: float
    peak_step: int
    half_accuracy_step: int | None  # first step after the peak at or below half of it
    alerts: list[dict[str, object]] = field(default_factory=list)  # each fired alert
    report: str = ""
    database: str = ""
    metrics_url: str = ""

    @property
    def first_alert_step(self) -> int | None:
        return min((int(a["step"]) for a in self.alerts), default=None)  # type: ignore[arg-type]

    @property
    def alert_before_half(self) -> bool:
        """True when an alert fired before the rare accuracy fell to half its peak."""
        first = self.first_alert_step
        if first is None:
            return False
        return self.half_accuracy_step is None or first < self.half_accuracy_step


def demo_monitor_config() -> MonitorConfig:
    """The monitor settings of the demo: :data:`DEMO_CADENCES`, each estimator held at its
    cadence (no budget stretching), and the default one-second report interval, which
    the server's RunStalled rule multiplies by five."""
    estimators = EstimatorConfig(**DEMO_CADENCES,
                                 retention_warmup_step=DEMO_RETENTION_REFERENCE_STEP,
                                 probe_interference_horizon=DEMO_INTERFERENCE_HORIZON)
    return MonitorConfig(estimator_config=estimators, target_overhead=0.95,
                         max_interval_factor=1)


def describe_cadences() -> str:
    """One line saying how the demo's monitor differs from the default one."""
    every = ", ".join(f"{name.removesuffix('_interval').replace('_', ' ')} every {steps}"
                      for name, steps in DEMO_CADENCES.items())
    return (f"demo cadences (steps): {every}; retention reference at step "
            f"{DEMO_RETENTION_REFERENCE_STEP}; interference over {DEMO_INTERFERENCE_HORIZON} "
            "steps' updates; overhead budget off. Alert rules: the "
            "server defaults.")


def probes(task: TaskConfig) -> tuple[Probe, Probe]:
    """Held-out rare and common probes, drawn from a generator the training data never uses."""
    generator = torch.Generator().manual_seed(task.seed + 10_000)
    rare = Probe(*make_examples(task.probe_size, True, generator))
    common = Probe(*make_examples(task.probe_size, False, generator))
    return rare, common


def fetch_series(target: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every signal of :data:`SIGNAL_METRICS` as the server stored it (Runs.GetSeries)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with grpc.insecure_channel(target, options=client_channel_options()) as channel:
        stub = alerts_pb2_grpc.RunsStub(channel)
        for metric in SIGNAL_METRICS:
            label_sets = ([{"probe": RARE_PROBE}, {"probe": COMMON_PROBE}]
                          if metric in PROBE_METRICS else [{}])
            for labels in label_sets:
                response = stub.GetSeries(alerts_pb2.GetSeriesRequest(
                    run_id=run_id, metric=metric, labels=labels), timeout=10)
                if response.samples:
                    series[series_key(metric, labels)] = [
                        (int(s.step), float(s.value)) for s in response.samples]
    return series


def accuracy_milestones(points: Sequence[tuple[int, float]]) -> tuple[float, int, int | None]:
    """(peak accuracy, its step, first later step at or below half the peak)."""
    if not points:
        return 0.0, 0, None
    peak_step, peak = max(points, key=lambda p: (p[1], -p[0]))
    half = next((step for step, value in points if step > peak_step and value <= peak / 2),
                None)
    return peak, peak_step, half


class AlertPrinter:
    """Prints each alert the moment it fires, and its resolution; pending alerts that
    never fired stay silent (they are the rules' ``for`` window doing its job)."""

    def __init__(self) -> None:
        self._fired: set[str] = set()

    def __call__(self, event: alerts_pb2.AlertEvent) -> None:
        alert = event.alert
        if alert.state == common_pb2.ALERT_STATE_FIRING:
            self._fired.add(alert.alert_id)
        elif alert.state != common_pb2.ALERT_STATE_RESOLVED or alert.alert_id not in self._fired:
            return
        labels = ",".join(f"{k}={v}" for k, v in sorted(alert.labels.items()))
        if alert.state == common_pb2.ALERT_STATE_FIRING:
            tqdm.write(f"\n>>> ALERT FIRING: {alert.rule}{{{labels}}} at step {alert.step}: "
                       f"{alert.summary} (value {alert.value:.4g}, threshold "
                       f"{alert.threshold:.4g})")
        else:  # the summary describes the firing condition, not the resolution
            tqdm.write(f"\n>>> ALERT RESOLVED: {alert.rule}{{{labels}}} at step {alert.step} "
                       f"(value {alert.value:.4g})")


def run_demo(settings: DemoSettings, progress: bool = True) -> DemoResult:
    """Runs the whole demo and returns what happened; also writes summary.json."""
    torch.manual_seed(settings.seed)
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    kind = "healthy" if settings.healthy else "collapse"
    database = out / f"raresignal-{kind}.db"
    for stale in out.glob(f"{database.name}*"):  # a fresh store for every run
        stale.unlink()

    task = TaskConfig(seed=settings.seed)
    rare, common = probes(task)
    stream = TokenStream(task)
    callbacks: list[pl.Callback] = []
    if not settings.healthy:
        callbacks.append(CollapseInducer(stream, settings.collapse_step))

    with ServerProcess(database, out).start() as server:
        print(f"raresignal server: gRPC {server.grpc_target}, Prometheus metrics "
              f"{server.metrics_url} (scrape it while the demo runs)")
        print(describe_cadences())
        print(f"{kind} run, seed {settings.seed}: {settings.steps} steps"
              + ("" if settings.healthy else f", collapse induced at step "
                 f"{settings.collapse_step}"))
        monitor_callback = RaresignalCallback(
            server=server.grpc_target, run_name=f"demo-{kind}",
            probes={RARE_PROBE: rare}, common_probe=common,
            config=demo_monitor_config(), progress_bar=progress)
        trainer = pl.Trainer(
            max_steps=settings.steps, callbacks=[*callbacks, monitor_callback],
            accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=1)
        with AlertWatcher(server.grpc_target, on_event=AlertPrinter()) as watcher:
            trainer.fit(DemoModule(), train_dataloaders=stream.loader())
            run_id = monitor_callback.run_id or ""
            series = fetch_series(server.grpc_target, run_id)
        fired = [a for a in watcher.fired() if a.run_id == run_id]

    peak, peak_step, half = accuracy_milestones(series.get(
        series_key("probe_accuracy", {"probe": RARE_PROBE}), []))
    marks = [AlertMark(int(a.step), a.rule) for a in fired]
    report = out / f"report-{kind}.png"
    write_report(series, marks, f"raresignal demo ({kind} run)", report,
                 None if settings.healthy else settings.collapse_step)
    result = DemoResult(
        run_id=str(run_id), healthy=settings.healthy,
        collapse_step=None if settings.healthy else settings.collapse_step,
        peak_rare_accuracy=peak, peak_step=peak_step, half_accuracy_step=half,
        alerts=[{"rule": a.rule, "step": int(a.step), "labels": dict(a.labels),
                 "value": a.value, "threshold": a.threshold} for a in fired],
        report=str(report), database=str(database), metrics_url=server.metrics_url)
    (out / f"series-{kind}.json").write_text(json.dumps(
        {key: [list(point) for point in points] for key, points in sorted(series.items())}))
    (out / f"summary-{kind}.json").write_text(json.dumps(
        {**asdict(result), "first_alert_step": result.first_alert_step,
         "alert_before_half": result.alert_before_half}, indent=2))
    return result


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
        prog="python -m raresignal.integrations.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Scrape the live Prometheus metrics at the /metrics address printed at the "
               "start; every series is raresignal_<metric>{run=...}. The demo measures "
               "far more often than the defaults, because it trains for a few hundred "
               "steps: " + describe_cadences())
    parser.add_argument("--healthy", action="store_true",
                        help="the control run: same training, no collapse, no alert expected")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps to train (default 600, 460 with --quick)")
    parser.add_argument("--collapse-step", type=int, default=None,
                        help="step at which the collapse is induced (default: half-way)")
    parser.add_argument("--out", type=Path, default=Path("raresignal-demo"),
                        help="folder for the SQLite store, server log, report and summary "
                             "(default: ./raresignal-demo)")
    parser.add_argument("--quick", action="store_true",
                        help="a shorter run with the same story (what the tests use)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the model, the data and the probes (default 0)")
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


if __name__ == "__main__":
    sys.exit(main())
