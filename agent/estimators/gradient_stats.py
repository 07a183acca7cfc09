"""Per-step statistics: grad norm, update/weight ratio, non-finite values.

The last update |theta_t - theta_{t-1}| is measured exactly: on the step before a reported
one the parameters are copied (this rank's part of each), and on the reported step the
copy is subtracted from them in place and its norm taken. That costs one copy and one
fused pass over the weights per report, and one copy of the parameters held over a single
training step in ``every``. A sketch of the parameters on both steps would hold O(d)
memory instead, but its scattered accumulation (two passes, in fp64 so that tiny updates
survive the subtraction) costs several times as much, which on CPU alone was over 3% of a
small transformer's step; the optimizer's state gives the update only for some
optimizers and misses clipping, schedules and weight decay.

Under FSDP each rank copies and compares its own rows, and the squared norms of a sharded
parameter's rows are summed over the ranks holding the others, so every rank reads the
ratio of the whole model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from raresignal.agent import distributed
from raresignal.agent.estimators.parameters import LocalPart, ParameterSet, local_part
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


def _whole_squared_norm(parts: Sequence[LocalPart], squares: torch.Tensor) -> float:
    """Sum of squares over whole parameters: ``squares[i]`` is this rank's sum for
    ``parts[i]``; the rows of a sharded parameter are summed over the ranks holding the
    others (one all-reduce per distinct mesh, in parameter order: the same on every rank)."""
    total = torch.zeros((), dtype=torch.float64, device=squares.device)
    meshes: dict[tuple[object, tuple[int, ...]], torch.Tensor] = {}
    for i, part in enumerate(parts):
        if part.sharded:
            key = (part.mesh, part.shard_dims)
            meshes[key] = meshes.get(key, torch.zeros_like(total)) + squares[i]
        else:
            total = total + squares[i]
    for (mesh, dims), shard_sum in meshes.items():
        total = total + distributed.sum_over_mesh(shard_sum.reshape(1), mesh, dims)[0]
    return float(total)


def _squares(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-tensor sums of squares in fp64, from one fused norm pass (accumulated in fp32 at
    least, so that bf16 weights do not round their norms to bf16)."""
    wide = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    norms = torch._foreach_norm(list(tensors), 2.0, dtype=wide)
    return torch.stack(norms).double().pow(2)


def ratio_at_peak_learning_rate(ratio: float, learning_rate: float | None,
                                peak_learning_rate: float) -> float | None:
    """The update/weight ratio rescaled to the highest learning rate the run has used:
    ``ratio * peak / lr``. A schedule moves the raw ratio with its rate (a warm restart
    multiplies it at once); rescaled, a rate back at a level the run already trained at
    leaves it where it was, while a rate climbing past its peak, a weight decay raised or
    a new data mix still move it. None without a positive, finite learning rate."""
    if (learning_rate is None or not math.isfinite(learning_rate) or learning_rate <= 0.0
            or not math.isfinite(peak_learning_rate)):
        return None
    return ratio * max(peak_learning_rate, learning_rate) / learning_rate


@dataclass
class UpdateRatioTracker:
    """|theta_t - theta_{t-1}| / |theta_t| from a copy of the parameters of the step
    before (see the module docstring).

    The copy is taken only on the step before each report: step s - 1 (remembered) and
    step s (compared), for s a multiple of ``every``. With ``every = 1`` every step is
    reported.
    """

    parameters: ParameterSet
    every: int = 1
    previous: list[torch.Tensor] | None = None  # this rank's part of each, at step s - 1
    previous_step: int | None = None

    def observe(self, step: int) -> tuple[float | None, float | None]:
        """(weight norm, update ratio) at ``step``, each None when this step reports none."""
        report = step % self.every == 0 and self.previous_step == step - 1
        remember = (step + 1) % self.every == 0
        if not (report or remember):
            self.previous, self.previous_step = None, None
            return None, None
        parts = [local_part(p) for p in self.parameters.params]
        current = [part.values for part in parts]
        weight_norm = ratio = None
        if report and self.previous is not None:
            # In place: the copy becomes theta_{s-1} - theta_s, and no second model-sized
            # buffer is made.
            torch._foreach_sub_(self.previous, current)
            update_sq = _whole_squared_norm(parts, _squares(self.previous))
            weight_norm = math.sqrt(_whole_squared_norm(parts, _squares(current)))
            if weight_norm > 0 and math.isfinite(weight_norm):
                ratio = math.sqrt(update_sq) / weight_norm
        self.previous, self.previous_step = (
            ([v.clone() for v in current], step) if remember else (None, None))
        return weight_norm, ratio
