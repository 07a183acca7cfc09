"""One demo run: a server in a child process, training with the Lightning callback, alerts
printed as they fire, then the report and the summary written to the output folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from tqdm import tqdm

from raresignal.agent import MonitorConfig
from raresignal.agent.api import Probe, series_key
from raresignal.agent.cadence import plan_cadence
from raresignal.agent.estimators import EstimatorConfig
from raresignal.client.alert_watch import AlertWatcher
from raresignal.client.channels import open_channel
from raresignal.client.paging import read_series
from raresignal.demo.report import AlertMark, write_report
from raresignal.demo.task import TaskConfig, probe_examples
from raresignal.demo.training import CollapseInducer, DemoModule, TokenStream
from raresignal.integrations.lightning import RaresignalCallback
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

# The estimators whose cadence the demo announces, with the EstimatorConfig field of their
# default interval and (where they wait for a warm-up) of their first step.
ANNOUNCED_CADENCES = (("probe loss", "probe_loss_interval", None),
                      ("probe geometry", "probes_interval", None),
                      ("Fisher", "fisher_interval", None),
                      ("sharpness", "sharpness_interval", "sharpness_warmup_steps"),
                      ("drift", "drift_interval", None))


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
        return cls(**{"steps": 460, "collapse_step": 250, **overrides})  # type: ignore[arg-type]


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


def describe_cadences(total_steps: int) -> str:
    """One line saying how the monitor measures a run of ``total_steps``: the shipped
    defaults, scaled by the cadence rule from the planned length the Lightning callback
    passes (``trainer.estimated_stepping_batches``), with the overhead budget on."""
    defaults, config = EstimatorConfig(), MonitorConfig()
    intervals = []
    for label, field_name, warmup in ANNOUNCED_CADENCES:
        first = getattr(defaults, warmup) if warmup else 0
        cadence = plan_cadence(getattr(defaults, field_name), True, total_steps, first, config)
        intervals.append(f"{label} every {cadence.interval}")
    every = ", ".join(intervals)
    return (f"monitor at its defaults for a {total_steps}-step run: {every} steps (scaled "
            f"from the planned length; raresignal.agent.cadence), overhead budget "
            f"{config.target_overhead:.0%}. Alert rules: the server's defaults.")


def probes(task: TaskConfig) -> tuple[Probe, Probe]:
    """Held-out rare and common probes, drawn from a generator the training data never uses."""
    rare, common = probe_examples(task.probe_size, task.seed)
    return Probe(*rare), Probe(*common)


def fetch_series(target: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every signal of :data:`SIGNAL_METRICS` as the server stored it (Runs.GetSeries)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open_channel(target) as channel:
        stub = alerts_pb2_grpc.RunsStub(channel)
        for metric in SIGNAL_METRICS:
            label_sets = ([{"probe": RARE_PROBE}, {"probe": COMMON_PROBE}]
                          if metric in PROBE_METRICS else [{}])
            for labels in label_sets:
                samples = read_series(stub, alerts_pb2.GetSeriesRequest(
                    run_id=run_id, metric=metric, labels=labels))
                if samples:
                    series[series_key(metric, labels)] = [
                        (int(s.step), float(s.value)) for s in samples]
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
        print(describe_cadences(settings.steps))
        print(f"{kind} run, seed {settings.seed}: {settings.steps} steps"
              + ("" if settings.healthy else f", collapse induced at step "
                 f"{settings.collapse_step}"))
        monitor_callback = RaresignalCallback(
            server=server.grpc_target, run_name=f"demo-{kind}",
            probes={RARE_PROBE: rare}, common_probe=common, progress_bar=progress)
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
