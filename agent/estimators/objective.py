"""The loss as a pure function of the parameters, on one fixed batch, in fp32.

Curvature and per-example gradients need the loss as f(params): this wraps the user's
``forward(model, inputs)`` (and ``loss_fn(model, inputs, targets)`` where a training loop
has a loss with no likelihood) so ``torch.func.functional_call`` can swap in other
parameter values (fp32 copies, perturbed points, vmapped per-example slices) without
touching the model's own parameters or gradients.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from raresignal.agent.api import ForwardFn
from raresignal.agent.estimators.likelihood import Likelihood, mean_nll
from raresignal.agent.estimators.parameters import ParameterSet

Params = dict[str, torch.Tensor]
# The scalar training loss of a batch, for losses with no likelihood (contrastive,
# diffusion, custom): loss_fn(model, inputs, targets) -> scalar tensor.
LossFn = Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]


class _ForwardAdapter(nn.Module):
    """Makes ``forward(model, inputs)`` callable through ``functional_call``."""

    def __init__(self, model: nn.Module, forward: ForwardFn) -> None:
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, inputs: Any) -> torch.Tensor:
        return self._forward(self.model, inputs)


class _LossAdapter(nn.Module):
    """Makes ``loss_fn(model, inputs, targets)`` callable through ``functional_call``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        return self._loss_fn(self.model, inputs, targets)


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

    def __init__(self, model: nn.Module, forward: ForwardFn, parameters: ParameterSet,
                 loss_fn: LossFn | None = None) -> None:
        self.adapter = _ForwardAdapter(model, forward)
        self.loss_adapter = _LossAdapter(model, loss_fn) if loss_fn is not None else None
        self.parameters = parameters
        self._needs_cast = any(p.dtype != torch.float32 for p in parameters.params)

    def _buffers(self) -> Params:
        buffers = {f"model.{n}": b for n, b in self.adapter.model.named_buffers()}
        if self._needs_cast:
            buffers = {n: b.float() if b.is_floating_point() else b for n, b in buffers.items()}
        return buffers

    def with_frozen_buffers(self) -> FunctionalModel:
        """A copy that uses the buffers as they are now (cloned). A measurement spread over
        several training steps needs it: training updates buffers in place (batch-norm
        statistics), which would change its function and break a retained graph."""
        frozen = copy.copy(self)
        snapshot = {n: b.detach().clone() for n, b in self._buffers().items()}
        frozen._buffers = lambda: snapshot  # type: ignore[method-assign]
        return frozen

    def _state(self, params: Mapping[str, torch.Tensor]) -> Params:
        state = {f"model.{n}": t for n, t in params.items()}
        state.update(self._buffers())
        if self._needs_cast:
            # fp32 everywhere: frozen parameters too, so matmuls do not mix dtypes.
            for n, p in self.adapter.model.named_parameters():
                state.setdefault(f"model.{n}", p.detach().float())
        return state

    def logits(self, params: Mapping[str, torch.Tensor], inputs: Any) -> torch.Tensor:
        with torch.autocast(device_type=self.parameters.device.type, enabled=False):
            return functional_call(self.adapter, self._state(params), (inputs,),
                                   strict=False).float()

    def custom_loss(self, params: Mapping[str, torch.Tensor], inputs: Any,
                    targets: torch.Tensor) -> torch.Tensor:
        """The user's ``loss_fn`` at ``params``, a scalar."""
        if self.loss_adapter is None:
            raise ValueError("no loss_fn was given")
        with torch.autocast(device_type=self.parameters.device.type, enabled=False):
            return functional_call(self.loss_adapter, self._state(params), (inputs, targets),
                                   strict=False).float()


class TrainingLoss:
    """The scalar loss of a batch as f(params): the user's ``loss_fn`` where one is given,
    else the likelihood's mean NLL per scored token."""

    def __init__(self, functional: FunctionalModel, likelihood: Likelihood | None) -> None:
        if functional.loss_adapter is None and likelihood is None:
            raise ValueError("a loss needs a likelihood or a loss_fn")
        self.functional = functional
        self.likelihood = likelihood

    @property
    def custom(self) -> bool:
        return self.functional.loss_adapter is not None

    def __call__(self, params: Mapping[str, torch.Tensor], inputs: Any,
                 targets: torch.Tensor) -> torch.Tensor:
        if self.custom:
            return self.functional.custom_loss(params, inputs, targets)
        assert self.likelihood is not None
        return mean_nll(self.likelihood, self.functional.logits(params, inputs), targets)

    def weight(self, targets: torch.Tensor) -> float:
        """What the loss averages over: scored tokens, or examples for a ``loss_fn``."""
        if self.custom:
            return float(max(1, int(targets.shape[0])))
        assert self.likelihood is not None
        return float(self.likelihood.counts(targets).sum().clamp(min=1.0))


class BatchObjective:
    """The training loss on one fixed batch as a function of the parameters: f(params) ->
    scalar (the ``loss_fn`` if the functional model has one, else the mean NLL)."""

    def __init__(self, functional: FunctionalModel, likelihood: Likelihood | None,
                 inputs: Any, targets: torch.Tensor) -> None:
        device = functional.parameters.device
        self.functional = functional
        self.loss = TrainingLoss(functional, likelihood)
        self.inputs = to_fp32_inputs(inputs, device)
        self.targets = targets.to(device)

    def __call__(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.loss(params, self.inputs, self.targets)

    @property
    def names(self) -> tuple[str, ...]:
        return self.functional.parameters.names

    def point(self) -> Params:
        return self.functional.parameters.fp32_detached()


def loss_chunks(functional: FunctionalModel, likelihood: Likelihood | None,
                batch: tuple[Any, torch.Tensor], size: int
                ) -> list[tuple[BatchObjective, float]]:
    """The batch's loss as chunks of ``size`` examples, each with its share of the loss
    (its scored tokens over the batch's), so that the shares' sum of the chunks' losses is
    the batch's loss. A loss_fn (no likelihood) need not be a mean: it stays whole."""
    inputs, targets = batch
    whole = [(BatchObjective(functional, likelihood, inputs, targets), 1.0)]
    if likelihood is None or int(targets.shape[0]) <= size:
        return whole
    total = float(likelihood.counts(targets).sum())
    chunks = []
    for start in range(0, int(targets.shape[0]), size):
        index = slice(start, start + size)
        scored = float(likelihood.counts(targets[index]).sum())
        if scored > 0:
            chunks.append((BatchObjective(functional, likelihood, take(inputs, index),
                                          targets[index]), scored / total))
    return chunks or whole
