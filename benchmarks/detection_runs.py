"""Trains one benchmark run with the real raresignal agent and records everything measured.

A run trains a fresh model of one task family for ``steps`` optimizer steps, ramps its
scenario's change in from ``switch_step`` over ``ramp_steps``, and records four things:

* every Measurement the agent's default estimators produced (through a recording wrapper
  around each estimator: the Monitor, its budget scheduler and the estimators are the
  real ones, only their output is also kept),
* the training loss and pre-clip gradient norm of every step (what users log today),
* the rare probe's accuracy and loss, evaluated exactly every ``eval_every`` steps by the
  benchmark itself, independent of the monitor's cadence: the ground truth.

Detectors are then replayed on the recorded trace, so one training run serves every
threshold the tuning tries.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from detection_scenarios import Scenario, TrainingSetup, progress
from detection_tasks import RARE_FRACTION, TaskFamily
from torch import nn

from raresignal.agent import Measurement, Monitor, MonitorConfig, StepContext
from raresignal.agent.estimators import EstimatorConfig, build_default_estimators

Labels = tuple[tuple[str, str], ...]
RecordedSample = tuple[int, str, Labels, float]  # (step, metric, labels, value)


@dataclass(frozen=True)
class RunPlan:
    """Length of a run and the cadences it is measured at."""

    steps: int = 600
    switch_step: int = 400
    ramp_steps: int = 60  # the change ramps in over this many steps (0: all at once)
    eval_every: int = 5  # ground-truth evaluation of the rare probe
    probe_size: int = 128
    # Agent cadences, in steps: the agent's defaults scaled to runs of a few hundred
    # steps. With probes every 5 steps, the shipped rules' longest baseline (a warm-up of
    # 50 evaluations and a window of 16) is learned by step 330, before the switch.
    probes_interval: int = 5
    fisher_interval: int = 5
    drift_interval: int = 5
    sharpness_interval: int = 10
    retention_warmup_step: int = 250
    # Interference over the net update of 20 steps (by default it spans the steps
    # between two probe runs): one step's update mostly carries the batch's noise.
    probe_interference_horizon: int = 20
    # The agent's default: sketched cosines (interference, overlaps) carry a JL noise of
    # about 1/sqrt(d), 0.044 at d = 512, as large as a healthy interference.
    sketch_dim: int = EstimatorConfig.sketch_dim

    def __post_init__(self) -> None:
        if not 0 < self.switch_step < self.steps:
            raise ValueError(f"need 0 < switch_step < steps, got {self.switch_step} and "
                             f"{self.steps}")
        if self.ramp_steps < 0:
            raise ValueError(f"ramp_steps must be >= 0, got {self.ramp_steps}")
        if self.eval_every < 1 or self.probe_size < 1:
            raise ValueError("eval_every and probe_size must be >= 1")

    def estimator_config(self, seed: int) -> EstimatorConfig:
        return EstimatorConfig(
            sketch_dim=self.sketch_dim, seed=seed, probes_interval=self.probes_interval,
            fisher_interval=self.fisher_interval, drift_interval=self.drift_interval,
            sharpness_interval=self.sharpness_interval,
            retention_warmup_step=self.retention_warmup_step,
            probe_interference_horizon=self.probe_interference_horizon)


@dataclass
class RunTrace:
    """Everything one run produced; detectors and the ground truth read only this."""

    family: str
    scenario: str
    collapse: bool
    seed: int
    switch_step: int
    steps: int
    samples: list[RecordedSample] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    rare_accuracy: list[float] = field(default_factory=list)
    rare_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    estimator_errors: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.family}/{self.scenario}/seed{self.seed}"

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["samples"] = [[s, m, [list(p) for p in labels], v]
                           for s, m, labels, v in self.samples]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunTrace:
        values = dict(data)
        values["samples"] = [(int(s), str(m), tuple((str(k), str(v)) for k, v in labels),
                              float(v)) for s, m, labels, v in data["samples"]]
        return cls(**values)


class RecordingEstimator:
    """Runs one of the agent's estimators unchanged and keeps a copy of what it returns."""

    def __init__(self, inner: Any, sink: list[RecordedSample]) -> None:
        self.inner = inner
        self.sink = sink
        self.name: str = inner.name
        self.default_interval: int = inner.default_interval
        self.expensive: bool = inner.expensive

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        measured = list(self.inner.run(ctx))
        self.sink.extend((ctx.step, m.metric, m.labels, float(m.value)) for m in measured)
        return measured

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)


def _evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
              ) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the whole probe, in eval mode, without grad."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(inputs)
        loss = float(nn.functional.cross_entropy(logits, targets))
        accuracy = float((logits.argmax(dim=-1) == targets).float().mean())
    model.train(was_training)
    return accuracy, loss


def _downstream(setup: TrainingSetup) -> bool:
    """Whether this step's batch comes from the downstream task (a coin only mid-ramp, so
    runs that never fine-tune draw the same data stream as before)."""
    fraction = setup.downstream_fraction
    if fraction <= 0.0 or fraction >= 1.0:
        return fraction >= 1.0
    return bool(torch.rand(1, generator=setup.generator) < fraction)


def train_run(family: TaskFamily, scenario: Scenario, seed: int, plan: RunPlan) -> RunTrace:
    """One monitored training run of ``family`` with ``scenario`` applied at the switch."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    settings = family.settings
    model = family.make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate,
                                  weight_decay=settings.base_weight_decay)
    rare, common = family.probes(seed, plan.probe_size)
    trace = RunTrace(family.name, scenario.name, scenario.collapse, seed, plan.switch_step,
                     plan.steps)
    estimators = [RecordingEstimator(e, trace.samples) for e in build_default_estimators(
        model, optimizer, {"rare": rare}, common, plan.estimator_config(seed))]
    # max_interval_factor=1 pins every cadence to the plan: the budget scheduler would
    # otherwise stretch them on these tiny models (whose steps cost almost nothing), and
    # the benchmark measures detection at known cadences.
    monitor = Monitor(model, optimizer, server=None, run_name=trace.name,
                      estimators=estimators, config=MonitorConfig(max_interval_factor=1))
    setup = TrainingSetup(optimizer, torch.Generator().manual_seed(seed), RARE_FRACTION)
    for step in range(plan.steps):
        if step == plan.switch_step:
            setup.capture()
        ramp = progress(step, plan.switch_step, plan.ramp_steps)
        if ramp is not None:
            scenario.change(setup, settings, ramp)
        inputs, targets = family.batch(settings.batch_size, setup.rare_fraction,
                                       setup.generator, _downstream(setup))
        loss = nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
        monitor.step(loss=loss, batch=(inputs, targets))
        optimizer.step()
        trace.loss.append(float(loss.detach()))
        trace.grad_norm.append(float(grad_norm))
        if step % plan.eval_every == 0 or step == plan.steps - 1:
            accuracy, probe_loss = _evaluate(model, rare.inputs, rare.targets)
            trace.eval_steps.append(step)
            trace.rare_accuracy.append(accuracy)
            trace.rare_loss.append(probe_loss)
    monitor.close()
    trace.estimator_errors = monitor.estimator_errors
    trace.seconds = time.perf_counter() - started
    return trace
