"""The loss as a pure function of the parameters, on one fixed batch, in fp32.

Curvature and per-example gradients need the loss as f(params): this wraps the user's
``forward(model, inputs)`` so ``torch.func.functional_call`` can swap in other parameter
values (fp32 copies, perturbed points, vmapped per-example slices) without touching the
model's own parameters or gradients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from raresignal.agent.api import ForwardFn
from raresignal.agent.estimators.likelihood import Likelihood, mean_nll
from raresignal.agent.estimators.parameters import ParameterSet

Params = dict[str, torch.Tensor]


class _ForwardAdapter(nn.Module):
    """Makes ``forward(model, inputs)`` callable through ``functional_call``."""

    def __init__(self, model: nn.Module, forward: ForwardFn) -> None:
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, inputs: Any) -> torch.Tensor:
        return self._forward(self.model, inputs)


def to_fp32_inputs(inputs: Any, device: torch.device) -> Any:
    """Moves inputs to ``device``; floating tensors become fp32 (curvature is in fp32)."""

    def convert(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            x = x.to(device)
            return x.float() if x.is_floating_point() else x
        return x

    return tree_map(convert, inputs)


def to_device(inputs: Any, device: torch.device) -> Any:
    """Moves every tensor of an input pytree to ``device``, dtypes unchanged."""
    return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, inputs)


def take(inputs: Any, index: torch.Tensor | slice) -> Any:
    """Rows ``index`` of every tensor in an input pytree."""
    return tree_map(lambda x: x[index] if isinstance(x, torch.Tensor) else x, inputs)


class FunctionalModel:
    """Calls the model with given parameter values (fp32), buffers as the model has them."""

    def __init__(self, model: nn.Module, forward: ForwardFn, parameters: ParameterSet) -> None:
        self.adapter = _ForwardAdapter(model, forward)
        self.parameters = parameters
        self._needs_cast = any(p.dtype != torch.float32 for p in parameters.params)

    def _buffers(self) -> Params:
        buffers = {f"model.{n}": b for n, b in self.adapter.model.named_buffers()}
        if self._needs_cast:
            buffers = {n: b.float() if b.is_floating_point() else b for n, b in buffers.items()}
        return buffers

    def logits(self, params: Mapping[str, torch.Tensor], inputs: Any) -> torch.Tensor:
        state = {f"model.{n}": t for n, t in params.items()}
        state.update(self._buffers())
        if self._needs_cast:
            # fp32 everywhere: frozen parameters too, so matmuls do not mix dtypes.
            for n, p in self.adapter.model.named_parameters():
                state.setdefault(f"model.{n}", p.detach().float())
        with torch.autocast(device_type=self.parameters.device.type, enabled=False):
            return functional_call(self.adapter, state, (inputs,), strict=False).float()


class BatchObjective:
    """Mean NLL on one fixed batch as a function of the parameters: f(params) -> scalar."""

    def __init__(self, functional: FunctionalModel, likelihood: Likelihood, inputs: Any,
                 targets: torch.Tensor) -> None:
        device = functional.parameters.device
        self.functional = functional
        self.likelihood = likelihood
        self.inputs = to_fp32_inputs(inputs, device)
        self.targets = targets.to(device)

    def __call__(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = self.functional.logits(params, self.inputs)
        return mean_nll(self.likelihood, logits, self.targets)

    @property
    def names(self) -> tuple[str, ...]:
        return self.functional.parameters.names

    def point(self) -> Params:
        return self.functional.parameters.fp32_detached()

