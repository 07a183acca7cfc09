"""A planted rare slice: a softmax model whose rare class lives in its own input coordinates.

Common examples use input coordinates 0-9 (labels from a teacher over classes 0-3); rare
examples use coordinates 10-13 only (labels from their own teacher over all 5 classes: a
rule only the rare slice carries). Gradients of a bias-free linear softmax model are
(e_y - p) x^T, so rare and common gradients occupy disjoint weight columns (a 4 x 4 = 16
dimensional block for the rare slice, since the rows of e_y - p sum to zero), and we
control both their size and whether training moves the dominant subspace onto them.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raresignal.agent.api import Probe, StepContext
from raresignal.agent.estimators import EstimatorConfig, build_default_estimators
from raresignal.agent.estimators.default_estimators import (
    GradientSubspaceEstimator,
    ProbeEstimator,
)

COMMON, RARE = slice(0, 10), slice(10, 14)


def _data(n: int, rare: bool, seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 14)
    if rare:
        x[:, RARE] = scale * torch.randn(n, 4, generator=generator)
        teacher = torch.randn(4, 5, generator=torch.Generator().manual_seed(98))
        return x, (x[:, RARE] @ teacher).argmax(dim=1)
    x[:, COMMON] = torch.randn(n, 10, generator=generator)
    teacher = torch.randn(10, 4, generator=torch.Generator().manual_seed(99))
    return x, (x[:, COMMON] @ teacher).argmax(dim=1)


def _model() -> nn.Linear:
    torch.manual_seed(0)
    model = nn.Linear(14, 5, bias=False)  # so gradients are exactly (e_y - p) x^T
    with torch.no_grad():
        model.weight[:, RARE] = 0.0  # rare logits are 0 (uniform p), whatever the rare scale
    return model


def _by_name(estimators: list, cls: type):
    return next(e for e in estimators if isinstance(e, cls))


def _values(measurements, metric: str) -> dict[str, float]:
    return {dict(m.labels).get("probe", ""): m.value for m in measurements if m.metric == metric}


def _step(model: nn.Module, optimizer, estimators, x, y, step: int):
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    ctx = StepContext(step=step, model=model, optimizer=optimizer,
                      forward=lambda m, i: m(i), loss=loss.detach(), batch=(x, y))
    out = [m for e in estimators for m in e.run(ctx)]
    optimizer.step()
    return out


def _config(**overrides) -> EstimatorConfig:
    base = {"sketch_dim": 512, "fd_rows": 32, "subspace_rank": 16, "probe_rank": 4,
            "retention_warmup_step": 0, "fd_decay": 0.9}
    return EstimatorConfig(**{**base, **overrides})


def test_mass_ratio_falls_with_the_square_of_the_rare_signal() -> None:
    ratios = {}
    for scale in (1.0, 0.3, 0.1):
        model = _model()
        probes = {"rare": Probe(*_data(32, rare=True, seed=1, scale=scale))}
        estimators = build_default_estimators(model, None, probes,
                                              Probe(*_data(32, rare=False, seed=2)), _config())
        probe_estimator = _by_name(estimators, ProbeEstimator)
        out = probe_estimator.run(StepContext(0, model, None, lambda m, i: m(i)))
        ratios[scale] = _values(out, "probe_fisher_mass_ratio")["rare"]
    # The rare logits do not depend on the scale s, so the sampled labels (fixed seed per
    # probe) are the same and |(e_y - p) x^T|^2 scales exactly as s^2: fp32 rounding only.
    assert ratios[0.3] / ratios[1.0] == pytest.approx(0.09, rel=1e-4)
    assert ratios[0.1] / ratios[1.0] == pytest.approx(0.01, rel=1e-4)


def test_absorption_and_bulk_residual_follow_the_dominant_subspace() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rare_probe = Probe(*_data(32, rare=True, seed=3))
    estimators = [e for e in build_default_estimators(
        model, optimizer, {"rare": rare_probe}, Probe(*_data(32, rare=False, seed=4)),
        _config()) if isinstance(e, (GradientSubspaceEstimator, ProbeEstimator))]
    for step in range(20):  # training on the common slice only
        out = _step(model, optimizer, estimators, *_data(16, rare=False, seed=100 + step), step)
    residual, absorbed = _values(out, "probe_bulk_residual"), _values(out, "probe_absorption")
    # Disjoint weight columns: the rare gradients are orthogonal to U_dom up to CountSketch
    # collisions (inner products of order sqrt(2/d) ~ 0.06 at d = 512).
    assert residual["rare"] >= 0.9 and absorbed["rare"] <= 0.1
    for step in range(20, 60):  # the mix shifts: rare examples now dominate the gradient
        out = _step(model, optimizer, estimators, *_data(16, rare=True, seed=100 + step), step)
    residual, absorbed = _values(out, "probe_bulk_residual"), _values(out, "probe_absorption")
    # U_dom (gamma = 0.9 forgets the common phase: 0.9^40 ~ 1.5%) now spans the rare
    # 16-dimensional block, so the rare gradients lie inside it and the common ones do not.
    assert residual["rare"] <= 0.05 and absorbed["rare"] >= 0.95
    assert residual["common"] >= 0.9 and absorbed["common"] <= 0.1
    # Retention was referenced at step 0; training on the rare slice makes the model
    # confident on it, which shrinks its sampled-label gradients in those directions.
    assert _values(out, "probe_retention")["rare"] < 0.6


def test_interference_is_the_cosine_with_the_batch_gradient() -> None:
    model = _model()
    rare_x, rare_y = _data(32, rare=True, seed=5)
    estimator = _by_name(build_default_estimators(model, None, {"rare": Probe(rare_x, rare_y)},
                                                  None, _config()), ProbeEstimator)
    nn.functional.cross_entropy(model(rare_x), rare_y).backward()  # the probe's own gradient
    out = estimator.run(StepContext(0, model, None, lambda m, i: m(i)))
    # Same gradient both sides, computed by two code paths: cosine 1 to fp32 rounding.
    assert _values(out, "probe_interference")["rare"] == pytest.approx(1.0, abs=1e-5)
    for p in model.parameters():
        p.grad = -p.grad
    out = estimator.run(StepContext(1, model, None, lambda m, i: m(i)))
    assert _values(out, "probe_interference")["rare"] == pytest.approx(-1.0, abs=1e-5)
    assert "probe_fisher_mass_ratio" not in {m.metric for m in out}  # no common probe
    accuracy = _values(out, "probe_accuracy")["rare"]
    expected = float((model(rare_x).argmax(1) == rare_y).float().mean())
    assert accuracy == pytest.approx(expected)
