"""Small, exactly computable estimators and models for the runtime tests.

The real estimators are tested on their own; these make the runtime's behaviour (cadence,
error handling, collectives, reporting) easy to predict.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from toy_estimators import LossEstimator  # noqa: F401 - the runtime tests import it from here

from raresignal.agent.api import Measurement, MeasurementUnits, StepContext


class GradNormEstimator:
    """Reports the L2 norm of the (all-reduced, averaged) gradient."""

    name = "toy_grad_norm"
    default_interval = 1
    expensive = False

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        squares = sum(float(p.grad.double().pow(2).sum()) for p in ctx.model.parameters()
                      if p.grad is not None)
        return [Measurement("grad_norm", squares ** 0.5)]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class SleepyEstimator:
    """Costs ``seconds`` of wall time per run; counts its runs in its state."""

    expensive = True

    def __init__(self, name: str, seconds: float, default_interval: int = 1,
                 expensive: bool = True) -> None:
        self.name = name
        self.seconds = seconds
        self.default_interval = default_interval
        self.expensive = expensive
        self.runs: list[int] = []

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        time.sleep(self.seconds)
        self.runs.append(ctx.step)
        return [Measurement("hessian_vector_products", float(len(self.runs)))]

    def state_dict(self) -> dict[str, Any]:
        return {"runs": list(self.runs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.runs = list(state["runs"])


class FailingEstimator:
    """Raises on every run."""

    name = "toy_failing"
    default_interval = 1
    expensive = False

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        raise RuntimeError(f"deliberate failure at step {ctx.step}")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class CollectiveEstimator:
    """Issues one all-reduce of its rank + 1 and reports the sum: under torch.distributed
    a rank that skipped it would hang the others, so finishing proves the ranks agree."""

    def __init__(self, name: str, default_interval: int, expensive: bool) -> None:
        self.name = name
        self.default_interval = default_interval
        self.expensive = expensive
        self.runs: list[int] = []

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        total = ctx.distributed.all_reduce_sum(torch.tensor([ctx.distributed.rank + 1.0]))
        self.runs.append(ctx.step)
        return [Measurement("hessian_trace", float(total))]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class ResumableCollectiveEstimator:
    """A resumable measurement of ``units`` units, each one all-reduce of rank + 1 after
    ``unit_seconds`` of sleep; reports the sum of the reductions. Under torch.distributed a
    unit run on one rank and not the other pairs the all-reduces wrongly: the sum is then
    off, or the ranks hang."""

    expensive = True
    default_interval = 1000

    def __init__(self, name: str, units: int, unit_seconds: float) -> None:
        self.name = name
        self.units = units
        self.unit_seconds = unit_seconds
        self.units_done = 0

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        raise AssertionError("the monitor runs a resumable estimator in units")

    def run_in_units(self, ctx: StepContext) -> MeasurementUnits:
        total = 0.0
        for _ in range(self.units):
            time.sleep(self.unit_seconds)
            total += float(ctx.distributed.all_reduce_sum(
                torch.tensor([ctx.distributed.rank + 1.0])))
            self.units_done += 1
            yield
        return [Measurement("sharpness", total)]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def small_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def classification_data(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=generator), torch.randint(0, 3, (n,),
                                                                 generator=generator)


def train_monitored(monitor: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                    inputs: torch.Tensor, targets: torch.Tensor, steps: int) -> None:
    """``steps`` full-batch cross-entropy steps, each reported to ``monitor`` with its
    loss and batch."""
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        monitor.step(loss=loss, batch=(inputs, targets))
        optimizer.step()
