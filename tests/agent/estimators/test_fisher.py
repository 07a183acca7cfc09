"""True Fisher per layer group against the exact Fisher, by enumerating the labels."""

from __future__ import annotations

import math

import pytest
import torch
from estimator_models import call
from torch import nn

from raresignal.agent.estimators.fisher import (
    effective_rank,
    group_traces,
    sample_model_labels,
    sketched_spectrum,
)
from raresignal.agent.estimators.likelihood import CausalLMLikelihood, ClassificationLikelihood
from raresignal.agent.estimators.objective import FunctionalModel
from raresignal.agent.estimators.parameters import ParameterSet
from raresignal.agent.estimators.per_example import PerExampleGradients
from raresignal.agent.estimators.sketch import GradientSketcher


def _engine(model: nn.Module, likelihood, method: str = "auto", dim: int = 2048):
    model.eval()
    params = ParameterSet.from_model(model)
    functional = FunctionalModel(model, call, params)
    return PerExampleGradients(functional, likelihood, GradientSketcher(params, dim), 16,
                               method), params


def _group_sq_norm(model: nn.Module, params: ParameterSet, log_prob: torch.Tensor) -> dict:
    grads = torch.autograd.grad(log_prob, params.params, retain_graph=True)
    out: dict[str, float] = {}
    for g, group in zip(grads, params.groups, strict=True):
        out[group] = out.get(group, 0.0) + float(g.double().pow(2).sum())
    return out


def test_classification_traces_within_five_percent_of_the_exact_fisher(
        mlp, classification_batch) -> None:
    x, y = classification_batch
    engine, params = _engine(mlp, ClassificationLikelihood())
    # Exact: F_group = 1/N sum_i sum_c p(c|x_i) |grad_group log p(c|x_i)|^2, and the
    # variance of one sampled label's |g|^2 around it, per example.
    log_probs = torch.log_softmax(mlp(x), dim=-1)
    exact = {g: 0.0 for g in params.group_names}
    variance = {g: 0.0 for g in params.group_names}
    for i in range(x.shape[0]):
        per_class = [_group_sq_norm(mlp, params, log_probs[i, c]) for c in range(4)]
        p = log_probs[i].exp().detach().double()
        for g in params.group_names:
            values = torch.tensor([pc[g] for pc in per_class], dtype=torch.float64)
            mean = float((p * values).sum())
            exact[g] += mean / x.shape[0]
            variance[g] += float((p * (values - mean) ** 2).sum())
    draws = 40
    inputs, labels = sample_model_labels(engine, x, y, torch.Generator().manual_seed(0), draws)
    estimate = group_traces(engine.summarize(inputs, labels))
    assert set(estimate) == {"encoder", "head"}
    for g in params.group_names:
        # The estimate is a mean of N * draws independent sampled-label terms; its std
        # follows from the exact per-example variances. 3 sigma must fit within 5%, and
        # (a fixed seed) the estimate must land inside it.
        sigma = math.sqrt(variance[g] / draws) / x.shape[0]
        assert 3 * sigma <= 0.05 * exact[g]
        assert abs(estimate[g] - exact[g]) <= 3 * sigma, (g, estimate[g], exact[g])


def test_causal_lm_traces_within_five_percent_of_the_exact_fisher(transformer, lm_batch) -> None:
    tokens, targets = lm_batch
    engine, params = _engine(transformer, CausalLMLikelihood())
    # Token draws are independent given the (teacher-forced) context, so the per-sequence
    # Fisher trace is the sum over scored positions of each position's exact trace.
    log_probs = torch.log_softmax(transformer(tokens), dim=-1)
    scored = (targets != -100)
    exact = {g: 0.0 for g in params.group_names}
    for i, t in scored.nonzero().tolist():
        p = log_probs[i, t].exp().detach().double()
        for v in range(log_probs.shape[-1]):
            for g, value in _group_sq_norm(transformer, params, log_probs[i, t, v]).items():
                exact[g] += float(p[v]) * value
    exact = {g: value / float(scored.sum()) for g, value in exact.items()}
    draws = 400
    inputs, labels = sample_model_labels(engine, tokens, targets,
                                         torch.Generator().manual_seed(1), draws)
    assert torch.equal(labels == -100, targets.repeat(draws, 1) == -100)
    summary = engine.summarize(inputs, labels)
    estimate = group_traces(summary)
    rows = summary.group_sq_norms.double() / summary.counts.sum().double() * labels.shape[0]
    for column, g in enumerate(summary.groups):
        # Rows are independent draws; their spread around the overall mean overstates each
        # draw's own variance (it adds the between-sequence spread), a conservative sigma.
        sigma = float(rows[:, column].std()) / math.sqrt(rows.shape[0])
        assert 3 * sigma <= 0.05 * exact[g] or exact[g] < 1e-3 * sum(exact.values())
        assert abs(estimate[g] - exact[g]) <= max(3 * sigma, 1e-6), (g, estimate[g], exact[g])


def test_vmap_and_loop_give_the_same_per_example_gradients(transformer, lm_batch) -> None:
    tokens, targets = lm_batch
    vmapped, _ = _engine(transformer, CausalLMLikelihood(), "vmap")
    looped, _ = _engine(transformer, CausalLMLikelihood(), "loop")
    a, b = vmapped.summarize(tokens, targets), looped.summarize(tokens, targets)
    # Same gradients computed in a different order: fp32 summation differences only.
    torch.testing.assert_close(a.group_sq_norms, b.group_sq_norms, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(a.sketches, b.sketches, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.counts, torch.tensor([3.0] + [5.0] * 7))


def test_sketched_spectrum_matches_the_unsketched_one_within_the_jl_error(
        mlp, classification_batch) -> None:
    x, y = classification_batch
    engine, params = _engine(mlp, ClassificationLikelihood())
    summary = engine.summarize(x, y)
    rows = []
    for i in range(x.shape[0]):
        loss = nn.functional.cross_entropy(mlp(x[i : i + 1]), y[i : i + 1])
        rows.append(params.flatten(list(torch.autograd.grad(loss, params.params))))
    g = torch.stack(rows).double()
    exact = torch.linalg.eigvalsh(g @ g.T).flip(0) / x.shape[0]
    spectrum = sketched_spectrum(summary, k=4)
    trace = float(exact.sum())
    # Every Gram entry moves by at most 5 sqrt(2/d)|g_i||g_j| (5 std of CountSketch), so by
    # Weyl each eigenvalue moves by at most |dGram|_F / N <= 5 sqrt(2/d) * trace.
    bound = 5 * math.sqrt(2 / 2048) * trace
    assert spectrum.eigenvalues.shape == (4,)
    assert (spectrum.eigenvalues.double() - exact[:4]).abs().max() <= bound
    assert spectrum.effective_rank == pytest.approx(effective_rank(
        torch.linalg.svdvals(summary.sketches.double()).pow(2)), rel=1e-9)


def test_effective_rank_of_known_spectra() -> None:
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    assert effective_rank(p) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
