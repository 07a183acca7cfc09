"""The gradient noise scale estimator (B_simple, EMA-smoothed).

Without data parallelism its measurement is two forward/backward passes on the halves of
the step's batch, about one training step's work, so it runs in two units that the
monitor may spread over two steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from raresignal.agent.api import Measurement, MeasurementUnits, StepContext, run_units
from raresignal.agent.estimators.isolation import isolated_units
from raresignal.agent.estimators.noise_scale import (
    NoiseScaleEMA,
    half_batch_norms_units,
    two_batch_estimate,
)
from raresignal.agent.estimators.shared import (
    LOCAL_GRAD_SQ_NORM_KEY,
    DefaultEstimator,
    SharedState,
    copy_tensors,
    finite,
)


class NoiseScaleEstimator(DefaultEstimator):
    """B_simple: per-rank vs all-reduced norms when the runtime provides them, else halves.
    Off under FSDP (sharded parameters): the half-batch gradients need whole parameters."""

    name = "noise_scale"
    expensive = True
    needs_whole_parameters = True

    def __init__(self, shared: SharedState) -> None:
        super().__init__(shared, shared.config.noise_scale_interval)
        self.ema = NoiseScaleEMA(shared.config.noise_scale_ema)

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        return run_units(self.run_in_units(ctx))

    def run_in_units(self, ctx: StepContext) -> MeasurementUnits:
        """The measurement at ``ctx.step``: at once when the ranks' norms give it, else in
        two units, one half-batch gradient each, at the parameters, buffers and batch of
        that step (copied: training goes on between the two). The two halves' gradients
        must be taken at one point: their difference is what B_simple reads as noise."""
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
            return finite([Measurement("gradient_noise_scale", self.ema.update(estimate))])
        if ctx.batch is None or int(ctx.batch[1].shape[0]) < 2:
            return []
        inputs, targets = copy_tensors(ctx.batch)
        n = int(targets.shape[0]) // 2
        order = torch.randperm(2 * n, generator=self.shared.generator(ctx.step))
        order = order.to(targets.device)
        functional = self.shared.functional.with_frozen_buffers()
        point = self.shared.parameters.fp32_copy()
        small_sq, big_sq, b_small, b_big = yield from isolated_units(
            self.shared.model, half_batch_norms_units(functional, self.shared.likelihood,
                                                      inputs, targets, order[:n], order[n:],
                                                      point))
        if dist.is_distributed:  # every rank saw different data: average the norms
            both = dist.all_reduce_sum(torch.tensor([small_sq, big_sq], dtype=torch.float64))
            small_sq, big_sq = (float(v) / dist.world_size for v in both)
        estimate = two_batch_estimate(small_sq, big_sq, b_small, b_big)
        # Complete: only now does the EMA move.
        return finite([Measurement("gradient_noise_scale", self.ema.update(estimate))])

    def state_dict(self) -> dict[str, Any]:
        return {"grad_sq": self.ema.grad_sq, "trace_sigma": self.ema.trace_sigma}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ema.grad_sq = state.get("grad_sq")
        self.ema.trace_sigma = state.get("trace_sigma")
