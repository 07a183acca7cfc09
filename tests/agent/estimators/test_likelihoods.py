"""Regression, multi-label and masked-LM likelihoods: the true Fisher each gives against the
exact Fisher of a model small enough to compute it (closed form or enumerated labels)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from estimator_models import call
from torch import nn

from raresignal.agent.estimators.fisher import group_traces, sample_model_labels
from raresignal.agent.estimators.likelihood import (
    BernoulliLikelihood,
    GaussianLikelihood,
    MaskedLMLikelihood,
    likelihood_for_task,
    mean_nll,
)
from raresignal.agent.estimators.objective import FunctionalModel
from raresignal.agent.estimators.parameters import ParameterSet
from raresignal.agent.estimators.per_example import PerExampleGradients
from raresignal.agent.estimators.sketch import GradientSketcher


def _engine(model: nn.Module, likelihood) -> tuple[PerExampleGradients, ParameterSet]:
    model.eval()
    params = ParameterSet.from_model(model)
    functional = FunctionalModel(model, call, params)
    return PerExampleGradients(functional, likelihood, GradientSketcher(params, 256), 64,
                               "auto"), params


def _group_grads(params: ParameterSet, scalar: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradient of ``scalar``, flattened per layer group, in fp64."""
    grads = torch.autograd.grad(scalar, params.params, retain_graph=True)
    out: dict[str, list[torch.Tensor]] = {}
    for g, group in zip(grads, params.groups, strict=True):
        out.setdefault(group, []).append(g.double().reshape(-1))
    return {group: torch.cat(parts) for group, parts in out.items()}


def _assert_within_three_sigma(estimate: dict, exact: dict, variance: dict, terms: int,
                               examples: int) -> None:
    """The estimate is a mean over ``terms`` independent sampled-label draws per example;
    its std follows from the exact per-example variances. 3 sigma must fit within 5% of
    the exact value, and (a fixed seed) the estimate must land inside it."""
    for g, value in exact.items():
        sigma = math.sqrt(variance[g] / terms) / examples
        assert 3 * sigma <= 0.05 * value, (g, sigma, value)
        assert abs(estimate[g] - value) <= 3 * sigma, (g, estimate[g], value)


def test_gaussian_traces_match_the_closed_form_fisher(mlp, classification_batch) -> None:
    x, _ = classification_batch
    variance_setting = 0.5
    engine, params = _engine(mlp, GaussianLikelihood(variance=variance_setting))
    # With y ~ N(f, s I), g = J^T (y - f) / s, so per example and group the exact Fisher
    # trace is tr(J J^T) / s and |g|^2 has variance 2 tr((J J^T)^2) / s^2.
    outputs = mlp(x)
    exact = {g: 0.0 for g in params.group_names}
    variance = {g: 0.0 for g in params.group_names}
    for i in range(x.shape[0]):
        rows = [_group_grads(params, outputs[i, k]) for k in range(outputs.shape[1])]
        for g in params.group_names:
            jacobian = torch.stack([row[g] for row in rows])
            gram = jacobian @ jacobian.T
            exact[g] += float(gram.trace()) / variance_setting / x.shape[0]
            variance[g] += 2 * float((gram @ gram).trace()) / variance_setting ** 2
    draws = 200
    targets = torch.zeros_like(outputs.detach())
    inputs, labels = sample_model_labels(engine, x, targets, torch.Generator().manual_seed(3),
                                         draws)
    assert labels.shape == (x.shape[0] * draws, outputs.shape[1])
    estimate = group_traces(engine.summarize(inputs, labels))
    _assert_within_three_sigma(estimate, exact, variance, draws, x.shape[0])


def test_bernoulli_traces_match_the_fisher_over_every_label_set(
        mlp, classification_batch) -> None:
    x, _ = classification_batch
    engine, params = _engine(mlp, BernoulliLikelihood())
    logits = mlp(x)
    labels_count = logits.shape[1]
    exact = {g: 0.0 for g in params.group_names}
    variance = {g: 0.0 for g in params.group_names}
    every_label_set = torch.tensor(list(itertools.product([0.0, 1.0], repeat=labels_count)))
    for i in range(x.shape[0]):
        # log p(y|x) = sum_k y_k log s(z_k) + (1 - y_k) log s(-z_k), for all 2^K label sets.
        log_p = (every_label_set * F.logsigmoid(logits[i])
                 + (1 - every_label_set) * F.logsigmoid(-logits[i])).sum(dim=1)
        p = log_p.detach().exp().double()
        norms = [{g: float(v.pow(2).sum()) for g, v in _group_grads(params, lp).items()}
                 for lp in log_p]
        for g in params.group_names:
            values = torch.tensor([n[g] for n in norms], dtype=torch.float64)
            mean = float((p * values).sum())
            exact[g] += mean / x.shape[0]
            variance[g] += float((p * (values - mean) ** 2).sum())
    draws = 100
    targets = torch.zeros_like(logits.detach())
    inputs, labels = sample_model_labels(engine, x, targets, torch.Generator().manual_seed(4),
                                         draws)
    assert set(labels.unique().tolist()) <= {0.0, 1.0}
    estimate = group_traces(engine.summarize(inputs, labels))
    _assert_within_three_sigma(estimate, exact, variance, draws, x.shape[0])


def test_masked_lm_traces_match_the_fisher_over_every_token(transformer, lm_batch) -> None:
    tokens, _ = lm_batch
    generator = torch.Generator().manual_seed(5)
    masked = torch.rand(tokens.shape, generator=generator) < 0.4
    masked[:, 0] = True  # every sequence scores at least one position
    targets = torch.where(masked, tokens, torch.full_like(tokens, -100))
    engine, params = _engine(transformer, MaskedLMLikelihood())
    # Given the inputs, the masked positions are independent categoricals: the per-sequence
    # Fisher trace is the sum over masked positions of each position's exact trace, and
    # the variance of one draw's |g|^2 is that of a sum of independent terms only where
    # their gradients do not overlap, so the spread of the draws is used as sigma instead.
    log_probs = torch.log_softmax(transformer(tokens), dim=-1)
    exact = {g: 0.0 for g in params.group_names}
    for i, t in masked.nonzero().tolist():
        p = log_probs[i, t].exp().detach().double()
        for v in range(log_probs.shape[-1]):
            for g, grad in _group_grads(params, log_probs[i, t, v]).items():
                exact[g] += float(p[v]) * float(grad.pow(2).sum())
    exact = {g: value / float(masked.sum()) for g, value in exact.items()}
    draws = 400
    inputs, labels = sample_model_labels(engine, tokens, targets,
                                         torch.Generator().manual_seed(6), draws)
    assert torch.equal(labels == -100, targets.repeat(draws, 1) == -100)
    summary = engine.summarize(inputs, labels)
    estimate = group_traces(summary)
    rows = summary.group_sq_norms.double() / summary.counts.sum().double() * labels.shape[0]
    for column, g in enumerate(summary.groups):
        sigma = float(rows[:, column].std()) / math.sqrt(rows.shape[0])
        assert 3 * sigma <= 0.05 * exact[g] or exact[g] < 1e-3 * sum(exact.values())
        assert abs(estimate[g] - exact[g]) <= max(3 * sigma, 1e-6), (g, estimate[g], exact[g])


def test_gaussian_loss_is_half_the_squared_error_over_the_variance() -> None:
    outputs = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    targets = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert float(mean_nll(GaussianLikelihood(), outputs, targets)) == pytest.approx(
        (1 + 4 + 0 + 4) / 2 / 2)
    assert float(mean_nll(GaussianLikelihood(variance=2.0), outputs, targets)) == (
        pytest.approx((1 + 4 + 0 + 4) / 4 / 2))
    assert torch.isnan(GaussianLikelihood().correct(outputs, targets)).all()
    with pytest.raises(ValueError, match="variance"):
        GaussianLikelihood(variance=0.0)


def test_bernoulli_accuracy_is_the_share_of_labels_right() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, -1.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert BernoulliLikelihood().correct(logits, targets).tolist() == pytest.approx(
        [2 / 3, 1.0])


def test_task_names_pick_the_likelihoods() -> None:
    assert isinstance(likelihood_for_task("regression"), GaussianLikelihood)
    assert likelihood_for_task("regression").variance == 1.0
    assert isinstance(likelihood_for_task("multi_label"), BernoulliLikelihood)
    assert isinstance(likelihood_for_task("masked_lm"), MaskedLMLikelihood)
    with pytest.raises(ValueError, match="masked_lm"):
        likelihood_for_task("masked")
