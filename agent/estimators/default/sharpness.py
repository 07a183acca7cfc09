"""The sharpness estimator: top Hessian eigenvalue against its stability threshold."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from raresignal.agent.api import Measurement, StepContext
from raresignal.agent.estimators.hvp import HessianVectorProduct, auto_hvp, make_hvp
from raresignal.agent.estimators.isolation import preserved_training_state
from raresignal.agent.estimators.objective import BatchObjective
from raresignal.agent.estimators.shared import DefaultEstimator, SharedState, finite
from raresignal.agent.estimators.sharpness import (
    SharpnessTracker,
    adam_preconditioner,
    curvature_trace,
    optimizer_profile,
    preconditioned,
)

log = logging.getLogger(__name__)


class SharpnessEstimator(DefaultEstimator):
    """lambda_max (and Adam's preconditioned lambda_1) with its stability threshold, and the
    Hessian trace, on the fixed curvature batch. Off under FSDP (sharded parameters):
    HVPs need whole parameters."""

    name = "sharpness"
    expensive = True
    needs_whole_parameters = True

    def __init__(self, shared: SharedState) -> None:
        super().__init__(shared, shared.config.sharpness_interval)
        config = shared.config
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
                   Measurement("hessian_vector_products", float(top.matvecs))]
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
        return finite(out)

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
