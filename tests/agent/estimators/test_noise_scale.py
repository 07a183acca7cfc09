"""Gradient noise scale against its exact value from all per-example gradients."""

from __future__ import annotations

import itertools

import pytest
import torch
from estimator_models import call

from raresignal.agent.estimators.likelihood import ClassificationLikelihood
from raresignal.agent.estimators.noise_scale import (
    NoiseEstimate,
    NoiseScaleEMA,
    half_batch_norms,
    two_batch_estimate,
)
from raresignal.agent.estimators.objective import FunctionalModel
from raresignal.agent.estimators.parameters import ParameterSet


def test_halves_estimator_averaged_over_every_split_is_exact(mlp, classification_batch) -> None:
    x, y = classification_batch
    x, y = x[:8], y[:8]
    mlp.eval()
    params = ParameterSet.from_model(mlp)
    functional = FunctionalModel(mlp, call, params)
    per_example = torch.stack([
        params.flatten(list(torch.autograd.grad(
            torch.nn.functional.cross_entropy(mlp(x[i : i + 1]), y[i : i + 1]), params.params)))
        for i in range(8)]).double()
    mean = per_example.mean(dim=0)
    # Exact finite-batch references: tr(Sigma) of the per-example gradients (unbiased,
    # 1/(B-1)), and the unbiased |G|^2 = |mean|^2 - tr(Sigma)/B.
    trace_sigma = float((per_example - mean).pow(2).sum() / 7)
    grad_sq = float(mean.pow(2).sum()) - trace_sigma / 8
    estimates = []
    for first in itertools.combinations(range(8), 4):
        second = [i for i in range(8) if i not in first]
        small, big, b, bb = half_batch_norms(functional, ClassificationLikelihood(), x, y,
                                             torch.tensor(first), torch.tensor(second))
        estimates.append(two_batch_estimate(small, big, b, bb))
    # Over all 70 equal splits, E|g_half|^2 = |mean|^2 + tr(Sigma)(B-b)/(bB) exactly
    # (sampling without replacement), and the estimators are linear in the norms, so the
    # split-average equals the references up to fp32 gradient rounding (~1e-6 relative).
    assert sum(e.trace_sigma for e in estimates) / 70 == pytest.approx(trace_sigma, rel=1e-4)
    assert sum(e.grad_sq for e in estimates) / 70 == pytest.approx(grad_sq, rel=1e-4)


def test_two_batch_formulas() -> None:
    # G and Sigma chosen so |G_b|^2 = |G|^2 + tr(Sigma)/b exactly.
    g2, s = 3.0, 12.0
    estimate = two_batch_estimate(g2 + s / 4, g2 + s / 32, 4, 32)
    assert estimate.grad_sq == pytest.approx(g2)
    assert estimate.trace_sigma == pytest.approx(s)
    with pytest.raises(ValueError, match="b_small < b_big"):
        two_batch_estimate(1.0, 1.0, 8, 8)


def test_ema_smooths_numerator_and_denominator_separately() -> None:
    ema = NoiseScaleEMA(decay=0.5)
    assert ema.update(NoiseEstimate(2.0, 10.0)) == pytest.approx(5.0)
    assert ema.update(NoiseEstimate(4.0, 2.0)) == pytest.approx((5 + 1) / (1 + 2))
    assert ema.update(NoiseEstimate(float("nan"), 1.0)) == pytest.approx(2.0)  # ignored
