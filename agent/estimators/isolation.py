"""Leaves the training state as it was: module modes, gradients and RNG streams.

Estimators run between backward and ``optimizer.step()``; anything they disturb would
change the training they are measuring.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from raresignal.agent.api import T, Units


@contextlib.contextmanager
def preserved_training_state(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Runs the body (in eval mode by default) and restores modes, ``.grad``s and RNG."""
    modes = [(module, module.training) for module in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    if eval_mode:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for p, grad in grads:
            p.grad = grad
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def isolated_units(model: nn.Module, units: Units[T], eval_mode: bool = True) -> Units[T]:
    """Runs each unit of ``units`` inside :func:`preserved_training_state`, so training,
    which goes on between two units, sees its own modes, gradients and RNG. The kinds
    the units name pass through."""
    try:
        while True:
            with preserved_training_state(model, eval_mode):
                try:
                    kind = next(units)
                except StopIteration as done:
                    return done.value
            yield kind
    finally:
        units.close()
