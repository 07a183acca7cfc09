"""What the default estimators share: their base class, the state the factory creates
once, and the filter their readings pass through.

The shared state: the sketcher (and its cached hash indices), the dominant subspace fed by
one estimator and read by others, the fixed curvature batch, and the step's gradient
sketch, which is computed once per step and handed on through ``ctx.cache``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from raresignal.agent.api import Estimator, ForwardFn, Measurement, Probe, StepContext
from raresignal.agent.estimators.config import EstimatorConfig
from raresignal.agent.estimators.likelihood import Likelihood
from raresignal.agent.estimators.objective import FunctionalModel, take
from raresignal.agent.estimators.parameters import ParameterSet
from raresignal.agent.estimators.per_example import PerExampleGradients
from raresignal.agent.estimators.sketch import GradientSketcher
from raresignal.agent.estimators.subspace import DominantSubspace

# ctx.cache keys. The runtime may set LOCAL_GRAD_SQ_NORM under data parallelism: this
# rank's squared gradient norm before the all-reduce (a float), which makes the noise
# scale free.
GRAD_SKETCH_KEY = "raresignal.grad_sketch"
LOCAL_GRAD_SQ_NORM_KEY = "raresignal.local_grad_sq_norm"


def finite(measurements: list[Measurement]) -> list[Measurement]:
    """Drops values that are not finite: they mean 'not measurable now', not a reading."""
    return [m for m in measurements if math.isfinite(m.value)]


@dataclass
class FixedBatch:
    """One batch that curvature is always measured on: the common probe's first examples,
    or the first training batch seen (copied, so later batches cannot change it)."""

    size: int
    inputs: Any = None
    targets: torch.Tensor | None = None

    @classmethod
    def from_probe(cls, probe: Probe | None, size: int) -> FixedBatch:
        batch = cls(size)
        if probe is not None:
            index = slice(0, min(size, len(probe)))
            batch.inputs, batch.targets = take(probe.inputs, index), probe.targets[index]
        return batch

    def get(self, ctx: StepContext) -> tuple[Any, torch.Tensor] | None:
        if self.targets is None and ctx.batch is not None:
            inputs, targets = ctx.batch
            index = slice(0, min(self.size, int(targets.shape[0])))
            self.inputs = copy_tensors(take(inputs, index))
            self.targets = targets[index].detach().clone()
        if self.targets is None:
            return None
        return self.inputs, self.targets


def with_common_first(probes: Mapping[str, Probe], common: Probe | None,
                      common_name: str) -> dict[str, Probe]:
    """Every probe set by name, the common probe (when there is one) first: it is the
    baseline the others are compared with."""
    named = dict(probes)
    return {common_name: common, **named} if common is not None else named


class RotatingSubsample:
    """A rotating share of each probe set: at effort ``level`` < 1 each measurement takes
    ``ceil(level * n)`` of a probe's ``n`` examples, starting where the previous one
    stopped, so that within ``ceil(1 / level)`` measurements every example is used. A mean
    over the examples taken estimates the whole probe's mean without bias, only noisier."""

    def __init__(self) -> None:
        self.level = 1.0
        self.offsets: dict[str, int] = {}  # where each probe's next subsample starts

    def set_level(self, level: float) -> float:
        if not level > 0:
            raise ValueError(f"effort must be in (0, 1], got {level}")
        self.level = min(1.0, level)
        return self.level

    def take(self, name: str, probe: Probe) -> Probe:
        """The examples of ``probe`` this measurement uses: all of them at full effort."""
        size = len(probe)
        count = math.ceil(self.level * size)
        if count >= size:
            return probe
        start = self.offsets.get(name, 0)
        index = (start + torch.arange(count)) % size
        self.offsets[name] = (start + count) % size
        return Probe(take(probe.inputs, index), probe.targets[index])

    def state_dict(self) -> dict[str, int]:
        return dict(self.offsets)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.offsets = {n: int(o) for n, o in state.items()}


def copy_tensors(inputs: Any) -> Any:
    """A copy of every tensor in ``inputs`` (a tensor, or a tuple, list or dict of them),
    detached: later training steps cannot change it."""
    return tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, inputs)


@dataclass
class SharedState:
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    forward: ForwardFn
    likelihood: Likelihood | None  # None for task "custom": a loss_fn, no likelihood
    config: EstimatorConfig
    parameters: ParameterSet
    sketcher: GradientSketcher
    dominant: DominantSubspace
    functional: FunctionalModel
    per_example: PerExampleGradients | None  # sampled-label gradients need a likelihood
    curvature_batch: FixedBatch
    notes: dict[str, str] = field(default_factory=dict)  # e.g. which HVP backend is used

    def generator(self, *salt: int) -> torch.Generator:
        """A CPU generator seeded from the config seed and ``salt``; global RNG untouched."""
        seed = self.config.seed
        for value in salt:
            seed = (seed * 1_000_003 + value) % (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    def unit_examples(self, ctx: StepContext, cap: int) -> int:
        """Examples per unit of a measurement spread over steps: at most ``cap``, and at
        most ``unit_batch_fraction`` of the training batch when its size is known."""
        if not ctx.batch_size:
            return cap
        return min(cap, max(1, math.ceil(self.config.unit_batch_fraction * ctx.batch_size)))

    def step_gradient_sketch(self, ctx: StepContext) -> torch.Tensor | None:
        """S g of this step's gradient, computed once per step and cached in ``ctx.cache``."""
        if GRAD_SKETCH_KEY not in ctx.cache:
            if all(g is None for g in self.parameters.grads()):
                ctx.cache[GRAD_SKETCH_KEY] = None
            else:
                ctx.cache[GRAD_SKETCH_KEY] = self.sketcher.sketch_grads()
        return ctx.cache[GRAD_SKETCH_KEY]


class DefaultEstimator(Estimator):
    """Base of the default estimators: the shared state and the cadence, full work at
    every effort and nothing to checkpoint unless a subclass says otherwise, and a
    ``plan(total_steps)`` hook the monitor calls with the run's planned length."""

    def __init__(self, shared: SharedState, default_interval: int) -> None:
        self.shared = shared
        self.default_interval = default_interval

    def set_effort(self, level: float) -> float | None:
        """This estimator cannot do less per run: full work whatever the level."""
        return 1.0

    def plan(self, total_steps: int) -> None:
        """Nothing of this estimator depends on the run's length."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None
