"""Per-step statistics: update/weight ratio from a copy of the parameters, non-finite counts."""

from __future__ import annotations

import math

import torch
from estimator_models import MLP

from raresignal.agent.estimators.gradient_stats import (
    UpdateRatioTracker,
    gradient_norm_and_nonfinite,
)
from raresignal.agent.estimators.parameters import ParameterSet


def test_update_ratio_is_exact(classification_batch) -> None:
    x, y = classification_batch
    torch.manual_seed(0)
    model = MLP()
    params = ParameterSet.from_model(model)
    tracker = UpdateRatioTracker(params)
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
        assert abs(weight_norm - float(current.norm())) <= 1e-6 * weight_norm
        assert ratio is not None and abs(ratio / exact - 1) <= 1e-5
        previous = current
    assert tracker.observe(9)[1] is None  # steps 6-8 unseen: no ratio across a gap


def test_update_ratio_of_bf16_weights_is_accumulated_wide() -> None:
    """bf16 weights: the difference of two close bf16 values is exact, and the norms are
    not rounded to bf16 (whose 8-bit mantissa would cost up to 0.4%)."""
    torch.manual_seed(1)
    model = torch.nn.Linear(300, 300).to(torch.bfloat16)
    params = ParameterSet.from_model(model)
    tracker = UpdateRatioTracker(params)
    tracker.observe(0)
    before = params.flatten(params.params).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    after = params.flatten(params.params).double()
    weight_norm, ratio = tracker.observe(1)
    assert abs(weight_norm / float(after.norm()) - 1) <= 1e-5  # fp32 sums, not bf16
    exact = float((after - before).norm() / after.norm())
    assert ratio is not None and abs(ratio / exact - 1) <= 1e-5


def test_update_ratio_copies_only_around_reported_steps(mlp) -> None:
    """With every=10 the ratio comes at steps 10, 20, ... and nowhere else, and the copy of
    the parameters is held only from the step before each."""
    tracker = UpdateRatioTracker(ParameterSet.from_model(mlp), every=10)
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
