"""The probes' loss and accuracy: one forward pass over each probe set, often.

A collapse of a rare skill unfolds over a few hundred steps, so an alarm on the rare
probe's loss can only warn ahead of it when that loss is read many times within it. The
probes' geometry (per-example gradients) is too costly to run that often on a small model;
this forward pass is not, so it is its own estimator, with a cadence and a floor of its
own (``probe_loss_interval``, ``probe_loss_floor_measurements``). It always reads the
whole of each probe set: a rotating share would save the budget little (a forward pass)
and make the alarm's input noisier, which costs the alarm more warning than a longer
interval does; the budget stretches it towards its floor instead.

The common reference probe is read by an estimator of its own, ``common_probe_loss``, at
the cadence of the probes' geometry (``probes_interval``): no default alert
reads it (it is there to compare with on a dashboard), so reading it as often as the rare
probes would spend half of this forward pass's budget on nothing that warns.

On a model whose forward pass over every probe set takes a large share of a training step,
one reading in one step would stall it, so once a whole reading has cost more than a
step's slice the monitor runs the next ones in units, one probe set each, on a copy of
the parameters and buffers of the step each starts at: the reading stays that of one
step however many steps its units take.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from raresignal.agent.api import Measurement, MeasurementUnits, Probe, StepContext, Units
from raresignal.agent.estimators.isolation import isolated_units, preserved_training_state
from raresignal.agent.estimators.likelihood import mean_nll
from raresignal.agent.estimators.objective import (
    FunctionalModel,
    TrainingLoss,
    to_fp32_inputs,
)
from raresignal.agent.estimators.shared import (
    DefaultEstimator,
    SharedState,
    finite,
)


class ProbeSetLoss(DefaultEstimator):
    """``probe_loss`` and (with a likelihood) ``probe_accuracy`` of each of ``probes``:
    the mean over the examples measured, in evaluation mode, every ``interval`` steps
    (``floor_measurements``: the cadence rule's ``M``; None for the monitor's)."""

    expensive = False
    # Its forward runs on a functional copy of the parameters, which under FSDP hold
    # only this rank's shard.
    needs_whole_parameters = True

    def __init__(self, shared: SharedState, probes: Mapping[str, Probe], interval: int,
                 floor_measurements: int | None) -> None:
        super().__init__(shared, interval)
        self.floor_measurements = floor_measurements
        self.probes = dict(probes)

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        out: list[Measurement] = []
        point = self.shared.parameters.fp32_detached()
        with preserved_training_state(self.shared.model), torch.no_grad():
            for name, whole in self.probes.items():
                out += self._measure(name, whole, self.shared.functional, point)
        return finite(out)

    def run_in_units(self, ctx: StepContext) -> MeasurementUnits:
        """The reading at ``ctx.step``, one unit per probe set (the first copies the
        parameters and buffers: training goes on between units). Equal to :meth:`run`."""
        functional = self.shared.functional.with_frozen_buffers()
        point = self.shared.parameters.fp32_copy()
        out = yield from isolated_units(self.shared.model,
                                        self._units(functional, point))
        return finite(out)

    def _units(self, functional: FunctionalModel, point: Mapping[str, torch.Tensor]
               ) -> Units[list[Measurement]]:
        out: list[Measurement] = []
        for name, probe in self.probes.items():
            yield "probe_set"
            with torch.no_grad():
                out += self._measure(name, probe, functional, point)
        return out

    def _measure(self, name: str, probe: Probe, functional: FunctionalModel,
                 point: Mapping[str, torch.Tensor]) -> list[Measurement]:
        labels = (("probe", name),)
        likelihood, engine = self.shared.likelihood, self.shared.per_example
        training_loss = TrainingLoss(functional, likelihood)
        device = self.shared.parameters.device
        out: list[Measurement] = []
        if training_loss.custom:  # the user's own loss is the probe's loss
            loss = training_loss(point, to_fp32_inputs(probe.inputs, device),
                                 probe.targets.to(device))
            out.append(Measurement("probe_loss", float(loss), labels))
        if likelihood is None or engine is None:
            return out
        logits = functional.logits(point, to_fp32_inputs(probe.inputs, device))
        targets = probe.targets.to(logits.device)
        if not training_loss.custom:
            out.append(Measurement("probe_loss", float(mean_nll(likelihood, logits, targets)),
                                   labels))
        counts = likelihood.counts(targets).sum().clamp(min=1.0)
        accuracy = float(likelihood.correct(logits, targets).sum() / counts)
        out.append(Measurement("probe_accuracy", accuracy, labels))
        return out


class ProbeLossEstimator(ProbeSetLoss):
    """The named probe sets (the ones the alerts read), at their own cadence and floor."""

    name = "probe_loss"

    def __init__(self, shared: SharedState, probes: Mapping[str, Probe]) -> None:
        super().__init__(shared, probes, shared.config.probe_loss_interval,
                         shared.config.probe_loss_floor_measurements)


class CommonProbeLossEstimator(ProbeSetLoss):
    """The common reference probe alone, at the probes' geometry cadence (with the
    cadence rule's default floor)."""

    name = "common_probe_loss"

    def __init__(self, shared: SharedState, common: Probe) -> None:
        super().__init__(shared, {shared.config.common_probe_name: common},
                         shared.config.probes_interval, None)

