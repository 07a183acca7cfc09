"""The sharpness estimator: top Hessian eigenvalue against its stability threshold.

Its measurement runs in units that the monitor may spread over several training steps:
the HVP backends' trials (backend "auto") and the operators' construction, one chunk's
operator per unit; each Hessian-vector product split over chunks of the curvature batch
(``EstimatorConfig.curvature_chunk_size``, ``unit_batch_fraction``; kept whole for a model
with batch norms, whose curvature is that of the training loss, see ``isolation``), one
chunk per unit (by finite differences, one of its two gradients per unit); the Lanczos
reorthogonalisation, the Ritz vector's assembly and Hutch++'s orthonormalisation, a block
of ``curvature_unit_vectors`` stored vectors per unit. Each unit names its kind, so the
monitor predicts its cost from earlier units of that kind.
The parameters and buffers are copied when it starts, so every product is taken at that
step's point and the result is exactly the one-shot measurement of that step, however
many steps it spans; the copy (one fp32 copy of the parameters) lives only while the
measurement does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from raresignal.agent.api import Measurement, MeasurementUnits, StepContext, Units, run_units
from raresignal.agent.estimators.hvp import (
    ChunkedHVP,
    auto_hvp_units,
    make_hvp,
    operator_kind,
)
from raresignal.agent.estimators.isolation import batch_norms, isolated_units
from raresignal.agent.estimators.objective import BatchObjective, Params, loss_chunks
from raresignal.agent.estimators.shared import DefaultEstimator, SharedState, finite
from raresignal.agent.estimators.sharpness import (
    SharpnessTracker,
    adam_preconditioner,
    curvature_trace_units,
    optimizer_profile,
    preconditioned_units,
)

log = logging.getLogger(__name__)

# The least work a lowered effort leaves: three Ritz values are the fewest that say
# anything about the eigen-gap, and Hutch++ needs three products.
MIN_LANCZOS_ITERATIONS = 3
MIN_TRACE_PRODUCTS = 3


def scaled_count(full: int, level: float, minimum: int) -> int:
    """``full`` scaled by ``level`` (rounded up), never under ``minimum`` unless ``full``
    itself is."""
    return max(min(full, minimum), math.ceil(level * full))


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
                                      config.sharpness_warm_iterations, config.sharpness_tol,
                                      config.curvature_unit_vectors)
        self.adam = SharpnessTracker(dim, config.seed + 1, config.sharpness_cold_iterations,
                                     config.sharpness_warm_iterations, config.sharpness_tol,
                                     config.curvature_unit_vectors)
        self.backend: str | None = None if config.hvp_backend == "auto" else config.hvp_backend
        self.trace_products = config.hutchinson_samples

    def set_effort(self, level: float) -> None:
        """Scales the work of the measurements that start from now on: 1.0 runs the
        configured Lanczos iterations and trace products, a lower level proportionally
        fewer (at least MIN_LANCZOS_ITERATIONS and MIN_TRACE_PRODUCTS; a trace configured
        off stays off). Levels outside [0, 1] are clipped."""
        if not math.isfinite(level):
            raise ValueError(f"effort level must be finite, got {level!r}")
        level = min(max(level, 0.0), 1.0)
        config = self.shared.config
        for tracker in (self.plain, self.adam):
            tracker.cold_iterations = scaled_count(config.sharpness_cold_iterations, level,
                                                   MIN_LANCZOS_ITERATIONS)
            tracker.warm_iterations = scaled_count(config.sharpness_warm_iterations, level,
                                                   MIN_LANCZOS_ITERATIONS)
        self.trace_products = scaled_count(config.hutchinson_samples, level,
                                           MIN_TRACE_PRODUCTS)

    def _hvp_units(self, chunks: list[tuple[BatchObjective, float]], point: Params
                   ) -> Units[ChunkedHVP]:
        params = self.shared.parameters
        (first, _), *rest = chunks
        if self.backend is None:
            operator, rejected = yield from auto_hvp_units(first, params, point,
                                                           seed=self.shared.config.seed)
            self.backend = operator.backend
            self.shared.notes["hvp_backend"] = operator.backend
            log.info("sharpness uses the %s HVP backend (rejected: %s)", operator.backend,
                     rejected or "none")
        else:
            yield operator_kind(self.backend)
            operator = make_hvp(self.backend, first, params, point)
        operators = [operator]
        for objective, _ in rest:
            yield operator_kind(self.backend)
            operators.append(operator.for_objective(objective))
        return ChunkedHVP(operators, [share for _, share in chunks])

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        return run_units(self.run_in_units(ctx))

    def run_in_units(self, ctx: StepContext) -> MeasurementUnits:
        """The measurement at ``ctx.step``, one Hessian-vector product per unit."""
        config = self.shared.config
        batch = self.shared.curvature_batch.get(ctx)
        if batch is None or ctx.step < config.sharpness_warmup_steps:
            return []
        # The Hessian of the loss training descends: batch norms on batch statistics.
        norms = batch_norms(self.shared.model)
        return (yield from isolated_units(self.shared.model,
                                          self._measure_units(ctx, batch, whole=bool(norms)),
                                          batch_statistics=norms))

    def _measure_units(self, ctx: StepContext, batch: tuple[Any, torch.Tensor],
                       whole: bool = False) -> MeasurementUnits:
        config = self.shared.config
        params = self.shared.parameters
        device = params.device
        # Copies, not views: the optimizer steps in place between units.
        point = params.fp32_copy()
        optimizer = ctx.optimizer or self.shared.optimizer
        profile = optimizer_profile(optimizer)
        diagonal = (adam_preconditioner(optimizer, params)
                    if profile.preconditioned and optimizer is not None else None)
        # A batch norm normalises each forward pass by its own examples: chunks of the
        # curvature batch would each be a different loss, so with batch norms it stays
        # whole (one HVP per unit, a longer unit than the stall bound plans for).
        chunk = (len(batch[1]) if whole
                 else self.shared.unit_examples(ctx, config.curvature_chunk_size))
        chunks = loss_chunks(self.shared.functional.with_frozen_buffers(),
                             self.shared.likelihood, batch, chunk)
        hvp = yield from self._hvp_units(chunks, point)
        top = yield from self.plain.estimate_units(hvp.units, device)
        pre = None
        if diagonal is not None:
            pre = yield from self.adam.estimate_units(
                preconditioned_units(hvp.units, diagonal), device)
        trace = None
        if self.trace_products > 0:
            trace = yield from curvature_trace_units(hvp.units, params.numel, device,
                                                     self.trace_products, config.trace_method,
                                                     self.shared.generator(ctx.step, 7),
                                                     config.curvature_unit_vectors)
        # Complete: only now do the warm starts move.
        self.plain.remember(top)
        if pre is not None:
            self.adam.remember(pre)
        out = [Measurement("sharpness", top.value),
               Measurement("hessian_vector_products", float(top.matvecs))]
        threshold = profile.stability_threshold()
        compared = top.value
        if profile.preconditioned:
            # Before Adam's first step there is no preconditioner yet.
            compared = math.nan if pre is None else pre.value
            if pre is not None:
                out.append(Measurement("preconditioned_sharpness", pre.value))
        if threshold is not None:
            out += [Measurement("sharpness_threshold", threshold),
                    Measurement("sharpness_ratio", compared / threshold)]
        if trace is not None:
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
