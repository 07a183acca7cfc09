"""Trains one benchmark run with the real raresignal agent at its shipped defaults.

A run trains a fresh model of one task family for ``plan.steps`` optimizer steps, applies
its scenario (a change ramped in from the plan's change step, a schedule, a resume, or
full-batch training) and records:

* every Measurement the agent's default estimators produced (a recording wrapper around
  each estimator of the Monitor: the Monitor, its budget scheduler, cadences and
  estimators are the shipped ones; only their output is also kept),
* the training loss and pre-clip gradient norm of every step,
* the held-out rare set's accuracy and the rare probe's loss, evaluated exactly every
  ``plan.eval_every`` steps by the benchmark itself: the ground truth and the labelled
  reference alarm.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from detection_families import FAMILIES, Batch, CommonLabelNoise, FamilySettings, TaskFamily
from detection_scenarios import SCENARIOS_BY_NAME, Scenario, TrainingSetup, ramp
from detection_traces import RARE_PROBE_NAME, RecordedSample, RunPlan, RunTrace, TraceWriter
from torch import nn

from raresignal.agent import Measurement, Monitor, Probe


def build_monitor(model: nn.Module, optimizer: torch.optim.Optimizer, rare: Probe,
                  common: Probe, plan: RunPlan, sink: list[RecordedSample]) -> Monitor:
    """The one place the benchmark builds a Monitor: shipped defaults, the run's planned
    length, and every measurement copied into ``sink`` as it is published (spread
    measurements with the step they started at)."""

    def record(stamped: Sequence[tuple[int, Measurement]]) -> None:
        sink.extend((step, m.metric, m.labels, float(m.value)) for step, m in stamped)

    return Monitor(model, optimizer, server=None, run_name=plan.name,
                   probes={RARE_PROBE_NAME: rare}, common_probe=common, total_steps=plan.steps,
                   on_measurements=record)


def make_optimizer(model: nn.Module, scenario: Scenario, settings: FamilySettings
                   ) -> torch.optim.Optimizer:
    lr = scenario.learning_rate(settings)
    assert lr is not None, f"{scenario.name} does not apply to this family"
    run = scenario.full_batch_run(settings)
    if run is not None:
        if run.optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=lr)
        return torch.optim.SGD(model.parameters(), lr=lr)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=settings.base_weight_decay)


def checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, monitor: Monitor
               ) -> bytes:
    """What a training script saves: model, optimizer and the Monitor's state."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "monitor": monitor.state_dict()}, buffer)
    return buffer.getvalue()


def resume(blob: bytes, family: TaskFamily, scenario: Scenario, probes: tuple[Probe, Probe],
           plan: RunPlan, sink: list[RecordedSample]
           ) -> tuple[nn.Module, torch.optim.Optimizer, Monitor]:
    """A new process's start: fresh model, optimizer and Monitor, each loaded from
    ``blob``."""
    state = torch.load(io.BytesIO(blob), weights_only=False)
    model = family.make_model()
    model.load_state_dict(state["model"])
    optimizer = make_optimizer(model, scenario, family.settings)
    optimizer.load_state_dict(state["optimizer"])
    monitor = build_monitor(model, optimizer, *probes, plan, sink)
    monitor.load_state_dict(state["monitor"])
    return model, optimizer, monitor


def evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
             ) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of a whole eval set, in eval mode, without grad."""
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
    runs that never fine-tune draw the same data stream)."""
    fraction = setup.downstream_fraction
    if fraction <= 0.0 or fraction >= 1.0:
        return fraction >= 1.0
    return bool(torch.rand(1, generator=setup.generator) < fraction)


def full_batch(family: TaskFamily, scenario: Scenario, generator: torch.Generator
               ) -> Batch | None:
    """The fixed batch of a full-batch run (None for the other scenarios)."""
    run = scenario.full_batch_run(family.settings)
    if run is None:
        return None
    inputs, targets = family.batch(run.size, family.settings.rare_fraction, generator)
    if run.common_label_noise > 0:
        assert isinstance(family, CommonLabelNoise), f"{family.name} cannot redraw labels"
        targets = family.redraw_common_labels(targets, run.common_label_noise, generator)
    return inputs, targets


def train_run(plan: RunPlan, traces_dir: Path | None = None,
              family: TaskFamily | None = None) -> RunTrace:
    """One monitored run of ``plan``; streamed to ``traces_dir`` when given."""
    started = time.perf_counter()
    family = family or FAMILIES[plan.family]()
    scenario = SCENARIOS_BY_NAME[plan.scenario]
    settings = family.settings
    torch.manual_seed(plan.seed)
    model = family.make_model()
    optimizer = make_optimizer(model, scenario, settings)
    probes = family.probes(plan.seed, plan.probe_size)
    heldout = family.heldout(plan.seed, plan.heldout_size)
    trace = RunTrace(plan)
    writer = TraceWriter(traces_dir, plan) if traces_dir is not None else None
    monitor = build_monitor(model, optimizer, *probes, plan, trace.samples)
    setup = TrainingSetup(optimizer, torch.Generator().manual_seed(plan.seed),
                          0.0 if scenario.starts_without_rare else settings.rare_fraction,
                          settings.batch_size)
    full = full_batch(family, scenario, setup.generator)
    try:
        for step in range(plan.steps):
            if step == plan.change_step:
                if scenario.resumes:
                    blob = checkpoint(model, optimizer, monitor)
                    monitor.close()
                    model, optimizer, monitor = resume(blob, family, scenario, probes, plan,
                                                       trace.samples)
                    setup.optimizer = optimizer
                setup.capture()
            scenario.schedule(setup, settings, step / plan.steps)
            progress = ramp(step, plan.change_step, plan.ramp_steps)
            if progress is not None:
                scenario.change(setup, settings, progress)
            inputs, targets = full if full is not None else family.batch(
                setup.batch_size, setup.rare_fraction, setup.generator, _downstream(setup))
            measured = len(trace.samples)
            loss = nn.functional.cross_entropy(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf))
            monitor.step(loss=loss, batch=(inputs, targets))
            optimizer.step()
            trace.loss.append(float(loss.detach()))
            trace.grad_norm.append(grad_norm)
            if writer is not None:
                writer.step(step, trace.loss[-1], grad_norm, trace.samples[measured:])
            if step % plan.eval_every == 0 or step == plan.steps - 1:
                accuracy, _ = evaluate(model, *heldout)
                _, probe_loss = evaluate(model, probes[0].inputs, probes[0].targets)
                trace.eval_steps.append(step)
                trace.heldout_accuracy.append(accuracy)
                trace.probe_loss.append(probe_loss)
                if writer is not None:
                    writer.evaluation(step, accuracy, probe_loss)
        trace.monitor_steps = monitor.step_count
        measured = len(trace.samples)
        monitor.close()
        if writer is not None:
            writer.late_samples(trace.samples[measured:])
        trace.estimator_errors = monitor.estimator_errors
        trace.seconds = time.perf_counter() - started
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    if writer is not None:
        writer.end(trace)
    return trace
