"""Per-example gradients, reduced on the fly to what the estimators need.

Per-example gradients come from ``torch.func.vmap`` over ``torch.func.grad`` (one batched
pass; exact), chunked so at most ``chunk_size`` gradient copies exist at once, and each
chunk is reduced immediately to per-group squared norms and a d-dimensional sketch. Where
a layer has no vmap rule the fallback is one backward per example, which gives the same
numbers more slowly. Exact per-example gradients are preferred over the GNB estimator
(B * g_hat**2 of a batch gradient) because its cross terms add variance that grows with B,
and the sketched Fisher spectrum and the probe statistics need per-example gradients anyway.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import grad, vmap
from torch.utils._pytree import tree_map

from raresignal.agent.api import Units, run_units
from raresignal.agent.estimators.likelihood import Likelihood
from raresignal.agent.estimators.objective import FunctionalModel, Params, take, to_fp32_inputs
from raresignal.agent.estimators.sketch import GradientSketcher

VMAP = "vmap"
LOOP = "loop"


@dataclass(frozen=True)
class PerExampleSummary:
    """Per-example gradient statistics of N examples."""

    group_sq_norms: torch.Tensor  # [N, G]: |g_i restricted to group j|^2
    sketches: torch.Tensor  # [N, d]: S g_i
    counts: torch.Tensor  # [N]: scored tokens of example i
    groups: tuple[str, ...]

    @property
    def sq_norms(self) -> torch.Tensor:
        return self.group_sq_norms.sum(dim=1)


def repeat_batch(inputs: Any, targets: torch.Tensor, times: int) -> tuple[Any, torch.Tensor]:
    """The batch stacked ``times`` times (to draw several labels per example)."""
    if times == 1:
        return inputs, targets

    def rep(x: Any) -> Any:
        return x.repeat(times, *([1] * (x.dim() - 1))) if isinstance(x, torch.Tensor) else x

    return tree_map(rep, inputs), rep(targets)


class PerExampleGradients:
    """Computes per-example gradients of the NLL of given labels and reduces them."""

    def __init__(self, functional: FunctionalModel, likelihood: Likelihood,
                 sketcher: GradientSketcher, chunk_size: int, method: str) -> None:
        if method not in ("auto", VMAP, LOOP):
            raise ValueError(f"method must be 'auto', 'vmap' or 'loop', got {method!r}")
        self.functional = functional
        self.likelihood = likelihood
        self.sketcher = sketcher
        self.chunk_size = max(1, chunk_size)
        self.method = method
        self.parameters = functional.parameters
        group_names = self.parameters.group_names
        self._group_index = [group_names.index(g) for g in self.parameters.groups]
        self._frozen_point: Params | None = None

    def frozen(self, chunk_size: int | None = None) -> PerExampleGradients:
        """A copy that computes at the parameters and buffers as they are now (copied),
        ``chunk_size`` examples at a time: a measurement spread over training steps sees
        the step it started at."""
        frozen = copy.copy(self)
        frozen.chunk_size = max(1, chunk_size or self.chunk_size)
        frozen.functional = self.functional.with_frozen_buffers()
        frozen._frozen_point = self.parameters.fp32_copy()
        return frozen

    def point(self) -> Params:
        """The parameters (fp32) it computes at: the copy of a frozen one, else the live
        ones."""
        return self._point()

    def _point(self) -> Params:
        if self._frozen_point is not None:
            return self._frozen_point
        return self.parameters.fp32_detached()

    def logits(self, inputs: Any) -> torch.Tensor:
        with torch.no_grad():
            return self.functional.logits(self._point(),
                                          to_fp32_inputs(inputs, self.parameters.device))

    def summarize(self, inputs: Any, labels: torch.Tensor) -> PerExampleSummary:
        """Per-example gradients of -log p(labels_i | inputs_i), reduced."""
        return run_units(self.summarize_units(inputs, labels))

    def summarize_units(self, inputs: Any, labels: torch.Tensor
                        ) -> Units[PerExampleSummary]:
        """:meth:`summarize`, one chunk of examples per unit."""
        device = self.parameters.device
        inputs = to_fp32_inputs(inputs, device)
        labels = labels.to(device)
        n = int(labels.shape[0])
        point = self._point()
        norms, sketches = [], []
        for start in range(0, n, self.chunk_size):
            index = slice(start, min(start + self.chunk_size, n))
            grads = self._chunk_grads(point, take(inputs, index), labels[index])
            norms.append(self._group_norms(grads))
            sketches.append(self.sketcher.sketch_batched(grads))
            yield
        return PerExampleSummary(
            group_sq_norms=torch.cat(norms), sketches=torch.cat(sketches),
            counts=self.likelihood.counts(labels).float(), groups=self.parameters.group_names,
        )

    def _group_norms(self, grads: list[torch.Tensor]) -> torch.Tensor:
        batch = grads[0].shape[0]
        out = torch.zeros(batch, len(self.parameters.group_names), dtype=torch.float32,
                          device=grads[0].device)
        for g, column in zip(grads, self._group_index, strict=True):
            out[:, column] += g.reshape(batch, -1).float().pow(2).sum(dim=1)
        return out

    def _chunk_grads(self, point: Params, inputs: Any, labels: torch.Tensor,
                     ) -> list[torch.Tensor]:
        if self.method in ("auto", VMAP):
            try:
                return self._vmap_grads(point, inputs, labels)
            except RuntimeError:
                if self.method == VMAP:
                    raise
                self.method = LOOP  # this model has a layer without a vmap rule
        return self._loop_grads(point, inputs, labels)

    def _example_loss(self, params: Params, inputs: Any, labels: torch.Tensor) -> torch.Tensor:
        return self.likelihood.nll(self.functional.logits(params, inputs), labels).sum()

    def _vmap_grads(self, point: Params, inputs: Any, labels: torch.Tensor,
                    ) -> list[torch.Tensor]:
        def one(params: Params, x: Any, y: torch.Tensor) -> torch.Tensor:
            unsqueezed = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor)
                                  else t, x)
            return self._example_loss(params, unsqueezed, y.unsqueeze(0))

        with warnings.catch_warnings():
            # Layers without a batching rule still work through a slower fallback loop.
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            grads = vmap(grad(one), in_dims=(None, 0, 0))(point, inputs, labels)
        self.method = VMAP
        return [grads[n].detach() for n in self.parameters.names]

    def _loop_grads(self, point: Params, inputs: Any, labels: torch.Tensor,
                    ) -> list[torch.Tensor]:
        rows: list[list[torch.Tensor]] = []
        names = self.parameters.names
        for i in range(int(labels.shape[0])):
            leaves = {n: t.detach().requires_grad_(True) for n, t in point.items()}
            loss = self._example_loss(leaves, take(inputs, slice(i, i + 1)), labels[i : i + 1])
            grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
            rows.append([g if g is not None else torch.zeros_like(leaves[n])
                         for g, n in zip(grads, names, strict=True)])
        return [torch.stack(column) for column in zip(*rows, strict=True)]
