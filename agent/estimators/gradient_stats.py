"""Per-step gradient statistics: grad norm, update/weight ratio, non-finite values.

The last update |theta_t - theta_{t-1}| is read from a sketch of the parameters rather
than from a copy of them or from the optimizer's state: a copy costs a model's worth of
memory, and the optimizer's state gives the update only for some optimizers and misses
clipping, schedules and weight decay. The sketch is linear, so S theta_t - S theta_{t-1}
= S (theta_t - theta_{t-1}); it costs O(d) memory and one pass over the weights, and its
squared norm is within sqrt(2/d) (relative standard deviation, ~3% at d = 2048) of the
exact one. It is accumulated in fp64 so that tiny updates of large weights survive the
subtraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from raresignal.agent.estimators.parameters import ParameterSet
from raresignal.agent.estimators.sketch import GradientSketcher


def gradient_norm_and_nonfinite(parameters: ParameterSet) -> tuple[float, int]:
    """L2 norm of all gradients and how many of their entries are not finite."""
    grads = [g for g in parameters.grads() if g is not None]
    if not grads:
        return 0.0, 0
    norms = torch._foreach_norm([g.detach() for g in grads], 2.0)
    total = float(torch.linalg.vector_norm(torch.stack([n.float() for n in norms])))
    if math.isfinite(total):
        return total, 0
    bad = sum(int((~torch.isfinite(g)).sum()) for g in grads)
    return total, bad


def parameter_sketch(sketcher: GradientSketcher) -> torch.Tensor:
    """fp64 sketch of the parameter values (of the full values when they are sharded)."""
    return sketcher.sketch(list(sketcher.parameters.params), dtype=torch.float64)


@dataclass
class UpdateRatioTracker:
    """|theta_t - theta_{t-1}| / |theta_t| from parameter sketches of consecutive steps.

    A parameter sketch is one pass over every weight, so it is taken only on the two
    steps around each report: step s - 1 (remembered) and step s (compared), for s a
    multiple of ``every``. With ``every = 1`` every step is reported.
    """

    sketcher: GradientSketcher
    every: int = 1
    previous: torch.Tensor | None = None
    previous_step: int | None = None

    def observe(self, step: int) -> tuple[float | None, float | None]:
        """(weight norm, update ratio) at ``step``, each None when this step reports none."""
        report = step % self.every == 0 and self.previous_step == step - 1
        remember = (step + 1) % self.every == 0
        if not (report or remember):
            self.previous, self.previous_step = None, None
            return None, None
        current = parameter_sketch(self.sketcher)
        weight_norm = ratio = None
        if report and self.previous is not None:
            params = [p.detach() for p in self.sketcher.parameters.params]
            weight_norm = float(torch.linalg.vector_norm(
                torch.stack([n.double() for n in torch._foreach_norm(params, 2.0)])))
            if weight_norm > 0 and math.isfinite(weight_norm):
                ratio = float((current - self.previous).norm()) / weight_norm
        self.previous, self.previous_step = (current, step) if remember else (None, None)
        return weight_norm, ratio
