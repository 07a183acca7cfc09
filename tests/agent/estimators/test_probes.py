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
from raresignal.agent.estimators.default import (
    CommonProbeLossEstimator,
    GradientSubspaceEstimator,
    ProbeEstimator,
    ProbeLossEstimator,
)
from raresignal.agent.estimators.probes import RetentionReference
from raresignal.agent.estimators.shared import RotatingSubsample

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
    # Retention was referenced at step 0, and the rare gradients stayed in the rare block
    # (the rare teacher never changed): their share in the reference directions held.
    assert _values(out, "probe_retention")["rare"] >= 0.5


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def _probe_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return torch.cat([g.reshape(-1).double() for g in grads])


def test_interference_is_the_cosine_with_the_net_update_since_the_measurement_exact() -> None:
    dim = 2**16
    # CountSketch inner products have variance <= (|a|^2|b|^2 + (a.b)^2) / d, so a sketched
    # cosine is within 5 sqrt(2/d) = 0.028 of the exact one but once in ~10^6.
    tolerance = 5 * (2 / dim) ** 0.5
    model = _model()
    rare_x, rare_y = _data(32, rare=True, seed=5)
    common_x, common_y = _data(64, rare=False, seed=6)
    mixed_x, mixed_y = torch.cat([common_x, rare_x[:8]]), torch.cat([common_y, rare_y[:8]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.5)
    config = _config(sketch_dim=dim, probe_interference_horizon=3)
    rare = {"rare": Probe(rare_x, rare_y)}
    probes = _by_name(build_default_estimators(model, optimizer, rare, None, config),
                      ProbeEstimator)
    for step in range(6):  # Adam's moments, and weights for the decay to act on
        _step(model, optimizer, [], mixed_x, mixed_y, step)
    # A probe measurement at theta_s, then the steps training takes (momentum,
    # preconditioning, weight decay: none of it is in the batch gradients).
    before, g_rare = _flat(model), _probe_gradient(model, rare_x, rare_y)
    g_batch = _probe_gradient(model, mixed_x, mixed_y)
    first = _step(model, optimizer, [probes], mixed_x, mixed_y, 6)
    assert "probe_interference" not in {m.metric for m in first}  # nothing to compare yet
    # Two steps later the window is shorter than the horizon: no reading yet.
    _step(model, optimizer, [], mixed_x, mixed_y, 7)
    early = probes.run(StepContext(8, model, optimizer, lambda m, i: m(i)))
    assert "probe_interference" not in {m.metric for m in early}
    _step(model, optimizer, [], mixed_x, mixed_y, 8)
    exact = float(torch.nn.functional.cosine_similarity(g_rare, before - _flat(model), dim=0))
    out = probes.run(StepContext(9, model, optimizer, lambda m, i: m(i)))
    assert _values(out, "probe_interference")["rare"] == pytest.approx(exact, abs=tolerance)
    # The batch gradient alone points elsewhere: the update is what the test tells apart.
    assert abs(float(torch.nn.functional.cosine_similarity(g_rare, g_batch, dim=0))
               - exact) > 0.1
    # The windows opened at 8 and 9 are still shorter than the horizon: a checkpoint
    # keeps them.
    restored = _by_name(build_default_estimators(model, optimizer, rare, None, config),
                        ProbeEstimator)
    restored.load_state_dict(probes.state_dict())
    assert [s.step for s in restored.interference_starts] == [8, 9]

    # Plain SGD on the probe itself, one step: the update is -lr g_R, cosine +1; the same
    # step against the probe's gradient: -1.
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    probes.shared.config.probe_interference_horizon = 0
    for step, (sign, expected) in enumerate(((1.0, 1.0), (-1.0, -1.0))):
        probes.interference_starts = []
        probes.run(StepContext(20 + 2 * step, model, sgd, lambda m, i: m(i)))
        sgd.zero_grad()
        nn.functional.cross_entropy(model(rare_x), rare_y).backward()
        for p in model.parameters():
            p.grad *= sign
        sgd.step()
        out = probes.run(StepContext(21 + 2 * step, model, sgd, lambda m, i: m(i)))
        assert _values(out, "probe_interference")["rare"] == pytest.approx(expected, abs=1e-6)
    # No update at all (a skipped step): no reading rather than a made-up one.
    probes.run(StepContext(30, model, sgd, lambda m, i: m(i)))
    out = probes.run(StepContext(31, model, sgd, lambda m, i: m(i)))
    assert "probe_interference" not in {m.metric for m in out}


def test_probe_loss_and_accuracy_without_a_common_probe() -> None:
    model = _model()
    rare_x, rare_y = _data(32, rare=True, seed=5)
    estimators = build_default_estimators(model, None, {"rare": Probe(rare_x, rare_y)},
                                          None, _config())
    ctx = StepContext(1, model, None, lambda m, i: m(i))
    geometry = _by_name(estimators, ProbeEstimator).run(ctx)
    assert "probe_fisher_mass_ratio" not in {m.metric for m in geometry}  # no common probe
    assert {"probe_loss", "probe_accuracy"}.isdisjoint({m.metric for m in geometry})
    out = _by_name(estimators, ProbeLossEstimator).run(ctx)
    assert {m.metric for m in out} == {"probe_loss", "probe_accuracy"}
    accuracy = _values(out, "probe_accuracy")["rare"]
    expected = float((model(rare_x).argmax(1) == rare_y).float().mean())
    assert accuracy == pytest.approx(expected)
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(rare_x), rare_y))
    assert _values(out, "probe_loss")["rare"] == pytest.approx(loss, rel=1e-6)


def test_retention_is_the_share_in_the_reference_directions_exact_svd() -> None:
    generator = torch.Generator().manual_seed(7)
    # 24 per-example gradients of rank 6 in 40 dimensions, with decaying singular values.
    left = torch.linalg.qr(torch.randn(24, 6, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(40, 40, generator=generator, dtype=torch.float64)).Q
    sigma = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    g0 = left @ torch.diag(sigma) @ right[:, :6].T
    reference = RetentionReference.take(g0, rank=3, step=0)
    # The basis comes from an fp32 SVD: 1e-5 relative is fp32 rounding with margin.
    # Exact: the top-3 right singular vectors hold (25 + 9 + 4) / sum(sigma^2) of g0.
    assert reference.share == pytest.approx(38.0 / float(sigma.pow(2).sum()), rel=1e-5)
    assert reference.retention(g0) == pytest.approx(1.0, rel=1e-5)
    # A model growing sure of R shrinks its sampled-label gradients: the share, and so the
    # retention, does not move (a ratio of energies would read 0.01 here).
    assert reference.retention(0.1 * g0) == pytest.approx(1.0, rel=1e-5)
    # Gradients moved to directions orthogonal to the reference: nothing retained.
    moved = left @ torch.diag(sigma) @ right[:, 6:12].T
    assert reference.retention(moved) == pytest.approx(0.0, abs=1e-6)
    # Half the energy in the old directions, half in new ones: exact share over share0.
    mixed = torch.cat([g0, moved])
    expected = (38.0 / (2 * float(sigma.pow(2).sum()))) / reference.share
    assert reference.retention(mixed) == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.5, rel=1e-5)


def test_at_half_effort_two_subsamples_cover_the_probe_and_average_to_the_whole() -> None:
    probe = Probe(*_data(30, rare=True, seed=8))
    values = torch.arange(30, dtype=torch.float64)  # a per-example reading
    subsample = RotatingSubsample()
    assert subsample.take("rare", probe) is probe  # full effort: the whole probe
    assert subsample.set_level(0.5) == 0.5
    halves = [subsample.take("rare", probe) for _ in range(2)]
    taken = [torch.cat([torch.nonzero((probe.inputs == row).all(dim=1)).flatten()
                        for row in half.inputs]) for half in halves]
    # Disjoint halves of equal size that cover the probe: the mean of their means is the
    # whole probe's mean, without bias.
    assert sorted(torch.cat(taken).tolist()) == list(range(30))
    assert (values[taken[0]].mean() + values[taken[1]].mean()) / 2 == values.mean()
    # The third subsample starts the rotation over; the offsets survive a checkpoint.
    restored = RotatingSubsample()
    restored.load_state_dict(subsample.state_dict())
    restored.set_level(0.5)
    assert torch.equal(restored.take("rare", probe).inputs, halves[0].inputs)
    with pytest.raises(ValueError, match="effort"):
        subsample.set_level(0.0)


def test_the_probe_loss_always_reads_the_whole_probe() -> None:
    model = _model()
    with torch.no_grad():
        model.weight.normal_(generator=torch.Generator().manual_seed(7))
    probes = {"rare": Probe(*_data(30, rare=True, seed=8))}
    common = Probe(*_data(40, rare=False, seed=9))
    estimators = build_default_estimators(model, None, probes, common, _config())
    estimator = _by_name(estimators, ProbeLossEstimator)
    ctx = StepContext(0, model, None, lambda m, i: m(i))
    full = _values(list(estimator.run(ctx)), "probe_loss")
    assert estimator.set_effort(0.25) == 1.0  # it cannot do less
    assert _values(list(estimator.run(ctx)), "probe_loss") == pytest.approx(full, rel=1e-6)
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(model(probes["rare"].inputs),
                                                     probes["rare"].targets))
    assert full == pytest.approx({"rare": expected}, rel=1e-6)
    # The common probe, which no default alert reads, has an estimator (and cadence) of
    # its own: the same exact reading.
    common_loss = _by_name(estimators, CommonProbeLossEstimator)
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(model(common.inputs), common.targets))
    assert _values(list(common_loss.run(ctx)), "probe_loss") == pytest.approx(
        {"common": expected}, rel=1e-6)


def test_a_planned_run_shorter_than_the_retention_warm_up_takes_its_reference_early(
) -> None:
    model = _model()
    probes = {"rare": Probe(*_data(16, rare=True, seed=10))}
    estimator = _by_name(build_default_estimators(
        model, None, probes, None, _config(retention_warmup_step=1000)), ProbeEstimator)
    assert estimator.retention_warmup_step == 1000
    estimator.plan(500)
    assert estimator.retention_warmup_step == 100  # a fifth of the run
    out = estimator.run(StepContext(100, model, None, lambda m, i: m(i)))
    assert "rare" in _values(out, "probe_retention")
