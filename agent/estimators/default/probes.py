"""The probe estimator: the rare-signal geometry of each named probe set.

Its measurement runs in units that the monitor may spread over several training steps
(see ``ProbeEstimator.run_in_units``); the parameters and buffers are copied when it
starts, so the result is exactly the one-shot measurement of that step.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from raresignal.agent.api import (
    Measurement,
    MeasurementUnits,
    Probe,
    StepContext,
    Units,
    run_units,
)
from raresignal.agent.cadence import planned_warmup
from raresignal.agent.estimators.fisher import sample_model_labels
from raresignal.agent.estimators.gradient_stats import parameter_sketch
from raresignal.agent.estimators.isolation import isolated_units
from raresignal.agent.estimators.objective import FunctionalModel, Params, loss_chunks
from raresignal.agent.estimators.probes import (
    RetentionReference,
    absorption,
    bulk_residual,
    cosine,
    fisher_mass,
)
from raresignal.agent.estimators.shared import (
    DefaultEstimator,
    RotatingSubsample,
    SharedState,
    finite,
    with_common_first,
)
from raresignal.agent.estimators.subspace import orthonormal_rows_basis


@dataclass
class InterferenceStart:
    """Where an interference window starts: the step, the parameters' sketch there, and
    each probe's mean dataset-label gradient there (sketched)."""

    step: int
    parameters: torch.Tensor  # S theta_s, fp64
    gradients: dict[str, torch.Tensor]  # probe name -> S g_R(theta_s), fp64

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "parameters": self.parameters.cpu(),
                "gradients": {n: g.cpu() for n, g in self.gradients.items()}}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], device: torch.device) -> InterferenceStart:
        return cls(int(state["step"]), state["parameters"].to(device),
                   {n: g.to(device) for n, g in state["gradients"].items()})


class ProbeEstimator(DefaultEstimator):
    """Rare-signal geometry of each probe set against the common probe and U_dom. Off under
    FSDP (sharded parameters): per-example gradients need whole parameters. With a
    ``loss_fn`` and no likelihood only the interference remains (the rest rests on labels
    sampled from the model). The probes' loss and accuracy, a forward pass, are
    measured far more often by ``ProbeLossEstimator``.

    Interference is cos(g_R(theta_s), -(theta_t - theta_s)): the probe's mean gradient at
    an earlier measurement s against the net update training applied from s to now, t (at
    least ``probe_interference_horizon`` steps later; 0: since the last measurement). Its
    sign is the sign of the first-order change of the probe's loss over those updates.
    The update is read from two parameter sketches (one pass over the weights per probe
    run; the sketch is linear, so their difference is the update's sketch), so it holds
    the optimizer's momentum, preconditioning, clipping and weight decay. A cosine with
    one batch's gradient would instead mostly tell which examples that batch drew (a rare
    slice of a few percent is in some batches and not in others) and could not see an
    over-regularising weight decay at all. The net update over a window also averages out
    the step-to-step noise around equilibrium (for SGD over one step the two definitions
    are the same).

    Effort (``set_effort``): below 1, each measurement uses a rotating subsample of each
    probe set (``RotatingSubsample``). Every reading is a mean over the examples used
    (Fisher mass per token, the mean gradient), so it estimates the full probe's value
    without bias, only noisier.
    """

    name = "probes"
    expensive = True
    needs_whole_parameters = True

    def __init__(self, shared: SharedState, probes: Mapping[str, Probe],
                 common: Probe | None) -> None:
        super().__init__(shared, shared.config.probes_interval)
        self.probes = dict(probes)
        self.common = common
        self.references: dict[str, RetentionReference] = {}
        self.interference_starts: list[InterferenceStart] = []
        self.retention_warmup_step = shared.config.retention_warmup_step
        self.subsample = RotatingSubsample()

    def set_effort(self, level: float) -> float | None:
        """Measures a rotating ``level`` share of each probe set per run (class docstring)."""
        return self.subsample.set_level(level)

    def plan(self, total_steps: int) -> None:
        """A run planned shorter than the retention warm-up takes its reference earlier."""
        config = self.shared.config
        self.retention_warmup_step = planned_warmup(
            config.retention_warmup_step, total_steps, config.retention_warmup_fraction)

    def _label_seed(self, name: str) -> int:
        # Fixed per probe: the same uniforms every time (common random numbers), so the
        # sampled-label noise largely cancels between two measurements of one probe.
        return zlib.crc32(name.encode())

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        return run_units(self.run_in_units(ctx))

    def run_in_units(self, ctx: StepContext) -> MeasurementUnits:
        """The measurement at ``ctx.step`` in units: for each probe set, each chunk of its
        dataset-label gradient, the drawing of its sampled labels (one forward pass) and
        each chunk of its per-example gradients (``per_example_chunk`` examples, at most
        ``unit_batch_fraction`` of the training batch). The parameters, buffers, the
        parameters' sketch and U_dom are taken when it starts, so the result is exactly
        the one-shot measurement of that step; the references, the interference windows
        and the subsample offsets change only when it completes."""
        offsets = self.subsample.state_dict()
        completed = False
        try:
            result = yield from isolated_units(self.shared.model, self._measure_units(ctx))
            completed = True
            return result
        finally:
            if not completed:  # dropped half-way: the next one takes the same examples
                self.subsample.load_state_dict(offsets)

    def _measure_units(self, ctx: StepContext) -> MeasurementUnits:
        config = self.shared.config
        shared = self.shared
        dominant = shared.dominant.basis() if shared.dominant.ready else None
        named = with_common_first(self.probes, self.common, config.common_probe_name)
        probes = {name: self.subsample.take(name, whole) for name, whole in named.items()}
        chunk = shared.unit_examples(ctx, config.per_example_chunk)
        # Copies, not views: the optimizer steps in place between units.
        engine = None if shared.per_example is None else shared.per_example.frozen(chunk)
        if engine is not None:
            functional, point = engine.functional, engine.point()
        else:
            functional = shared.functional.with_frozen_buffers()
            point = shared.parameters.fp32_copy()
        parameters = parameter_sketch(shared.sketcher)
        out: list[Measurement] = []
        dataset_gradients: dict[str, torch.Tensor] = {}
        references: dict[str, RetentionReference] = {}
        common_mass = None
        for name, probe in probes.items():
            dataset_gradients[name] = yield from self._dataset_gradient_units(
                functional, point, probe, chunk)
            if engine is None:  # no likelihood: no sampled-label geometry
                continue
            _, sampled = sample_model_labels(engine, probe.inputs, probe.targets,
                                             shared.generator(self._label_seed(name)))
            yield
            summary = yield from engine.summarize_units(probe.inputs, sampled)
            mass = fisher_mass(summary.sq_norms, summary.counts)
            g = summary.sketches
            labels = (("probe", name),)
            out.append(Measurement("probe_fisher_mass", mass, labels))
            if self.common is not None and name == config.common_probe_name:
                common_mass = mass
            elif common_mass is not None and common_mass > 0:
                out.append(Measurement("probe_fisher_mass_ratio", mass / common_mass,
                                       labels))
            if dominant is not None and dominant.shape[1] > 0:
                basis = orthonormal_rows_basis(g, config.probe_rank)
                out += [Measurement("probe_absorption", absorption(dominant, basis), labels),
                        Measurement("probe_bulk_residual", bulk_residual(g, dominant),
                                    labels)]
            reference = self.references.get(name)
            if reference is None and ctx.step >= self.retention_warmup_step:
                reference = references[name] = RetentionReference.take(
                    g, config.probe_rank, ctx.step)
            if reference is not None:
                out.append(Measurement("probe_retention", reference.retention(g), labels))
        # Complete: only now does the estimator's own state move.
        self.references.update(references)
        out += self._interference(ctx.step, parameters)
        self.interference_starts.append(InterferenceStart(ctx.step, parameters,
                                                          dataset_gradients))
        return finite(out)

    def _dataset_gradient_units(self, functional: FunctionalModel, point: Params,
                                probe: Probe, chunk: int) -> Units[torch.Tensor]:
        """S g_R: the sketch of the gradient of the probe's mean loss (dataset labels) at
        ``point``, one chunk of examples per unit. The sketch is linear, so the chunks'
        sketches weighted by their share of the loss add up to the whole probe's."""
        names = self.shared.parameters.names
        total: torch.Tensor | None = None
        for objective, share in loss_chunks(functional, self.shared.likelihood,
                                            (probe.inputs, probe.targets), chunk):
            leaves = {n: t.detach().clone().requires_grad_(True) for n, t in point.items()}
            grads = torch.autograd.grad(objective(leaves), [leaves[n] for n in names],
                                        allow_unused=True)
            sketch = share * self.shared.sketcher.sketch(list(grads), dtype=torch.float64)
            total = sketch if total is None else total + sketch
            yield
        assert total is not None
        return total

    def _interference(self, step: int, parameters: torch.Tensor) -> list[Measurement]:
        """Closes every window that is long enough; the latest one closed is reported."""
        horizon = max(1, self.shared.config.probe_interference_horizon)
        ready = [s for s in self.interference_starts if step - s.step >= horizon]
        if not ready:
            return []
        self.interference_starts = [s for s in self.interference_starts
                                    if step - s.step < horizon]
        start = ready[-1]
        descent = start.parameters - parameters
        return [Measurement("probe_interference", cosine(gradient, descent),
                            (("probe", name),))
                for name, gradient in start.gradients.items()]

    def state_dict(self) -> dict[str, Any]:
        return {"references": {n: r.state_dict() for n, r in self.references.items()},
                "interference_starts": [s.state_dict() for s in self.interference_starts],
                "offsets": self.subsample.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.references = {n: RetentionReference.from_state(dict(r))
                           for n, r in state.get("references", {}).items()}
        device = self.shared.parameters.device
        self.interference_starts = [InterferenceStart.from_state(s, device)
                                    for s in state.get("interference_starts", [])]
        self.subsample.load_state_dict(state.get("offsets", {}))
