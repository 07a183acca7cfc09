"""A Monitor on each task a training loop may have: the likelihoods picked by ``task=`` and
a ``loss_fn`` with no likelihood, on tiny models, in process and through the real server."""

from __future__ import annotations

import logging
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from raresignal.agent import Monitor, MonitorConfig, Probe
from raresignal.agent.estimators import EstimatorConfig, build_shared_state
from raresignal.agent.estimators.likelihood import GaussianLikelihood
from raresignal.agent.estimators.noise_scale import half_batch_norms
from raresignal.agent.estimators.objective import BatchObjective
from raresignal.server.serving.app import ServerConfig, start_in_thread

LossOf = Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]

# Every estimator due at every step; the scheduler runs one expensive estimator a step,
# so a dozen steps run each of them (the probes twice, for interference) at least twice.
# (Sharpness in one step: a slice no run fills, so how many steps it spans does not
# depend on the machine's speed.)
WHOLE_RUNS = dict(resumable_slice_min_seconds=3600.0)
EVERY_STEP = EstimatorConfig(
    noise_scale_interval=1, subspace_interval=1, drift_interval=1, sharpness_interval=1,
    fisher_interval=1, probes_interval=1, sharpness_warmup_steps=0, retention_warmup_step=0,
    curvature_batch_size=16, fd_rows=8, subspace_rank=2, probe_rank=2)
FISHER_SIGNALS = ("fisher_trace", "fisher_top_eigenvalue", "fisher_effective_rank",
                  "probe_fisher_mass", "probe_retention", "probe_absorption")


class Regressor(nn.Module):
    """6 -> 16 -> outputs, tanh: smooth, so its curvature is well defined."""

    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.head = nn.Linear(16, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class TinyMaskedLM(nn.Module):
    """Token and position embeddings, one mixing layer over all positions, a vocab head."""

    def __init__(self, vocab: int = 6, length: int = 5, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.1 * torch.randn(length, width))
        self.mix = nn.Linear(length, length)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position
        h = h + torch.tanh(self.mix(h.transpose(1, 2))).transpose(1, 2)
        return self.head(h)


def _regression_data(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(48, 6, generator=generator)
    return x, torch.stack([x[:, 0] - x[:, 1], x[:, 2] * x[:, 3]], dim=1)


def _multi_label_data(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(48, 6, generator=generator)
    return x, torch.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0, x[:, 3] > 1], dim=1).float()


def _masked_lm_data(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(1, 6, (48, 5), generator=generator)
    masked = torch.rand(tokens.shape, generator=generator) < 0.3
    masked[:, 2] = True
    targets = torch.where(masked, tokens, torch.full_like(tokens, -100))
    return torch.where(masked, torch.zeros_like(tokens), tokens), targets  # 0 is [MASK]


def _gaussian_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Half the squared error summed over outputs, mean over examples: the regression NLL."""
    return 0.5 * (model(x) - y).pow(2).sum(dim=1).mean()


def _contrastive_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """InfoNCE between the embeddings of x and of its noisy view y: no likelihood."""
    a, b = F.normalize(model(x), dim=1), F.normalize(model(y), dim=1)
    logits = a @ b.T / 0.5
    return F.cross_entropy(logits, torch.arange(x.shape[0], device=x.device))


def _contrastive_data(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(48, 6, generator=generator)
    return x, x + 0.1 * torch.randn(x.shape, generator=generator)


def _run(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], loss_of: LossOf,
         steps: int = 12, config: MonitorConfig | None = None, **monitor_args: Any,
         ) -> tuple[Monitor, list[float]]:
    """Trains ``steps`` steps on the data's first 32 examples, probing the last 16; returns
    the monitor and the probe's loss at each step, computed here."""
    inputs, targets = data
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor_args.setdefault("server", None)
    # Cadences and efforts pinned: the values are compared with exact ones.
    monitor = Monitor(model, optimizer, probes={"rare": Probe(inputs[32:], targets[32:])},
                      config=config or MonitorConfig(max_interval_factor=1, min_effort=1.0,
                                                     **WHOLE_RUNS,
                                                     estimator_config=EVERY_STEP),
                      **monitor_args)
    probe_losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_of(model, inputs[:32], targets[:32])
        loss.backward()
        monitor.step(loss=loss, batch=(inputs[:32], targets[:32]))
        with torch.no_grad():
            probe_losses.append(float(loss_of(model, inputs[32:], targets[32:])))
        optimizer.step()
    monitor.close()
    return monitor, probe_losses


def _one_of(value: float, candidates: list[float]) -> bool:
    """``value`` is one of ``candidates`` to float32 rounding (the monitor measured the
    probe at some step; the losses of different steps differ far more than that)."""
    return any(value == pytest.approx(c, rel=1e-5) for c in candidates)


def _has(latest: dict[str, float], metric: str) -> bool:
    return any(key == metric or key.startswith(metric + "{") for key in latest)


LIKELIHOOD_TASKS = {
    "regression": (lambda: Regressor(2), _regression_data, _gaussian_loss),
    "multi_label": (lambda: Regressor(3), _multi_label_data,
                    lambda m, x, y: F.binary_cross_entropy_with_logits(m(x), y,
                                                                       reduction="sum")
                    / x.shape[0]),
    "masked_lm": (TinyMaskedLM, _masked_lm_data,
                  lambda m, x, y: F.cross_entropy(m(x).flatten(0, 1), y.flatten(),
                                                  ignore_index=-100)),
}


@pytest.mark.parametrize("task", sorted(LIKELIHOOD_TASKS))
def test_a_likelihood_task_reports_every_signal_with_its_own_loss(task: str) -> None:
    torch.manual_seed(0)
    make_model, make_data, loss_of = LIKELIHOOD_TASKS[task]
    monitor, probe_losses = _run(make_model(), make_data(torch.Generator().manual_seed(1)),
                               loss_of, task=task)
    latest = monitor.latest()
    assert monitor.estimator_errors == {}
    for metric in ("sharpness", "gradient_noise_scale", "probe_interference",
                   "fisher_trace", "fisher_effective_rank", "probe_fisher_mass",
                   "probe_retention"):
        assert _has(latest, metric), (task, metric, sorted(latest))
    assert not _has(latest, "agent_estimator_unavailable")
    # The probe loss is the training loop's own loss on the probe (the mean NLL per
    # scored token, which each loop above computes the ordinary way).
    assert _one_of(latest["probe_loss{probe=rare}"], probe_losses)
    # Regression has no notion of a correct prediction, so no accuracy.
    assert _has(latest, "probe_accuracy") == (task != "regression")


def test_a_loss_fn_without_likelihood_reports_the_loss_signals_and_says_what_is_unavailable(
        caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="raresignal"):
        monitor, probe_losses = _run(Regressor(4), _contrastive_data(
            torch.Generator().manual_seed(2)), _contrastive_loss, loss_fn=_contrastive_loss)
    latest = monitor.latest()
    assert monitor.estimator_errors == {}
    for metric in ("sharpness", "gradient_noise_scale", "subspace_overlap",
                   "probe_interference"):
        assert _has(latest, metric), (metric, sorted(latest))
    assert _one_of(latest["probe_loss{probe=rare}"], probe_losses)
    for metric in (*FISHER_SIGNALS, "probe_accuracy"):
        assert not _has(latest, metric), metric
    assert latest["agent_estimator_unavailable{estimator=fisher}"] == 1.0
    assert latest["agent_estimator_unavailable{estimator=probe_fisher}"] == 1.0
    said = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(said) == 1 and "fisher and probe_fisher" in said[0]


def _scraped_samples(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_unavailable_gauge_reaches_prometheus_through_the_server(tmp_path: Path) -> None:
    def unavailable(scraped: dict) -> dict[str, float]:
        return {dict(labels)["estimator"]: value for (name, labels), value in scraped.items()
                if name == "raresignal_agent_estimator_unavailable"
                and ("run", "contrastive") in labels}

    with start_in_thread(ServerConfig(db_path=str(tmp_path / "rs.db"), host="127.0.0.1",
                                      grpc_port=0, metrics_port=0, health_port=0)) as server:
        torch.manual_seed(0)
        config = MonitorConfig(max_interval_factor=1, min_effort=1.0,
                               estimator_config=EVERY_STEP, **WHOLE_RUNS,
                               spool_dir=str(tmp_path / "spool"), report_interval_seconds=0.05)
        monitor, _ = _run(Regressor(4), _contrastive_data(torch.Generator().manual_seed(2)),
                          _contrastive_loss, config=config, server=server.grpc_target,
                          run_name="contrastive", loss_fn=_contrastive_loss)
        assert monitor.sender is not None and monitor.sender.dropped_reports == 0
        deadline = time.monotonic() + 30
        while True:
            scraped = _scraped_samples(server.metrics_url)
            if len(unavailable(scraped)) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert unavailable(scraped) == {"fisher": 1.0, "probe_fisher": 1.0}
    by_name = {name for name, labels in scraped if ("run", "contrastive") in labels}
    assert {"raresignal_sharpness", "raresignal_probe_loss"} <= by_name
    assert not {"raresignal_fisher_trace", "raresignal_probe_fisher_mass"} & by_name


def test_a_loss_fn_that_is_the_gaussian_nll_gives_the_losses_task_regression_does() -> None:
    """Sharpness, noise scale and probe interference differentiate these two losses; the
    same loss through either path gives the same values and gradients."""
    torch.manual_seed(0)
    model = Regressor(2)
    x, y = _regression_data(torch.Generator().manual_seed(3))
    shared = {name: build_shared_state(model, None, None, EstimatorConfig(), **args)
              for name, args in (("likelihood", {"task": "regression"}),
                                 ("loss_fn", {"loss_fn": _gaussian_loss}))}
    assert shared["loss_fn"].likelihood is None and shared["loss_fn"].per_example is None
    values, grads, norms = {}, {}, {}
    for name, state in shared.items():
        objective = BatchObjective(state.functional, state.likelihood, x, y)
        point = {n: t.requires_grad_(True) for n, t in objective.point().items()}
        value = objective(point)
        grads[name] = torch.autograd.grad(value, list(point.values()))
        values[name] = float(value.detach())
        order = torch.randperm(48, generator=torch.Generator().manual_seed(4))
        norms[name] = half_batch_norms(state.functional, state.likelihood, x, y,
                                       order[:24], order[24:])
    with torch.no_grad():
        assert values["loss_fn"] == pytest.approx(float(_gaussian_loss(model, x, y)), rel=1e-6)
    assert values["loss_fn"] == pytest.approx(values["likelihood"], rel=1e-6)
    for mine, reference in zip(grads["loss_fn"], grads["likelihood"], strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-7)
    assert norms["loss_fn"] == pytest.approx(norms["likelihood"], rel=1e-5)


def test_task_custom_needs_a_loss_fn() -> None:
    with pytest.raises(ValueError, match="loss_fn"):
        Monitor(Regressor(2), None, server=None, task="custom")


def test_readme_states_the_regression_variance_the_likelihood_uses() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"Gaussian, variance {GaussianLikelihood().variance:g} " in readme


def test_a_loss_fn_with_a_likelihood_task_is_the_loss_and_keeps_the_fisher() -> None:
    torch.manual_seed(0)
    model = Regressor(2)
    x, y = _regression_data(torch.Generator().manual_seed(5))

    def weighted(m: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return 3.0 * _gaussian_loss(m, inputs, targets)

    shared = build_shared_state(model, None, None, EstimatorConfig(), task="regression",
                                loss_fn=weighted)
    assert isinstance(shared.likelihood, GaussianLikelihood) and shared.per_example is not None
    objective = BatchObjective(shared.functional, shared.likelihood, x, y)
    with torch.no_grad():
        assert float(objective(objective.point())) == pytest.approx(
            float(weighted(model, x, y)), rel=1e-6)
