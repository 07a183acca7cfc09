"""Every default estimator on a small transformer (MHA / fused SDPA on CPU), through the
Estimator protocol: catalogue metrics only, and training state left as it was."""

from __future__ import annotations

import pytest
import torch
from estimator_models import TinyTransformer

from raresignal.agent.api import Estimator, Measurement, Probe, StepContext
from raresignal.agent.estimators import EstimatorConfig, build_default_estimators
from raresignal.protos.catalog import CATALOG

EXPECTED = {
    "gradient_stats": {"loss", "grad_norm", "learning_rate", "nonfinite_values",
                       "nonfinite_steps_total", "update_to_weight_ratio",
                       "update_to_weight_ratio_at_peak_lr"},
    "noise_scale": {"gradient_noise_scale"},
    "gradient_subspace": set(),
    "subspace_drift": {"subspace_overlap", "subspace_max_angle_radians"},
    "sharpness": {"sharpness", "preconditioned_sharpness", "sharpness_threshold",
                  "sharpness_ratio", "hessian_trace", "hessian_vector_products"},
    "fisher": {"fisher_trace", "empirical_fisher_trace", "fisher_top_eigenvalue",
               "fisher_effective_rank"},
    "probes": {"probe_fisher_mass", "probe_fisher_mass_ratio", "probe_absorption",
               "probe_bulk_residual", "probe_retention", "probe_interference"},
    "probe_loss": {"probe_loss", "probe_accuracy"},
    "common_probe_loss": {"probe_loss", "probe_accuracy"},
    "representation": {"representation_effective_rank", "representation_stable_rank",
                       "representation_dormant_fraction"},
}


def _tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 7, (n, 6), generator=generator)
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = -100
    return tokens, targets


def _snapshot(model: torch.nn.Module) -> tuple:
    return ([m.training for m in model.modules()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            torch.get_rng_state(), [p.detach().clone() for p in model.parameters()])


def _assert_unchanged(before: tuple, after: tuple, name: str) -> None:
    assert before[0] == after[0], f"{name} changed a module's train/eval mode"
    for a, b in zip(before[1], after[1], strict=True):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), \
            f"{name} changed a gradient"
    assert torch.equal(before[2], after[2]), f"{name} changed the RNG state"
    assert all(torch.equal(a, b) for a, b in zip(before[3], after[3], strict=True)), \
        f"{name} changed a parameter"


def test_all_estimators_on_a_transformer_leave_training_untouched() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = EstimatorConfig(sketch_dim=256, fd_rows=6, subspace_rank=3, probe_rank=3,
                             curvature_batch_size=6, retention_warmup_step=2,
                             hutchinson_samples=6, representation_layer="mlp.1",
                             update_ratio_interval=2, sharpness_warmup_steps=0)
    estimators = build_default_estimators(
        model, optimizer, {"rare": Probe(*_tokens(6, 1))}, Probe(*_tokens(8, 2)), config,
        task="causal_lm", forward=lambda m, x: m(x))
    assert all(isinstance(e, Estimator) for e in estimators)
    seen: dict[str, set[str]] = {e.name: set() for e in estimators}
    model.train()
    for step in range(8):
        tokens, targets = _tokens(8, 10 + step)
        optimizer.zero_grad()
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1))
        loss.backward()
        ctx = StepContext(step=step, model=model, optimizer=optimizer,
                          forward=lambda m, x: m(x), loss=loss.detach(),
                          batch=(tokens, targets), batch_size=8)
        for estimator in estimators:
            before = _snapshot(model)
            measurements = estimator.run(ctx)
            _assert_unchanged(before, _snapshot(model), estimator.name)
            for m in measurements:
                assert isinstance(m, Measurement) and m.metric in CATALOG
                assert torch.isfinite(torch.tensor(m.value)), m
            seen[estimator.name] |= {m.metric for m in measurements}
        optimizer.step()
    assert seen == EXPECTED
    sharpness = next(e for e in estimators if e.name == "sharpness")
    assert sharpness.backend == "finite_difference"  # fused CPU attention: no 2nd derivative
    # Checkpoints round-trip.
    for estimator in estimators:
        estimator.load_state_dict(estimator.state_dict())


def test_bad_configuration_is_rejected_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="subspace_rank"):
        EstimatorConfig(fd_rows=4, subspace_rank=4)
    with pytest.raises(ValueError, match="unknown task"):
        build_default_estimators(TinyTransformer(), None, task="ranking")
    with pytest.raises(ValueError, match="taken by the common probe"):
        build_default_estimators(TinyTransformer(), None, {"common": Probe(*_tokens(2, 0))},
                                 Probe(*_tokens(2, 1)), task="causal_lm")


def test_sharpness_waits_for_the_optimizer_statistics_to_settle() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    inputs, targets = torch.randn(16, 4), torch.randint(0, 3, (16,))
    config = EstimatorConfig(sketch_dim=64, hutchinson_samples=0)
    assert config.sharpness_warmup_steps == 100
    sharpness = next(e for e in build_default_estimators(model, optimizer, None, None, config)
                     if e.name == "sharpness")
    torch.nn.functional.cross_entropy(model(inputs), targets).backward()
    optimizer.step()

    def run(step: int) -> set[str]:
        ctx = StepContext(step=step, model=model, optimizer=optimizer,
                          forward=lambda m, x: m(x), batch=(inputs, targets), batch_size=16)
        return {m.metric for m in sharpness.run(ctx)}

    assert run(99) == set()
    assert {"sharpness", "sharpness_ratio", "preconditioned_sharpness"} <= run(100)


def test_building_the_shared_state_runs_the_full_garbage_collection_imports_made_due(
        ) -> None:
    """The full collection that importing torch (and torch._dynamo) makes due runs when
    the estimators are built, not in one of the first training steps the monitor
    measures (a pass over every object of the process, longer than a small model's step)."""
    import gc

    from raresignal.agent.estimators.config import EstimatorConfig
    from raresignal.agent.estimators.default.factory import build_shared_state

    model = torch.nn.Linear(4, 3)
    full_collections = gc.get_stats()[2]["collections"]
    build_shared_state(model, None, None, EstimatorConfig(), task="classification")
    assert gc.get_stats()[2]["collections"] > full_collections


def test_the_update_ratio_at_peak_learning_rate_ignores_a_warm_restart() -> None:
    """A warm restart multiplies the raw update/weight ratio by the rate's jump; rescaled
    to the run's peak rate it stays where it was, while a rate past the peak still moves
    it. The peak survives a checkpoint."""
    from raresignal.agent.estimators.default.factory import build_shared_state
    from raresignal.agent.estimators.default.gradient_stats import GradientStatsEstimator
    from raresignal.agent.estimators.gradient_stats import ratio_at_peak_learning_rate

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = EstimatorConfig(update_ratio_interval=1)
    stats = GradientStatsEstimator(build_shared_state(model, optimizer, None, config,
                                                      task="classification"))
    inputs, targets = torch.randn(32, 8), torch.randint(0, 4, (32,))
    raw: dict[float, float] = {}
    at_peak: dict[float, float] = {}
    # Peak 0.1, decayed to 0.01, restarted at 0.1, then past the peak (1.0).
    for step, lr in enumerate([0.1] * 3 + [0.01] * 3 + [0.1] * 3 + [1.0] * 3):
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        values = {m.metric: m.value for m in stats.run(StepContext(
            step=step, model=model, optimizer=optimizer, forward=lambda m, x: m(x),
            batch_size=32))}
        optimizer.step()
        if "update_to_weight_ratio" in values:
            raw[lr], at_peak[lr] = (values["update_to_weight_ratio"],
                                    values["update_to_weight_ratio_at_peak_lr"])
    # The readings are of the update the previous step applied; the last of each rate's
    # three steps read an update made at that rate.
    assert raw[0.01] < raw[0.1] / 5  # the raw ratio follows the schedule
    assert at_peak[0.01] == pytest.approx(raw[0.01] * 10, rel=1e-6)
    assert at_peak[0.1] == pytest.approx(raw[0.1], rel=1e-6)  # back at the peak: as raw
    assert 0.5 < at_peak[0.1] / at_peak[0.01] < 2  # the restart: no jump
    assert at_peak[1.0] > 5 * at_peak[0.1]  # past the peak: the surge is seen
    restored = GradientStatsEstimator(build_shared_state(model, optimizer, None, config,
                                                         task="classification"))
    restored.load_state_dict(stats.state_dict())
    assert restored.peak_learning_rate == 1.0
    assert ratio_at_peak_learning_rate(0.5, 0.0, 1.0) is None  # a rate of 0: no reading
    assert ratio_at_peak_learning_rate(0.5, None, 1.0) is None
