"""Gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, appendix A).

|G_B|^2 measured at two batch sizes b < B gives unbiased estimates of the true squared
gradient norm and of the per-example covariance trace:
    |G|^2    ~ (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr Sigma ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)
Both are noisy, so each is smoothed by an EMA before taking the ratio, as the paper does.
The two sizes come for free under data parallelism (per rank vs all-reduced); otherwise
from the two halves of the batch (one extra forward/backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from raresignal.agent.api import Units, run_units
from raresignal.agent.estimators.likelihood import Likelihood
from raresignal.agent.estimators.objective import (
    FunctionalModel,
    Params,
    TrainingLoss,
    take,
    to_fp32_inputs,
)


@dataclass(frozen=True)
class NoiseEstimate:
    grad_sq: float  # unbiased |G|^2
    trace_sigma: float  # unbiased tr(Sigma)


def two_batch_estimate(small_sq: float, big_sq: float, b_small: float,
                       b_big: float) -> NoiseEstimate:
    """Unbiased |G|^2 and tr(Sigma) from squared gradient norms at two batch sizes."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got {b_small} and {b_big}")
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace_sigma = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return NoiseEstimate(grad_sq, trace_sigma)


def half_batch_norms(functional: FunctionalModel, likelihood: Likelihood | None, inputs: Any,
                     targets: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
                     ) -> tuple[float, float, float, float]:
    """(mean |g_half|^2, |g_union|^2, half size, union size) for two disjoint halves.

    Each half's gradient is that of its mean token loss (or of the ``loss_fn``); the
    union's is their token-weighted mean, i.e. the gradient of the mean loss over both
    halves.
    """
    return run_units(half_batch_norms_units(functional, likelihood, inputs, targets, first,
                                            second))


def half_batch_norms_units(functional: FunctionalModel, likelihood: Likelihood | None,
                           inputs: Any, targets: torch.Tensor, first: torch.Tensor,
                           second: torch.Tensor, point: Params | None = None,
                           ) -> Units[tuple[float, float, float, float]]:
    """:func:`half_batch_norms` at ``point`` (default: the live parameters), one half's
    gradient per unit."""
    training_loss = TrainingLoss(functional, likelihood)
    params = functional.parameters
    device = params.device
    inputs = to_fp32_inputs(inputs, device)
    targets = targets.to(device)
    point = point if point is not None else params.fp32_detached()
    grads, tokens = [], []
    for index in (first, second):
        leaves = {n: t.detach().requires_grad_(True) for n, t in point.items()}
        half_targets = targets[index]
        loss = training_loss(leaves, take(inputs, index), half_targets)
        g = torch.autograd.grad(loss, [leaves[n] for n in params.names], allow_unused=True)
        grads.append(params.flatten(list(g)))
        tokens.append(training_loss.weight(half_targets))
        yield
    union = (tokens[0] * grads[0] + tokens[1] * grads[1]) / (tokens[0] + tokens[1])
    small_sq = 0.5 * float(grads[0].pow(2).sum() + grads[1].pow(2).sum())
    size = float(first.numel())
    return small_sq, float(union.pow(2).sum()), size, size + float(second.numel())


@dataclass
class NoiseScaleEMA:
    """EMA of |G|^2 and tr(Sigma) separately; B_simple is the ratio of the two EMAs."""

    decay: float
    grad_sq: float | None = None
    trace_sigma: float | None = None

    def update(self, estimate: NoiseEstimate) -> float:
        if not (math.isfinite(estimate.grad_sq) and math.isfinite(estimate.trace_sigma)):
            return self.value
        if self.grad_sq is None or self.trace_sigma is None:
            self.grad_sq, self.trace_sigma = estimate.grad_sq, estimate.trace_sigma
        else:
            a = self.decay
            self.grad_sq = a * self.grad_sq + (1 - a) * estimate.grad_sq
            self.trace_sigma = a * self.trace_sigma + (1 - a) * estimate.trace_sigma
        return self.value

    @property
    def value(self) -> float:
        if self.grad_sq is None or self.trace_sigma is None or self.grad_sq <= 0:
            return float("nan")
        return self.trace_sigma / self.grad_sq
