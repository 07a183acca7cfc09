"""Builds the default estimators and the state they share.

A new default estimator is one module beside this one and one line in
:func:`build_default_estimators`.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping

import torch
from torch import nn

from raresignal.agent.api import Estimator, ForwardFn, Probe, default_forward
from raresignal.agent.estimators.config import EstimatorConfig
from raresignal.agent.estimators.default.fisher import FisherEstimator
from raresignal.agent.estimators.default.gradient_stats import GradientStatsEstimator
from raresignal.agent.estimators.default.gradient_subspace import GradientSubspaceEstimator
from raresignal.agent.estimators.default.noise_scale import NoiseScaleEstimator
from raresignal.agent.estimators.default.probe_loss import (
    CommonProbeLossEstimator,
    ProbeLossEstimator,
)
from raresignal.agent.estimators.default.probes import ProbeEstimator
from raresignal.agent.estimators.default.representation import RepresentationEstimator
from raresignal.agent.estimators.default.sharpness import SharpnessEstimator
from raresignal.agent.estimators.default.subspace_drift import SubspaceDriftEstimator
from raresignal.agent.estimators.default.unavailable import (
    FISHER,
    PROBE_FISHER,
    UnavailableSignalsEstimator,
)
from raresignal.agent.estimators.hvp import FORWARD_OVER_REVERSE, prepare_function_transforms
from raresignal.agent.estimators.likelihood import Likelihood, resolve_task
from raresignal.agent.estimators.objective import FunctionalModel, LossFn
from raresignal.agent.estimators.parameters import ParameterSet
from raresignal.agent.estimators.per_example import PerExampleGradients
from raresignal.agent.estimators.shared import FixedBatch, SharedState
from raresignal.agent.estimators.sketch import GradientSketcher
from raresignal.agent.estimators.subspace import DominantSubspace

log = logging.getLogger(__name__)


def build_shared_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                       common_probe: Probe | None, config: EstimatorConfig,
                       task: str | Likelihood | None = None,
                       forward: ForwardFn = default_forward,
                       loss_fn: LossFn | None = None) -> SharedState:
    """The objects several estimators read and write (``task`` and ``loss_fn`` as in
    :func:`build_default_estimators`)."""
    parameters = ParameterSet.from_model(model, config.param_groups)
    likelihood = resolve_task(task, loss_fn is not None)
    sketcher = GradientSketcher(parameters, config.sketch_dim, config.seed)
    sketcher.prepare()  # here, not inside the first training step the monitor measures
    functional = FunctionalModel(model, forward, parameters, loss_fn)
    if config.hvp_backend in ("auto", FORWARD_OVER_REVERSE) or (
            likelihood is not None and config.per_example_method != "loop"):
        prepare_function_transforms()  # torch.func's one-time costs, not in a step
    # Importing torch (and torch._dynamo, which torch.func and many models import) leaves
    # some 10^5 long-lived objects the cyclic garbage collector has not yet passed over
    # in full; the estimators' first runs allocate enough to make that full collection
    # (a pass over every object of the process) land in one of the first training steps.
    # Run it here instead.
    gc.collect()
    per_example = None if likelihood is None else PerExampleGradients(
        functional, likelihood, sketcher, config.per_example_chunk,
        config.per_example_method)
    return SharedState(
        model=model, optimizer=optimizer, forward=forward, likelihood=likelihood,
        config=config, parameters=parameters, sketcher=sketcher,
        dominant=DominantSubspace(config.sketch_dim, config.fd_rows, config.subspace_rank,
                                  config.fd_decay, parameters.device),
        functional=functional,
        per_example=per_example,
        curvature_batch=FixedBatch.from_probe(common_probe, config.curvature_batch_size),
    )


def build_default_estimators(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    probes: Mapping[str, Probe] | None = None,
    common_probe: Probe | None = None,
    config: EstimatorConfig | None = None,
    task: str | Likelihood | None = None,
    forward: ForwardFn = default_forward,
    loss_fn: LossFn | None = None,
) -> list[Estimator]:
    """Every default estimator, sharing one sketcher, one dominant subspace, one probe batch.

    ``task`` names the model's likelihood, which the true Fisher samples labels from:
    "classification" (logits [N, C], class targets; the default), "causal_lm" (logits
    [N, T, V] aligned with targets, -100 unscored), "masked_lm" (the same, targets only at
    masked positions), "regression" (outputs and targets alike, Gaussian with variance 1;
    ``GaussianLikelihood(variance=...)`` for another), "multi_label" (logits and 0/1
    targets [N, K], one Bernoulli per output), or any ``Likelihood``.

    For a loss with no likelihood (contrastive, diffusion, custom) pass
    ``loss_fn(model, inputs, targets) -> scalar`` (task "custom", implied when no task is
    given): sharpness, drift, noise scale and probe loss and interference come from that
    loss; the Fisher estimator and the probes' sampled-label geometry (Fisher mass,
    absorption, bulk residual, retention) are left out, logged once here and reported as
    ``agent_estimator_unavailable{estimator}``. A ``loss_fn`` with a likelihood task uses
    the ``loss_fn`` as the loss and the likelihood for the Fisher.

    Probe estimators run only when probes are given; representation rank only when
    ``config.representation_layer`` is set and a probe exists to run it on.
    """
    config = config or EstimatorConfig()
    probes = dict(probes or {})
    if common_probe is not None and config.common_probe_name in probes:
        raise ValueError(f"probe name {config.common_probe_name!r} is taken by the common "
                         "probe; rename the probe or set EstimatorConfig.common_probe_name")
    for name, probe in probes.items():
        if not isinstance(probe, Probe) or len(probe) == 0:
            raise ValueError(f"probe {name!r} must be a non-empty Probe")
    shared = build_shared_state(model, optimizer, common_probe, config, task, forward,
                                loss_fn)
    estimators: list[Estimator] = [
        GradientStatsEstimator(shared),
        NoiseScaleEstimator(shared),
        GradientSubspaceEstimator(shared),
        SubspaceDriftEstimator(shared),
        SharpnessEstimator(shared),
    ]
    if shared.per_example is not None:
        estimators.append(FisherEstimator(shared))
    if probes:
        estimators += [ProbeLossEstimator(shared, probes),
                       ProbeEstimator(shared, probes, common_probe)]
        if common_probe is not None:
            estimators.append(CommonProbeLossEstimator(shared, common_probe))
    unavailable = _unavailable_signals(shared, bool(probes))
    if unavailable:
        estimators.append(UnavailableSignalsEstimator(shared, unavailable))
    representation_probe = common_probe or next(iter(probes.values()), None)
    if config.representation_layer is not None and representation_probe is not None:
        estimators.append(RepresentationEstimator(shared, config.representation_layer,
                                                  representation_probe))
    return _without_whole_parameter_estimators(estimators, shared)


def _unavailable_signals(shared: SharedState, has_probes: bool) -> list[str]:
    """The Fisher-based signals a run with no likelihood cannot have: noted in
    ``shared.notes`` and logged once, here, at build time."""
    if shared.per_example is not None:
        return []
    signals = [FISHER] + ([PROBE_FISHER] if has_probes else [])
    for signal in signals:
        shared.notes[f"{signal}.unavailable"] = "no likelihood (loss_fn)"
    log.info("raresignal: %s unavailable: they sample labels from the model's likelihood, "
             "and a loss_fn has none (pass a task with a likelihood to have them)",
             " and ".join(signals))
    return signals


def _without_whole_parameter_estimators(estimators: list[Estimator], shared: SharedState
                                        ) -> list[Estimator]:
    """Under FSDP (sharded parameters) the estimators that need every value of a parameter
    in one process (HVPs, per-example gradients) are left out rather than gather the
    model. The parameters' types decide, so every rank leaves out the same ones and no
    collective goes unmatched; each is noted in ``shared.notes`` and logged once."""
    if not shared.parameters.sharded:
        return estimators
    kept = []
    for estimator in estimators:
        if estimator.needs_whole_parameters:
            shared.notes[f"{estimator.name}.skipped"] = "parameters sharded"
            log.info("raresignal: %s is off: the parameters are sharded (FSDP) and it needs "
                     "whole parameters in one process", estimator.name)
        else:
            kept.append(estimator)
    return kept
