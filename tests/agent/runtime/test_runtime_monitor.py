"""The monitor in one process with no server: values in process, errors contained."""

from __future__ import annotations

import logging

import pytest
import torch
from runtime_toys import (
    FailingEstimator,
    GradNormEstimator,
    LossEstimator,
    SleepyEstimator,
    classification_data,
    small_classifier,
)
from torch import nn

from raresignal.agent import Monitor, MonitorConfig, Probe


def _train(monitor: Monitor, model: nn.Module, optimizer: torch.optim.Optimizer,
           steps: int) -> list[tuple[float, float]]:
    """A plain loop; returns (loss, exact grad norm) of each step."""
    inputs, targets = classification_data()
    seen = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        grad_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).double().norm()
        monitor.step(loss=loss, batch=(inputs, targets))
        seen.append((loss.item(), float(grad_norm)))
        optimizer.step()
    return seen


def test_local_monitor_exposes_the_latest_values() -> None:
    model = small_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, optimizer, server=None, run_name="local",
                      estimators=[LossEstimator(), GradNormEstimator()])
    seen = _train(monitor, model, optimizer, steps=6)
    latest = monitor.latest()
    last_loss, last_norm = seen[-1]
    assert latest["loss"] == pytest.approx(last_loss, rel=0, abs=0)  # the same float32
    # Both norms are float64 sums of the same float32 gradients, in different orders.
    assert latest["grad_norm"] == pytest.approx(last_norm, rel=1e-12)
    assert latest["step"] == 5
    assert latest["agent_estimator_interval_steps{estimator=toy_loss}"] == 1
    assert monitor.run_id is None and monitor.sender is None
    assert monitor.close() is True


def test_default_estimators_report_loss_and_grad_norm_in_process() -> None:
    torch.set_num_threads(1)
    model = small_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = classification_data()
    # Steps of this model take microseconds, so the budget would stretch even the
    # per-step statistics; max_interval_factor=1 keeps the default cadences.
    monitor = Monitor(model, optimizer, server=None, run_name="defaults",
                      probes={"rare": Probe(inputs[:8], targets[:8])},
                      common_probe=Probe(inputs[8:], targets[8:]),
                      config=MonitorConfig(max_interval_factor=1))
    seen = _train(monitor, model, optimizer, steps=12)
    latest = monitor.latest()
    last_loss, last_norm = seen[-1]
    assert latest["loss"] == pytest.approx(last_loss, rel=1e-6)  # float32 loss, as a float
    # float32 norm of the gradient against a float64 reference over the same values.
    assert latest["grad_norm"] == pytest.approx(last_norm, rel=1e-5)
    assert monitor.estimator_errors == {}
    assert {"gradient_stats", "sharpness", "fisher", "probes"} <= set(monitor.intervals)


def test_an_estimator_that_raises_is_logged_once_counted_and_training_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    model = small_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, optimizer, server=None,
                      estimators=[FailingEstimator(), LossEstimator()])
    with caplog.at_level(logging.WARNING, logger="raresignal"):
        seen = _train(monitor, model, optimizer, steps=5)
    assert monitor.estimator_errors == {"toy_failing": 5}
    assert monitor.latest()["agent_estimator_errors_total{estimator=toy_failing}"] == 5
    assert monitor.latest()["loss"] == seen[-1][0]  # the estimator after it still ran
    failures = [r for r in caplog.records if "toy_failing" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None


def test_step_never_raises_on_odd_input() -> None:
    model = small_classifier()
    monitor = Monitor(model, None, server=None, estimators=[LossEstimator()])
    monitor.step(loss=None)  # the loss estimator fails on it; step does not
    monitor.step(loss=float("nan"), batch=("not", "tensors"))
    monitor.step(loss=torch.tensor(2.5))
    assert monitor.estimator_errors == {"toy_loss": 1}
    assert monitor.latest()["loss"] == 2.5
    assert monitor.step_count == 3


def test_disabled_monitor_does_nothing() -> None:
    monitor = Monitor(small_classifier(), None, server="127.0.0.1:1",
                      estimators=[LossEstimator()], config=MonitorConfig(enabled=False))
    monitor.step(loss=torch.tensor(1.0))
    assert monitor.latest() == {} and monitor.sender is None


def test_state_dict_resumes_step_cadence_and_estimator_state() -> None:
    # No stretching (max_interval_factor=1): steps here take microseconds, so the budget
    # would otherwise move cadences by timing noise.
    config = MonitorConfig(max_interval_factor=1)
    sleepy = SleepyEstimator("toy_sleepy", seconds=0.0, default_interval=3)
    monitor = Monitor(small_classifier(), None, estimators=[sleepy, LossEstimator()],
                      config=config)
    for _ in range(10):
        monitor.step(loss=torch.tensor(1.0))
    state = monitor.state_dict()

    resumed_sleepy = SleepyEstimator("toy_sleepy", seconds=0.0, default_interval=3)
    resumed = Monitor(small_classifier(), None, estimators=[resumed_sleepy,
                                                             LossEstimator()], config=config)
    resumed.load_state_dict(state)
    assert resumed.step_count == 10 and resumed_sleepy.runs == sleepy.runs
    for _ in range(5):
        monitor.step(loss=torch.tensor(1.0))
        resumed.step(loss=torch.tensor(1.0))
    assert resumed_sleepy.runs == sleepy.runs == [0, 3, 6, 9, 12]


def test_first_step_holds_an_estimator_back_and_is_optional() -> None:
    """An estimator's ``first_step`` delays its first run; one without the attribute (a
    duck-typed estimator) is accepted and starts at step 0, the protocol's default."""
    warm = SleepyEstimator("warm", 0.0, default_interval=2, expensive=False)
    warm.first_step = 5
    plain = SleepyEstimator("plain", 0.0, default_interval=2, expensive=False)
    assert not hasattr(plain, "first_step")
    # max_interval_factor=1 pins the cadences: steps without training cost nothing.
    monitor = Monitor(small_classifier(), None, estimators=[warm, plain],
                      config=MonitorConfig(max_interval_factor=1))
    for _ in range(10):
        monitor.step(loss=torch.tensor(1.0))
    assert plain.runs == [0, 2, 4, 6, 8]
    assert warm.runs == [5, 7, 9]


def test_bad_arguments_get_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown task 'ranking'"):
        Monitor(small_classifier(), None, task="ranking")  # default estimators
    with pytest.raises(ValueError, match="target_overhead"):
        MonitorConfig(target_overhead=1.5)
    with pytest.raises(TypeError, match="is not an Estimator"):
        Monitor(small_classifier(), None, estimators=[object()])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="state must be one of"):
        Monitor(small_classifier(), None, estimators=[]).close("exploded")
    with pytest.raises(ValueError, match="state format"):
        Monitor(small_classifier(), None, estimators=[]).load_state_dict({"format": 99})
