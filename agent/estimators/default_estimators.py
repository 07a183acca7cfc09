"""The default estimators: each wraps one measurement as an ``Estimator``.

Every ``run`` reads the step context, measures inside ``preserved_training_state`` where
it runs the model, and returns catalogue measurements. Work shared between estimators
goes through ``SharedState`` and ``ctx.cache``.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from raresignal.agent.api import Measurement, Probe, StepContext
from raresignal.agent.estimators.fisher import (
    group_traces,
    sample_model_labels,
    sketched_spectrum,
)
from raresignal.agent.estimators.gradient_stats import (
    UpdateRatioTracker,
    gradient_norm_and_nonfinite,
    parameter_sketch,
)
from raresignal.agent.estimators.hvp import HessianVectorProduct, auto_hvp, make_hvp
from raresignal.agent.estimators.isolation import preserved_training_state
from raresignal.agent.estimators.likelihood import mean_nll
from raresignal.agent.estimators.noise_scale import (
    NoiseScaleEMA,
    half_batch_norms,
    two_batch_estimate,
)
from raresignal.agent.estimators.objective import BatchObjective, to_device
from raresignal.agent.estimators.probes import (
    RetentionReference,
    absorption,
    bulk_residual,
    cosine,
    fisher_mass,
)
from raresignal.agent.estimators.representation import capture_features, representation_stats
from raresignal.agent.estimators.shared import LOCAL_GRAD_SQ_NORM_KEY, SharedState
from raresignal.agent.estimators.sharpness import (
    SharpnessTracker,
    adam_preconditioner,
    curvature_trace,
    optimizer_profile,
    preconditioned,
)
from raresignal.agent.estimators.subspace import (
    chance_corrected_overlap,
    orthonormal_rows_basis,
    principal_angles,
)

log = logging.getLogger(__name__)


def _finite(measurements: list[Measurement]) -> list[Measurement]:
    """Drops values that are not finite: they mean 'not measurable now', not a reading."""
    return [m for m in measurements if math.isfinite(m.value)]


class GradientStatsEstimator:
    """Loss, pre-clip gradient norm, update/weight ratio, learning rate, non-finite count."""

    name = "gradient_stats"
    expensive = False

    def __init__(self, shared: SharedState) -> None:
        self.shared = shared
        self.default_interval = shared.config.gradient_stats_interval
        self.updates = UpdateRatioTracker(shared.sketcher,
                                           every=shared.config.update_ratio_interval)
        self.nonfinite_steps = 0

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        grad_norm, bad = gradient_norm_and_nonfinite(self.shared.parameters)
        out = [Measurement("grad_norm", grad_norm)]
        if ctx.loss is not None:
            loss = float(ctx.loss.detach().float().mean())
            bad += 0 if math.isfinite(loss) else 1
            out.append(Measurement("loss", loss))
        self.nonfinite_steps += 1 if bad else 0
        out += [Measurement("nonfinite_values", float(bad)),
                Measurement("nonfinite_steps_total", float(self.nonfinite_steps))]
        _, ratio = self.updates.observe(ctx.step)
        if ratio is not None:
            out.append(Measurement("update_to_weight_ratio", ratio))
        optimizer = ctx.optimizer or self.shared.optimizer
        if optimizer is not None and optimizer.param_groups:
            lr = optimizer.param_groups[0].get("lr")
            if lr is not None:
                out.append(Measurement("learning_rate", float(lr)))
        # Non-finite loss and grad norm are reported: they are the reading that matters.
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))


class NoiseScaleEstimator:
    """B_simple: per-rank vs all-reduced norms when the runtime provides them, else halves.
    Off under FSDP (sharded parameters): the half-batch gradients need whole parameters."""

    name = "noise_scale"
    expensive = True
    needs_whole_parameters = True

    def __init__(self, shared: SharedState) -> None:
        self.shared = shared
        self.default_interval = shared.config.noise_scale_interval
        self.ema = NoiseScaleEMA(shared.config.noise_scale_ema)

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        dist = ctx.distributed
        local_sq = ctx.cache.get(LOCAL_GRAD_SQ_NORM_KEY)
        if dist.is_distributed and local_sq is not None and ctx.batch_size:
            device = self.shared.parameters.device
            mean_local = dist.all_reduce_sum(
                torch.tensor([float(local_sq)], dtype=torch.float64, device=device))
            small_sq = float(mean_local[0]) / dist.world_size
            big_sq = float(self.shared.parameters.flatten(self.shared.parameters.grads())
                           .pow(2).sum())
            b_small = float(ctx.batch_size)
            estimate = two_batch_estimate(small_sq, big_sq, b_small, b_small * dist.world_size)
        else:
            if ctx.batch is None or int(ctx.batch[1].shape[0]) < 2:
                return []
            inputs, targets = ctx.batch
            n = int(targets.shape[0]) // 2
            order = torch.randperm(2 * n, generator=self.shared.generator(ctx.step))
            order = order.to(targets.device)
            with preserved_training_state(self.shared.model):
                small_sq, big_sq, b_small, b_big = half_batch_norms(
                    self.shared.functional, self.shared.likelihood, inputs, targets,
                    order[:n], order[n:])
            if dist.is_distributed:  # every rank saw different data: average the norms
                both = dist.all_reduce_sum(torch.tensor([small_sq, big_sq],
                                                        dtype=torch.float64))
                small_sq, big_sq = (float(v) / dist.world_size for v in both)
            estimate = two_batch_estimate(small_sq, big_sq, b_small, b_big)
        return _finite([Measurement("gradient_noise_scale", self.ema.update(estimate))])

    def state_dict(self) -> dict[str, Any]:
        return {"grad_sq": self.ema.grad_sq, "trace_sigma": self.ema.trace_sigma}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ema.grad_sq = state.get("grad_sq")
        self.ema.trace_sigma = state.get("trace_sigma")


class GradientSubspaceEstimator:
    """Feeds the step's gradient sketch into the Frequent Directions sketch (no output)."""

    name = "gradient_subspace"
    expensive = False

    def __init__(self, shared: SharedState) -> None:
        self.shared = shared
        self.default_interval = shared.config.subspace_interval

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        sketch = self.shared.step_gradient_sketch(ctx)
        if sketch is not None and bool(torch.isfinite(sketch).all()):
            self.shared.dominant.insert(sketch)
        return []

    def state_dict(self) -> dict[str, Any]:
        return self.shared.dominant.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.shared.dominant.load_state_dict(dict(state))


class SubspaceDriftEstimator:
    """Chance-corrected overlap and largest principal angle of U_dom now vs last run."""

    name = "subspace_drift"
    expensive = False

    def __init__(self, shared: SharedState) -> None:
        self.shared = shared
        self.default_interval = shared.config.drift_interval
        self.previous: torch.Tensor | None = None

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        if not self.shared.dominant.ready:
            return []
        current = self.shared.dominant.basis().clone()
        previous, self.previous = self.previous, current
        if previous is None or previous.shape != current.shape:
            return []
        angles = principal_angles(current, previous)
        return _finite([
            Measurement("subspace_overlap", chance_corrected_overlap(current, previous)),
            Measurement("subspace_max_angle_radians", float(angles[0])),
        ])

    def state_dict(self) -> dict[str, Any]:
        return {"previous": None if self.previous is None else self.previous.cpu()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        previous = state.get("previous")
        self.previous = None if previous is None else previous.to(self.shared.parameters.device)


class SharpnessEstimator:
    """lambda_max (and Adam's preconditioned lambda_1) with its stability threshold, and the
    Hessian trace, on the fixed curvature batch. Off under FSDP (sharded parameters):
    HVPs need whole parameters."""

    name = "sharpness"
    expensive = True
    needs_whole_parameters = True

    def __init__(self, shared: SharedState) -> None:
        self.shared = shared
        config = shared.config
        self.default_interval = config.sharpness_interval
        # Nothing to measure before the warm-up ends (see EstimatorConfig).
        self.first_step = config.sharpness_warmup_steps
        dim = shared.parameters.numel
        self.plain = SharpnessTracker(dim, config.seed, config.sharpness_cold_iterations,
                                      config.sharpness_warm_iterations, config.sharpness_tol)
        self.adam = SharpnessTracker(dim, config.seed + 1, config.sharpness_cold_iterations,
                                     config.sharpness_warm_iterations, config.sharpness_tol)
        self.backend: str | None = None if config.hvp_backend == "auto" else config.hvp_backend

    def _hvp(self, objective: BatchObjective) -> HessianVectorProduct:
        params = self.shared.parameters
        if self.backend is None:
            operator, rejected = auto_hvp(objective, params, seed=self.shared.config.seed)
            self.backend = operator.backend
            self.shared.notes["hvp_backend"] = operator.backend
            log.info("sharpness uses the %s HVP backend (rejected: %s)", operator.backend,
                     rejected or "none")
            return operator
        return make_hvp(self.backend, objective, params)

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        config = self.shared.config
        batch = self.shared.curvature_batch.get(ctx)
        if batch is None or ctx.step < config.sharpness_warmup_steps:
            return []
        device = self.shared.parameters.device
        with preserved_training_state(self.shared.model):
            objective = BatchObjective(self.shared.functional, self.shared.likelihood, *batch)
            hvp = self._hvp(objective)
            top = self.plain.estimate(hvp, device)
            out = [Measurement("sharpness", top.value),
                   Measurement("hvp_count", float(top.matvecs))]
            profile = optimizer_profile(ctx.optimizer or self.shared.optimizer)
            threshold = profile.stability_threshold()
            compared = top.value
            if profile.preconditioned:
                optimizer = ctx.optimizer or self.shared.optimizer
                diagonal = (adam_preconditioner(optimizer, self.shared.parameters)
                            if optimizer is not None else None)
                if diagonal is None:
                    compared = math.nan  # before Adam's first step there is no P yet
                else:
                    pre = self.adam.estimate(preconditioned(hvp, diagonal), device)
                    compared = pre.value
                    out.append(Measurement("preconditioned_sharpness", pre.value))
            if threshold is not None:
                out += [Measurement("sharpness_threshold", threshold),
                        Measurement("sharpness_ratio", compared / threshold)]
            if config.hutchinson_samples > 0:
                trace = curvature_trace(hvp, config.hutchinson_samples, config.trace_method,
                                        self.shared.generator(ctx.step, 7))
                out.append(Measurement("hessian_trace", trace))
        return _finite(out)

    def state_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "previous": None if self.plain.previous is None else self.plain.previous.cpu(),
            "previous_adam": None if self.adam.previous is None else self.adam.previous.cpu(),
            "relative_gap": self.plain.relative_gap,
            "relative_gap_adam": self.adam.relative_gap,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.backend = state.get("backend", self.backend)
        self.plain.previous = state.get("previous")
        self.adam.previous = state.get("previous_adam")
        self.plain.relative_gap = state.get("relative_gap")
        self.adam.relative_gap = state.get("relative_gap_adam")


class FisherEstimator:
    """Per-group traces of the true Fisher (and, beside them, the empirical Fisher), and the
    top of the sketched Fisher spectrum with its effective rank. Off under FSDP (sharded
    parameters): per-example gradients need whole parameters."""

    name = "fisher"
    expensive = True
    needs_whole_parameters = True

    def __init__(self, shared: SharedState) -> None:
        self.shared = shared
        self.default_interval = shared.config.fisher_interval

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        config = self.shared.config
        batch = self.shared.curvature_batch.get(ctx)
        if batch is None:
            return []
        inputs, targets = batch
        engine = self.shared.per_example
        with preserved_training_state(self.shared.model):
            drawn_inputs, labels = sample_model_labels(
                engine, inputs, targets, self.shared.generator(ctx.step, 11),
                config.fisher_label_draws)
            summary = engine.summarize(drawn_inputs, labels)
            out = [Measurement("fisher_trace", value, (("group", group),))
                   for group, value in group_traces(summary).items()]
            spectrum = sketched_spectrum(summary, config.fisher_top_k)
            if spectrum.eigenvalues.numel():
                out.append(Measurement("fisher_top_eigenvalue", float(spectrum.eigenvalues[0])))
            out.append(Measurement("fisher_effective_rank", spectrum.effective_rank))
            if config.empirical_fisher:
                empirical = engine.summarize(inputs, targets)
                out += [Measurement("empirical_fisher_trace", value, (("group", group),))
                        for group, value in group_traces(empirical).items()]
        return _finite(out)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


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


class ProbeEstimator:
    """Rare-signal geometry of each probe set against the common probe and U_dom. Off under
    FSDP (sharded parameters): per-example gradients need whole parameters.

    Interference is cos(g_R(theta_s), -(theta_t - theta_s)): the probe's mean gradient at
    an earlier measurement s against the net update training applied from s to now, t (at
    least ``probe_interference_horizon`` steps later; 0: since the last measurement). Its
    sign is the sign of the first-order change of the probe's loss over those updates.
    The update is read from two parameter sketches (one pass over the weights per probe
    run; the sketch is linear, so their difference is the update's sketch), so it holds
    the optimizer's momentum, preconditioning, clipping and weight decay; the design's
    cosine with one batch's gradient mostly tells which examples that batch drew: with a
    3 % rare slice it swung between -0.95 and +0.95 from step to step in the detection
    benchmark, and it cannot see an over-regularising weight decay at all. The net update
    over a window also averages out the step-to-step noise around equilibrium (for SGD
    over one step the two definitions are the same).
    """

    name = "probes"
    expensive = True
    needs_whole_parameters = True

    def __init__(self, shared: SharedState, probes: Mapping[str, Probe],
                 common: Probe | None) -> None:
        self.shared = shared
        self.default_interval = shared.config.probes_interval
        self.probes = dict(probes)
        self.common = common
        self.references: dict[str, RetentionReference] = {}
        self.interference_starts: list[InterferenceStart] = []

    def _label_seed(self, name: str) -> int:
        # Fixed per probe: the same uniforms every time (common random numbers), so the
        # sampled-label noise largely cancels between two measurements of one probe.
        return zlib.crc32(name.encode())

    def _measure(self, name: str, probe: Probe) -> tuple[list[Measurement], dict[str, Any]]:
        engine, likelihood = self.shared.per_example, self.shared.likelihood
        labels = (("probe", name),)
        logits = engine.logits(probe.inputs)
        targets = probe.targets.to(logits.device)
        counts = likelihood.counts(targets).sum().clamp(min=1.0)
        loss = float(mean_nll(likelihood, logits, targets))
        accuracy = float(likelihood.correct(logits, targets).sum() / counts)
        _, sampled = sample_model_labels(engine, probe.inputs, targets,
                                         self.shared.generator(self._label_seed(name)))
        summary = engine.summarize(probe.inputs, sampled)
        mass = fisher_mass(summary.sq_norms, summary.counts)
        out = [Measurement("probe_loss", loss, labels),
               Measurement("probe_accuracy", accuracy, labels),
               Measurement("probe_fisher_mass", mass, labels)]
        return out, {"mass": mass, "sketches": summary.sketches}

    def _dataset_gradient_sketch(self, probe: Probe) -> torch.Tensor:
        """S g_R: the sketch of the gradient of the probe's mean loss (dataset labels)."""
        objective = BatchObjective(self.shared.functional, self.shared.likelihood,
                                   probe.inputs, probe.targets)
        params = self.shared.parameters
        leaves = {n: t.requires_grad_(True) for n, t in
                  ((n, t.detach().clone()) for n, t in params.fp32_detached().items())}
        grads = torch.autograd.grad(objective(leaves), [leaves[n] for n in params.names],
                                    allow_unused=True)
        return self.shared.sketcher.sketch(list(grads), dtype=torch.float64)

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        config = self.shared.config
        dominant = self.shared.dominant.basis() if self.shared.dominant.ready else None
        out: list[Measurement] = []
        dataset_gradients: dict[str, torch.Tensor] = {}
        named = dict(self.probes)
        if self.common is not None:  # measured first, and like any probe, as the baseline
            named = {config.common_probe_name: self.common, **named}
        with preserved_training_state(self.shared.model):
            common_mass = None
            for name, probe in named.items():
                measured, info = self._measure(name, probe)
                out += measured
                labels = (("probe", name),)
                g = info["sketches"]
                if self.common is not None and name == config.common_probe_name:
                    common_mass = info["mass"]
                elif common_mass is not None and common_mass > 0:
                    out.append(Measurement("probe_fisher_mass_ratio",
                                           info["mass"] / common_mass, labels))
                if dominant is not None and dominant.shape[1] > 0:
                    basis = orthonormal_rows_basis(g, config.probe_rank)
                    out += [Measurement("probe_absorption", absorption(dominant, basis), labels),
                            Measurement("probe_bulk_residual", bulk_residual(g, dominant),
                                        labels)]
                if name not in self.references and ctx.step >= config.retention_warmup_step:
                    self.references[name] = RetentionReference.take(g, config.probe_rank,
                                                                    ctx.step)
                if name in self.references:
                    out.append(Measurement("probe_retention",
                                           self.references[name].retention(g), labels))
                dataset_gradients[name] = self._dataset_gradient_sketch(probe)
        parameters = parameter_sketch(self.shared.sketcher)
        out += self._interference(ctx.step, parameters)
        self.interference_starts.append(InterferenceStart(ctx.step, parameters,
                                                          dataset_gradients))
        return _finite(out)

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
                "interference_starts": [s.state_dict() for s in self.interference_starts]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.references = {n: RetentionReference.from_state(dict(r))
                           for n, r in state.get("references", {}).items()}
        device = self.shared.parameters.device
        self.interference_starts = [InterferenceStart.from_state(s, device)
                                    for s in state.get("interference_starts", [])]


class RepresentationEstimator:
    """Effective rank, stable rank and dormant fraction of one layer's features on a probe."""

    name = "representation"
    expensive = False

    def __init__(self, shared: SharedState, layer: str, probe: Probe) -> None:
        shared.model.get_submodule(layer)  # fails early, naming the layer, if it is absent
        self.shared = shared
        self.layer = layer
        self.probe = probe
        self.default_interval = shared.config.representation_interval

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        model = self.shared.model
        inputs = to_device(self.probe.inputs, self.shared.parameters.device)
        with preserved_training_state(model):
            features = capture_features(model, self.layer,
                                        lambda: self.shared.forward(model, inputs))
        stats = representation_stats(features, self.shared.config.dormant_threshold)
        labels = (("layer", self.layer),)
        return _finite([
            Measurement("representation_effective_rank", stats.effective_rank, labels),
            Measurement("representation_stable_rank", stats.stable_rank, labels),
            Measurement("representation_dormant_fraction", stats.dormant_fraction, labels),
        ])

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None
