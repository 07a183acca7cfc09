"""Sharpness, Fisher and probe measurements in units: spread over training steps they give
exactly the one-shot result of the step they started at; dropped half-way they change
nothing; the sharpness effort level scales its work; and in a Monitor no step runs more
than its slice."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from estimator_models import exact_hessian
from torch import nn

from raresignal.agent import Monitor, MonitorConfig
from raresignal.agent.api import (
    Measurement,
    MeasurementUnits,
    Probe,
    StepContext,
    run_units,
)
from raresignal.agent.estimators import EstimatorConfig, build_default_estimators
from raresignal.agent.estimators import hvp as hvp_module
from raresignal.agent.estimators.default.sharpness import (
    MIN_LANCZOS_ITERATIONS,
    MIN_TRACE_PRODUCTS,
    SharpnessEstimator,
)
from raresignal.agent.estimators.fisher import sample_model_labels
from raresignal.agent.estimators.isolation import preserved_training_state
from raresignal.agent.estimators.likelihood import ClassificationLikelihood
from raresignal.agent.estimators.objective import BatchObjective, FunctionalModel
from raresignal.agent.estimators.parameters import ParameterSet
from raresignal.agent.estimators.probes import fisher_mass


class NormedMLP(nn.Module):
    """10 -> 16 -> 4 with batch norm: training moves its buffers as well as its weights."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.Tanh(),
                                    nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _data(seed: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=generator), torch.randint(0, 4, (n,),
                                                                  generator=generator)


CONFIG = EstimatorConfig(sketch_dim=64, fd_rows=4, subspace_rank=2, probe_rank=2,
                         curvature_batch_size=32, sharpness_warmup_steps=0,
                         hutchinson_samples=6, hvp_backend="auto")


def _estimator(name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
               config: EstimatorConfig = CONFIG) -> Any:
    estimators = build_default_estimators(model, optimizer, {}, Probe(*_data(1)), config,
                                          task="classification", forward=lambda m, x: m(x))
    (estimator,) = [e for e in estimators if e.name == name]
    return estimator


def _sharpness(model: nn.Module, optimizer: torch.optim.Optimizer,
               config: EstimatorConfig = CONFIG) -> SharpnessEstimator:
    sharpness = _estimator("sharpness", model, optimizer, config)
    assert isinstance(sharpness, SharpnessEstimator)
    return sharpness


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int
                ) -> torch.Tensor:
    inputs, targets = _data(seed)
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(inputs), targets)
    loss.backward()
    return loss


def _ctx(step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         loss: torch.Tensor) -> StepContext:
    return StepContext(step=step, model=model, optimizer=optimizer,
                       forward=lambda m, x: m(x), loss=loss.detach(), batch=_data(step),
                       batch_size=32)


def _values(measurements: list[Measurement]) -> dict[str, float]:
    return {m.key: m.value for m in measurements}


def _spread_over_training(units: MeasurementUnits, model: nn.Module,
                          optimizer: torch.optim.Optimizer, seed: int,
                          between: Callable[[], None] | None = None
                          ) -> tuple[dict[str, float], int]:
    """Runs ``units`` one per training step (an optimizer step between two units, its
    batch seeded from ``seed`` and the step); ``between()`` checks run before each step.
    Returns the measurement's values and the steps it took."""
    steps = 0
    while True:
        try:
            next(units)
        except StopIteration as done:
            return _values(list(done.value)), steps
        if between is not None:
            between()
        _train_step(model, optimizer, seed + steps)
        optimizer.step()
        steps += 1


@pytest.fixture
def trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = NormedMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for seed in range(5):
        _train_step(model, optimizer, 100 + seed)
        optimizer.step()
    return model, optimizer


def test_units_spread_over_training_steps_equal_the_one_shot_measurement(trained) -> None:
    model, optimizer = trained
    loss = _train_step(model, optimizer, 7)
    ctx = _ctx(5, model, optimizer, loss)
    one_shot = _values(list(_sharpness(model, optimizer).run(ctx)))
    frozen = copy.deepcopy(model).eval()

    resumed = _sharpness(model, optimizer)
    units = resumed.run_in_units(ctx)
    def in_training_mode() -> None:
        assert model.training, "a unit left the model in eval mode"

    # Training goes on between two units: weights and batch-norm statistics move.
    spread, steps = _spread_over_training(units, model, optimizer, 200, in_training_mode)
    assert steps > 20
    assert not torch.equal(frozen.layers[1].running_mean, model.layers[1].running_mean)
    assert set(spread) == set(one_shot) >= {"sharpness", "preconditioned_sharpness",
                                            "hessian_trace", "sharpness_ratio"}
    for key, value in one_shot.items():
        assert spread[key] == pytest.approx(value, rel=1e-5), key
    # And both are the top eigenvalue of the Hessian at the starting step, within 2 %: of
    # the loss training descends, its batch norm on the batch's statistics.
    frozen.train()
    frozen.layers[1].track_running_stats = False
    params = ParameterSet.from_model(frozen)
    objective = BatchObjective(FunctionalModel(frozen, lambda m, x: m(x), params),
                               ClassificationLikelihood(), *_data(1))
    exact = float(torch.linalg.eigvalsh(exact_hessian(objective, params))[-1])
    assert spread["sharpness"] == pytest.approx(exact, rel=0.02)


def test_fisher_units_spread_over_training_steps_equal_the_one_shot_measurement(trained
                                                                             ) -> None:
    model, optimizer = trained
    config = EstimatorConfig(**{**CONFIG.__dict__, "per_example_chunk": 4})
    ctx = _ctx(5, model, optimizer, _train_step(model, optimizer, 7))
    one_shot = _values(list(_estimator("fisher", model, optimizer, config).run(ctx)))
    units = _estimator("fisher", model, optimizer, config).run_in_units(ctx)
    spread, steps = _spread_over_training(units, model, optimizer, 400)
    # Labels drawn, then 32 examples in chunks of 4, for the true and empirical Fisher.
    assert steps == 1 + 8 + 8
    assert set(spread) == set(one_shot) and "fisher_top_eigenvalue" in spread
    for key, value in one_shot.items():
        assert spread[key] == pytest.approx(value, rel=1e-5), key


def test_a_measurement_dropped_half_way_leaves_the_estimator_as_it_was(trained) -> None:
    model, optimizer = trained
    sharpness = _sharpness(model, optimizer)
    ctx = _ctx(5, model, optimizer, _train_step(model, optimizer, 7))
    before = copy.deepcopy(sharpness.state_dict())
    units = sharpness.run_in_units(ctx)
    for _ in range(10):
        next(units)
    units.close()
    after = sharpness.state_dict()
    assert after["previous"] is None and after["previous_adam"] is None
    assert after["relative_gap"] == before["relative_gap"]
    # A complete one moves the warm start.
    run_units(sharpness.run_in_units(ctx))
    assert sharpness.state_dict()["previous"] is not None


def test_effort_scales_lanczos_iterations_and_trace_products_down_to_a_minimum(
        trained) -> None:
    model, optimizer = trained
    config = EstimatorConfig(**{**CONFIG.__dict__, "sharpness_tol": 1e-12,
                                "hutchinson_samples": 12, "sharpness_cold_iterations": 20})
    sharpness = _sharpness(model, optimizer, config)
    ctx = _ctx(5, model, optimizer, _train_step(model, optimizer, 7))

    def units_of_one_run() -> int:
        units = sharpness.run_in_units(ctx)
        count = 0
        while True:
            try:
                next(units)
            except StopIteration:
                return count
            count += 1

    full = units_of_one_run()
    sharpness.plain.previous = sharpness.adam.previous = None  # cold again
    sharpness.set_effort(0.5)
    assert sharpness.plain.cold_iterations == 10 and sharpness.trace_products == 6
    half = units_of_one_run()
    assert half < full
    sharpness.set_effort(0.0)
    assert sharpness.plain.cold_iterations == MIN_LANCZOS_ITERATIONS
    assert sharpness.adam.warm_iterations == MIN_LANCZOS_ITERATIONS
    assert sharpness.trace_products == MIN_TRACE_PRODUCTS
    sharpness.set_effort(1.0)
    assert (sharpness.plain.cold_iterations, sharpness.trace_products) == (20, 12)
    with pytest.raises(ValueError):
        sharpness.set_effort(float("nan"))


class OtherExpensive:
    """An expensive estimator due every third step: a measurement in flight must not hold
    it back, and what it takes of a step's slice is not there for the measurement."""

    name = "toy_expensive"
    default_interval = 3
    expensive = True

    def __init__(self) -> None:
        self.steps: list[int] = []

    def run(self, ctx: StepContext) -> list[Measurement]:
        self.steps.append(ctx.step)
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_a_monitor_gives_an_expensive_sharpness_one_product_a_step(trained, monkeypatch
                                                                   ) -> None:
    """A deliberately expensive configuration (60 Lanczos iterations that never stop
    early, 30 trace products) under a slice no unit fits in: each step runs one unit,
    so at most one Hessian-vector product (or one operator construction)."""
    model, optimizer = trained
    products: list[int] = []
    for cls in (hvp_module.DoubleBackwardHVP, hvp_module.ForwardOverReverseHVP,
                hvp_module.FiniteDifferenceHVP):
        original = cls._product

        def counted(self, vector, _original=original):
            products.append(1)
            return _original(self, vector)

        monkeypatch.setattr(cls, "_product", counted)
    original_init = hvp_module.DoubleBackwardHVP.__init__

    def counted_init(self, *args, **kwargs):
        products.append(1)  # building the gradient graph costs about one product
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(hvp_module.DoubleBackwardHVP, "__init__", counted_init)

    expensive = EstimatorConfig(**{**CONFIG.__dict__, "sharpness_tol": 1e-12,
                                   "sharpness_cold_iterations": 60, "hutchinson_samples": 30,
                                   "sharpness_interval": 1000,
                                   # Chunks of a quarter batch, and the whole basis
                                   # in one reorthogonalisation unit: the run fits
                                   # 700 steps.
                                   "unit_batch_fraction": 0.25,
                                   "curvature_unit_vectors": 128})
    sharpness = _sharpness(model, optimizer, expensive)
    other = OtherExpensive()
    config = MonitorConfig(resumable_slice_fraction=1e-9, resumable_slice_min_seconds=1e-9,
                           max_interval_factor=1)
    monitor = Monitor(model, optimizer, estimators=[sharpness, other], config=config)
    recorded: list[tuple[str, int, float]] = []
    record_run = monitor._budget.record_run
    monkeypatch.setattr(monitor._budget, "record_run",
                        lambda name, step, seconds: (recorded.append((name, step, seconds)),
                                                     record_run(name, step, seconds)))
    published: list[tuple[int, list]] = []
    publish = monitor._publish
    monkeypatch.setattr(monitor, "_publish", lambda step, measurements, earlier=():
                        (published.extend(earlier), publish(step, measurements, earlier)))

    per_step, flight, checkpoint = [], None, None
    for step in range(700):
        before = len(products)
        loss = _train_step(model, optimizer, 300 + step)
        monitor.step(loss=loss, batch=_data(step))
        optimizer.step()
        per_step.append(len(products) - before)
        flight = monitor._flights[0] if monitor._flights else flight
        if step == 50:
            checkpoint = monitor.state_dict()  # mid-flight: must not crash or save half
        if not monitor._flights and published:
            break
    assert flight is not None and flight.name == "sharpness" and flight.step == 0
    spanned = flight.steps
    assert spanned > 60 and max(per_step) == 1
    # The other expensive estimator kept its cadence from its first due step on; at its
    # steps it took the whole (tiny) slice, so the measurement ran no unit there.
    assert other.steps == list(range(1, spanned, 3))
    assert all(per_step[step] == 0 for step in other.steps)
    assert flight.units_run == spanned - len(other.steps)
    # The budget saw the whole cost once, at the step the measurement completed, and
    # the values carry the step the measurement started at.
    assert [(name, step, seconds) for name, step, seconds in recorded
            if name == "sharpness"] == [("sharpness", spanned - 1, flight.seconds)]
    assert {step for step, _ in published} == {0}
    assert {m.metric for _, m in published} >= {"sharpness", "hessian_trace"}
    assert "sharpness" in monitor.latest()
    # The checkpoint taken in flight holds the estimator as it was before it began, and
    # a monitor resumed from it starts the measurement again.
    assert checkpoint is not None and checkpoint["estimators"]["sharpness"]["previous"] is None
    assert checkpoint["budget"]["schedules"]["sharpness"]["runs"] == 0
    monitor.close()


def _probe_estimators(model: nn.Module, optimizer: torch.optim.Optimizer,
                      config: EstimatorConfig) -> dict[str, Any]:
    estimators = build_default_estimators(
        model, optimizer, {"rare": Probe(*_data(9, 12))}, Probe(*_data(1, 20)), config,
        task="classification", forward=lambda m, x: m(x))
    return {e.name: e for e in estimators}


def test_probe_units_spread_over_training_steps_equal_the_one_shot_measurement(trained
                                                                            ) -> None:
    """Every probe reading (Fisher mass and ratio, absorption, bulk residual, retention)
    and the stored dataset-label gradients, spread over steps, equal those of the one-shot
    run within rel 1e-5 (float rounding: the gradient is summed chunk by chunk); the
    sampled-label Fisher mass equals the whole-probe computation to the same tolerance."""
    model, optimizer = trained
    config = EstimatorConfig(**{**CONFIG.__dict__, "per_example_chunk": 4,
                                "retention_warmup_step": 0})
    one_shot_set = _probe_estimators(model, optimizer, config)
    spread_set = _probe_estimators(model, optimizer, config)
    for seed in (11, 12):  # U_dom from two batches' gradients
        feed = _ctx(seed, model, optimizer, _train_step(model, optimizer, seed))
        for estimators in (one_shot_set, spread_set):
            feed.cache.clear()
            estimators["gradient_subspace"].run(feed)
    assert spread_set["probes"].shared.dominant.ready
    ctx = _ctx(5, model, optimizer, _train_step(model, optimizer, 7))
    # The whole-probe computations the units replace, at this step: the sampled-label
    # Fisher mass of all 20 examples at once, and the dataset-label gradient in one pass.
    shared = one_shot_set["probes"].shared
    common_inputs, common_targets = _data(1, 20)
    with preserved_training_state(model):
        _, sampled = sample_model_labels(shared.per_example, common_inputs, common_targets,
                                         shared.generator(zlib.crc32(b"common")))
        whole = shared.per_example.summarize(common_inputs, sampled)
        leaves = {n: t.detach().clone().requires_grad_(True)
                  for n, t in shared.parameters.fp32_detached().items()}
        loss = BatchObjective(shared.functional, shared.likelihood, common_inputs,
                              common_targets)(leaves)
        whole_gradient = shared.sketcher.sketch(
            list(torch.autograd.grad(loss, [leaves[n] for n in shared.parameters.names])),
            dtype=torch.float64)
    one_shot = _values(list(one_shot_set["probes"].run(ctx)))
    probes = spread_set["probes"]
    units = probes.run_in_units(ctx)
    spread, steps = _spread_over_training(units, model, optimizer, 500)
    # Per probe set: its dataset-label gradient in chunks of 4, the label draw, its
    # per-example gradients in chunks of 4 (common: 20 examples, rare: 12).
    assert steps == (5 + 1 + 5) + (3 + 1 + 3)
    assert set(spread) == set(one_shot) >= {
        f"{metric}{{probe={name}}}" for name in ("common", "rare")
        for metric in ("probe_fisher_mass", "probe_absorption", "probe_bulk_residual",
                       "probe_retention")} | {"probe_fisher_mass_ratio{probe=rare}"}
    for key, value in one_shot.items():
        assert spread[key] == pytest.approx(value, rel=1e-5), key
    (start_one_shot,) = one_shot_set["probes"].interference_starts
    (start_spread,) = probes.interference_starts
    for name in ("common", "rare"):
        torch.testing.assert_close(start_spread.gradients[name],
                                   start_one_shot.gradients[name], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(start_spread.parameters, start_one_shot.parameters)
    assert set(probes.references) == {"common", "rare"}
    assert spread["probe_fisher_mass{probe=common}"] == pytest.approx(
        fisher_mass(whole.sq_norms, whole.counts), rel=1e-5)
    torch.testing.assert_close(start_spread.gradients["common"], whole_gradient,
                               rtol=1e-5, atol=1e-9)


def test_a_probe_measurement_dropped_half_way_leaves_the_estimator_as_it_was(trained
                                                                            ) -> None:
    model, optimizer = trained
    config = EstimatorConfig(**{**CONFIG.__dict__, "per_example_chunk": 4,
                                "retention_warmup_step": 0})
    probes = _probe_estimators(model, optimizer, config)["probes"]
    probes.set_effort(0.5)  # a rotating half of each probe set: offsets move per run
    ctx = _ctx(5, model, optimizer, _train_step(model, optimizer, 7))
    before = copy.deepcopy(probes.state_dict())
    units = probes.run_in_units(ctx)
    for _ in range(6):
        next(units)
    units.close()
    assert probes.state_dict() == before == {"references": {}, "interference_starts": [],
                                             "offsets": {}}
    run_units(probes.run_in_units(ctx))
    after = probes.state_dict()
    assert after["offsets"] == {"common": 10, "rare": 6}
    assert set(after["references"]) == {"common", "rare"}
    assert len(after["interference_starts"]) == 1


def test_noise_scale_units_spread_over_training_steps_equal_the_one_shot_measurement(
        trained) -> None:
    """Its two half-batch gradients are taken at the starting step's point however far
    training has moved between them: the unbiased |G|^2 and tr(Sigma) it smooths (read
    from its EMA, which a single reading sets) equal the one-shot run's within rel 1e-6
    (the same arithmetic, on copies)."""
    model, optimizer = trained
    ctx = _ctx(5, model, optimizer, _train_step(model, optimizer, 7))
    one_shot = _estimator("noise_scale", model, optimizer)
    one_shot_values = _values(list(one_shot.run(ctx)))
    spread = _estimator("noise_scale", model, optimizer)
    units = spread.run_in_units(ctx)
    steps = 0
    while True:
        try:
            next(units)
        except StopIteration as done:
            spread_values = _values(list(done.value))
            break
        assert spread.ema.grad_sq is None, "the EMA moved before the measurement completed"
        for seed in range(3):  # several steps between the two halves
            _train_step(model, optimizer, 600 + 10 * steps + seed)
            optimizer.step()
        steps += 1
    assert steps == 2
    assert spread_values == one_shot_values
    assert spread.ema.grad_sq == pytest.approx(one_shot.ema.grad_sq, rel=1e-6)
    assert spread.ema.trace_sigma == pytest.approx(one_shot.ema.trace_sigma, rel=1e-6)
    assert one_shot.ema.trace_sigma > 0


def test_every_sharpness_unit_names_its_kind_and_each_backend_trial_its_own(trained
                                                                           ) -> None:
    """Named units let the monitor predict each from earlier ones of its kind: a cheap
    backend's trial says nothing of another's, nor a product of a reorthogonalisation."""
    model, optimizer = trained
    sharpness = _sharpness(model, optimizer)
    units = sharpness.run_in_units(_ctx(0, model, optimizer, _train_step(model, optimizer, 7)))
    kinds = []
    while True:
        try:
            kinds.append(next(units))
        except StopIteration:
            break
    assert all(isinstance(kind, str) for kind in kinds)
    assert {"double_backward operator", "double_backward product",
            "finite_difference gradient", "reorthogonalise", "combine"} <= set(kinds)


def test_building_the_estimators_pays_torch_func_s_one_time_costs() -> None:
    """torch.func's first grad imports torch._dynamo and its first forward-mode product
    compiles torch's forward-AD decompositions, each longer than a small training step:
    done when the estimators are built, neither lands in a step (checked in a fresh
    process, where nothing has imported them yet)."""
    script = (
        "import sys, torch\n"
        "from raresignal.agent.api import Probe\n"
        "from raresignal.agent.estimators import build_default_estimators\n"
        "model = torch.nn.Linear(4, 3)\n"
        "lazy = ('torch._dynamo', 'torch._decomp.decompositions_for_jvp')\n"
        "assert not any(name in sys.modules for name in lazy)\n"
        "build_default_estimators(model, None, {}, Probe(torch.randn(8, 4),\n"
        "                         torch.randint(0, 3, (8,))), task='classification')\n"
        "assert all(name in sys.modules for name in lazy), lazy\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_probe_loss_units_spread_over_training_steps_equal_the_one_shot_reading(trained
                                                                               ) -> None:
    """One unit per probe set, at the starting step's parameters and batch-norm buffers
    however far training moves between them: equal to the one-shot reading (rel 1e-6)."""
    model, optimizer = trained
    ctx = _ctx(5, model, optimizer, _train_step(model, optimizer, 7))
    estimator = next(e for e in build_default_estimators(
        model, optimizer, {"rare": Probe(*_data(9, 12)), "other": Probe(*_data(1, 20))},
        None, CONFIG, task="classification", forward=lambda m, x: m(x))
        if e.name == "probe_loss")
    one_shot = _values(list(estimator.run(ctx)))
    spread, steps = _spread_over_training(estimator.run_in_units(ctx), model, optimizer, 700)
    assert steps == 2  # one probe set, then the other
    assert set(spread) == set(one_shot) == {
        f"{metric}{{probe={name}}}" for name in ("other", "rare")
        for metric in ("probe_loss", "probe_accuracy")}
    for key, value in one_shot.items():
        assert spread[key] == pytest.approx(value, rel=1e-6), key
    # Training did move the model: read again now, the loss differs.
    moved = _values(list(estimator.run(_ctx(6, model, optimizer,
                                            _train_step(model, optimizer, 8)))))
    assert moved["probe_loss{probe=rare}"] != pytest.approx(one_shot["probe_loss{probe=rare}"],
                                                            rel=1e-6)
