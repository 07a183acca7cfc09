"""Leaves the training state as it was: module modes, gradients and RNG streams.

Estimators run between backward and ``optimizer.step()``; anything they disturb would
change the training they are measuring.

Most estimators measure the model as evaluated (eval mode: dropout off, batch norm on its
running statistics). Curvature is about the training dynamics instead, and a batch norm
normalises with the batch's own statistics there: a bias just before one cancels out of
the training loss (its gradient is zero, so Adam's second moment for it is about zero and
its preconditioner ``1 / eps``), while under running statistics it moves the output, so an
eval-mode Hessian has curvature along it that training never feels and that the
preconditioner multiplies a hundred-million-fold. ``batch_statistics`` (the batch norms
:func:`batch_norms` finds) keeps those normalising with the batch's statistics, without
touching their running ones;
those statistics are then the ones of whatever examples a forward pass sees, so a caller
that splits a batch into chunks must keep it whole (see :func:`batch_norms`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from raresignal.agent.api import T, Units

BatchNorm = nn.modules.batchnorm._BatchNorm


def batch_norms(model: nn.Module) -> list[BatchNorm]:
    """The batch norms that can normalise with batch statistics alone. A SyncBatchNorm is
    left out: in training mode it reduces its statistics across ranks, a collective an
    estimator must not issue on its own."""
    return [m for m in model.modules()
            if isinstance(m, BatchNorm) and not isinstance(m, nn.SyncBatchNorm)]


@contextlib.contextmanager
def preserved_training_state(model: nn.Module, eval_mode: bool = True,
                             batch_statistics: Sequence[BatchNorm] = ()) -> Iterator[None]:
    """Runs the body (in eval mode by default; the batch norms ``batch_statistics`` names
    normalise with the batch's statistics and update no running ones) and restores modes,
    ``.grad``s and RNG."""
    modes = [(module, module.training) for module in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    tracking = [(norm, norm.track_running_stats) for norm in batch_statistics]
    if eval_mode:
        model.eval()
    for norm in batch_statistics:
        # Training mode without tracking: batch statistics, running buffers untouched.
        norm.train()
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm, tracked in tracking:
            norm.track_running_stats = tracked
        for module, training in modes:
            module.training = training
        for p, grad in grads:
            p.grad = grad
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def isolated_units(model: nn.Module, units: Units[T], eval_mode: bool = True,
                   batch_statistics: Sequence[BatchNorm] = ()) -> Units[T]:
    """Runs each unit of ``units`` inside :func:`preserved_training_state`, so training,
    which goes on between two units, sees its own modes, gradients and RNG. The kinds
    the units name pass through."""
    try:
        while True:
            with preserved_training_state(model, eval_mode, batch_statistics):
                try:
                    kind = next(units)
                except StopIteration as done:
                    return done.value
            yield kind
    finally:
        units.close()
