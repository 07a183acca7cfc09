"""Per-step statistics: update/weight ratio from parameter sketches, non-finite counts."""

from __future__ import annotations

import math

import torch
from estimator_models import MLP

from raresignal.agent.estimators.gradient_stats import (
    UpdateRatioTracker,
    gradient_norm_and_nonfinite,
)
from raresignal.agent.estimators.parameters import ParameterSet
from raresignal.agent.estimators.sketch import GradientSketcher


def test_update_ratio_within_the_sketch_error(classification_batch) -> None:
    x, y = classification_batch
    torch.manual_seed(0)
    model = MLP()
    params = ParameterSet.from_model(model)
    tracker = UpdateRatioTracker(GradientSketcher(params, 2048, seed=4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    previous = params.flatten(params.params).double()
    assert tracker.observe(0)[1] is None  # no previous step yet
    for step in range(1, 6):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        current = params.flatten(params.params).double()
        exact = float((current - previous).norm() / current.norm())
        weight_norm, ratio = tracker.observe(step)
        assert abs(weight_norm - float(current.norm())) <= 1e-5 * weight_norm
        # |S u|^2 / |u|^2 has relative std sqrt(2/d); 5 std bounds the squared norm, so the
        # norm itself is within 5 sqrt(2/d) (half that, rounded up) of exact.
        assert ratio is not None and abs(ratio / exact - 1) <= 5 * math.sqrt(2 / 2048)
        previous = current
    assert tracker.observe(9)[1] is None  # steps 6-8 unseen: no ratio across a gap


def test_update_ratio_sketches_only_around_reported_steps(mlp) -> None:
    """With every=10 the ratio comes at steps 10, 20, ... and nowhere else."""
    tracker = UpdateRatioTracker(GradientSketcher(ParameterSet.from_model(mlp), 256, seed=1),
                                 every=10)
    reported = []
    for step in range(0, 31):
        with torch.no_grad():
            for p in mlp.parameters():
                p.add_(0.01)
        if tracker.observe(step)[1] is not None:
            reported.append(step)
        remembered = tracker.previous is not None
        assert remembered == ((step + 1) % 10 == 0)
    assert reported == [10, 20, 30]


def test_grad_norm_and_nonfinite_count(mlp) -> None:
    params = ParameterSet.from_model(mlp)
    for p in params.params:
        p.grad = torch.ones_like(p)
    norm, bad = gradient_norm_and_nonfinite(params)
    assert math.isclose(norm, math.sqrt(params.numel), rel_tol=1e-6) and bad == 0
    params.params[0].grad[0, 0] = float("nan")
    params.params[1].grad[:2] = float("inf")
    norm, bad = gradient_norm_and_nonfinite(params)
    assert not math.isfinite(norm) and bad == 3
