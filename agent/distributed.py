"""How the monitor reaches the other ranks under torch.distributed (DDP, FSDP).

Estimators get a :class:`~raresignal.agent.api.DistributedContext` whose
``all_reduce_sum`` is exactly one all-reduce of the tensor given; the budget scheduler gets
an all-reduce with MAX. Both return a new tensor on the caller's device and leave the
argument alone. NCCL reduces only CUDA tensors, so CPU tensors travel through the current
CUDA device there and come back; gloo reduces CPU tensors in place.

Every rank must issue these collectives in the same order: the scheduler takes care of
that by running the same estimators at the same steps on every rank.

Under FSDP the sketch of a sharded gradient is the sum of the ranks' shard sketches;
:func:`sum_over_mesh` adds them up over the mesh dimensions the parameters are split on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from raresignal.agent.api import DistributedContext, ReduceFn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _collective_device(group: dist.ProcessGroup | None) -> torch.device | None:
    """The device a tensor must be on for the group's backend; None: any CPU tensor."""
    backend = dist.get_backend(group)
    if backend == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return None


def _reducer(op: dist.ReduceOp.RedOpType, group: dist.ProcessGroup | None) -> ReduceFn:
    device = _collective_device(group)

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        work = tensor.detach().to(device=device or tensor.device, copy=True)
        dist.all_reduce(work, op=op, group=group)
        return work.to(tensor.device)

    return reduce


def build_context(group: dist.ProcessGroup | None = None) -> DistributedContext:
    """The context of this process: rank, world size and a SUM all-reduce (the identity
    outside torch.distributed)."""
    if not is_distributed():
        return DistributedContext()
    return DistributedContext(
        rank=dist.get_rank(group),
        world_size=dist.get_world_size(group),
        all_reduce_sum=_reducer(dist.ReduceOp.SUM, group),
    )


def max_reducer(group: dist.ProcessGroup | None = None) -> ReduceFn | None:
    """A MAX all-reduce for the budget scheduler; None outside torch.distributed."""
    if not is_distributed():
        return None
    return _reducer(dist.ReduceOp.MAX, group)


def sum_over_mesh(tensor: torch.Tensor, mesh: DeviceMesh, dims: Sequence[int]) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks of ``mesh`` along ``dims`` (one all-reduce per
    dim, over that dim's process group): the ranks that hold the other shards."""
    for dim in dims:
        tensor = _reducer(dist.ReduceOp.SUM, mesh.get_group(dim))(tensor)
    return tensor
