"""The trainable parameters every estimator measures, in one fixed order, with groups.

Estimators agree on which parameters they look at and in which order, so flat vectors,
sketches and per-group reports line up between them.

Under FSDP2 (``fully_shard``) parameters and gradients are DTensors sharded on dim 0: each
rank holds a block of rows. :func:`local_part` says which block, as a flat offset into the
full flattened tensor, so that linear summaries (sketches, squared norms) of the blocks sum
over the ranks to the summary of the whole. Build the monitor after ``fully_shard``: it
replaces the module's parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from math import prod

import torch
from torch import nn

try:  # torch builds without distributed support have no DTensor
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None

# Name components wrappers insert (FSDP, torch.compile, activation checkpointing) and the
# leading "module" of DDP; stripped so that a parameter keeps its identity (and its sketch
# hash) however the model is wrapped.
_WRAPPER_COMPONENTS = frozenset(
    {"_fsdp_wrapped_module", "_orig_mod", "_checkpoint_wrapped_module"})

# Maps a parameter name to its group, or a mapping group -> name prefixes.
GroupSpec = Callable[[str], str] | Mapping[str, Sequence[str]] | None


def canonical_name(name: str) -> str:
    """The parameter's name without the prefixes wrappers insert anywhere in the path."""
    parts = [part for part in name.split(".") if part not in _WRAPPER_COMPONENTS]
    if len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def top_level_group(name: str) -> str:
    """Default grouping: the first component of the canonical name (``encoder``, ``head``)."""
    return canonical_name(name).split(".")[0]


def _group_function(spec: GroupSpec) -> Callable[[str], str]:
    if spec is None:
        return top_level_group
    if callable(spec):
        return spec
    prefixes = [(group, prefix) for group, ps in spec.items() for prefix in ps]
    prefixes.sort(key=lambda item: -len(item[1]))  # longest prefix wins

    def by_prefix(name: str) -> str:
        canonical = canonical_name(name)
        for group, prefix in prefixes:
            if canonical.startswith(prefix):
                return group
        return "other"

    return by_prefix


@dataclass(frozen=True)
class LocalPart:
    """The part of a tensor this rank holds: flat values starting at ``offset`` in the full
    flattened tensor. ``mesh`` and ``shard_dims`` name the mesh dimensions whose ranks hold
    the other parts (a sum over them makes the whole); both are empty for a whole tensor."""

    values: torch.Tensor
    offset: int = 0
    mesh: DeviceMesh | None = None
    shard_dims: tuple[int, ...] = ()

    @property
    def sharded(self) -> bool:
        return bool(self.shard_dims)


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor split across ranks (FSDP2's Shard placement)."""
    return (DTensor is not None and isinstance(tensor, DTensor)
            and any(isinstance(p, Shard) for p in tensor.placements))


def local_part(tensor: torch.Tensor) -> LocalPart:
    """This rank's part of ``tensor`` (detached, flat) and where it sits in the whole.

    Only Shard(0) placements keep a rank's block contiguous in the flattened tensor, and
    they are what FSDP2 uses; other shard dims and Partial values are refused. Uneven
    splits (the last ranks hold fewer rows, or none) come from DTensor's own layout rules,
    so the offsets match FSDP's padding-free local tensors.
    """
    if DTensor is None or not isinstance(tensor, DTensor):
        return LocalPart(tensor.detach().reshape(-1))
    placements = tensor.placements
    for placement in placements:
        if not isinstance(placement, (Shard, Replicate)):  # Partial: unreduced sums
            raise ValueError(f"cannot measure a DTensor with placement {placement}: only "
                             "Shard(0) and Replicate hold whole values of the full tensor")
        if isinstance(placement, Shard) and placement.dim != 0:
            raise ValueError(f"cannot measure a DTensor sharded on dim {placement.dim}: "
                             "only Shard(0) (FSDP's default) keeps a rank's block contiguous")
    local = tensor.to_local().detach().reshape(-1)
    shard_dims = tuple(i for i, p in enumerate(placements) if isinstance(p, Shard))
    if not shard_dims:
        return LocalPart(local)
    shape = tuple(tensor.shape)
    _, global_offset = compute_local_shape_and_global_offset(
        shape, tensor.device_mesh, placements)
    row_numel = prod(shape[1:])
    return LocalPart(local, global_offset[0] * row_numel, tensor.device_mesh, shard_dims)


@dataclass(frozen=True)
class ParameterSet:
    """Named trainable parameters of a model, their groups, and flat-vector conversions."""

    names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]
    groups: tuple[str, ...]

    @classmethod
    def from_model(cls, model: nn.Module, groups: GroupSpec = None) -> ParameterSet:
        group_of = _group_function(groups)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters to monitor")
        return cls(
            names=tuple(n for n, _ in named),
            params=tuple(p for _, p in named),
            groups=tuple(group_of(n) for n, _ in named),
        )

    def __iter__(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(zip(self.names, self.params, strict=True))

    def __len__(self) -> int:
        return len(self.params)

    @property
    def group_names(self) -> tuple[str, ...]:
        """Distinct groups in first-seen order."""
        return tuple(dict.fromkeys(self.groups))

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def sharded(self) -> bool:
        """True when some parameter is split across ranks (FSDP2): measurements that need
        every value of a parameter in one process cannot run without gathering it."""
        return any(is_sharded(p) for p in self.params)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def fp32_detached(self) -> dict[str, torch.Tensor]:
        """Parameter values as fp32 tensors cut from autograd (no copy when already fp32)."""
        return {n: p.detach().float() for n, p in self}

    def fp32_copy(self) -> dict[str, torch.Tensor]:
        """Parameter values as fp32 copies: a point that stays put while the optimizer
        steps in place (a measurement spread over several training steps reads it)."""
        return {n: p.detach().to(torch.float32, copy=True) for n, p in self}

    def grads(self) -> list[torch.Tensor | None]:
        return [p.grad for p in self.params]

    def flatten(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """One fp32 vector from tensors aligned with the parameters (None counts as zeros)."""
        parts = [
            (t.detach().float() if t is not None else torch.zeros_like(p, dtype=torch.float32))
            .reshape(-1)
            for t, p in zip(tensors, self.params, strict=True)
        ]
        return torch.cat(parts)

    def unflatten(self, vector: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector shaped like each parameter."""
        out, offset = [], 0
        for p in self.params:
            out.append(vector[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return out

