"""Turning what a training script already has into what the monitor needs.

Probes arrive in many shapes — a ``Probe``, an ``(inputs, targets)`` pair, a ``Dataset`` of
pairs or dicts, a ``DataLoader`` — and training batches too (tuples, lists, Hugging Face
dicts with ``labels``). These functions normalise all of them to ``Probe`` and
``(inputs, targets)`` so that the Lightning, Hugging Face and plain-PyTorch paths share one
definition of "a probe" and "a batch".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from raresignal.agent.api import Probe

# Everything a probe may be given as.
ProbeSource = Probe | tuple[Any, torch.Tensor] | Dataset | DataLoader | Iterable[Any]

DEFAULT_MAX_PROBE_EXAMPLES = 512
TARGET_KEYS = ("labels", "label", "targets", "target", "y")


def split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """``(inputs, targets)`` of one batch.

    Accepts ``(inputs, targets)`` tuples/lists (extra trailing items are ignored) and
    mappings holding the targets under ``labels``/``label``/``targets``/``target``/``y``
    (the rest of the mapping is the inputs, as Hugging Face models take them).
    """
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if key in batch:
                inputs = {k: v for k, v in batch.items() if k != key}
                return inputs, torch.as_tensor(batch[key])
        raise ValueError(f"a batch mapping needs its targets under one of {TARGET_KEYS}; "
                         f"got keys {sorted(batch)}")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], torch.as_tensor(batch[1])
    raise ValueError("a batch must be an (inputs, targets) pair or a mapping with 'labels'; "
                     f"got {type(batch).__name__}")


def _concatenate(parts: list[Any]) -> Any:
    """Joins batches along the first dimension, keeping tuples and dicts as they are."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {key: _concatenate([part[key] for part in parts]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_concatenate(list(items)) for items in zip(*parts, strict=True))
    raise TypeError(f"cannot join probe inputs of type {type(first).__name__}")


def _truncate(inputs: Any, count: int) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs[:count]
    if isinstance(inputs, Mapping):
        return {key: _truncate(value, count) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_truncate(item, count) for item in inputs)
    return inputs


def to_probe(source: ProbeSource, max_examples: int = DEFAULT_MAX_PROBE_EXAMPLES) -> Probe:
    """A ``Probe`` from a probe, a pair, a dataset or a data loader.

    Loads at most ``max_examples`` examples once, up front: a probe must be fixed so that
    its measurements are comparable from one step to the next.
    """
    if max_examples < 1:
        raise ValueError(f"max_examples must be at least 1, got {max_examples}")
    if isinstance(source, Probe):
        probe = source
    elif isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], torch.Tensor):
        probe = Probe(source[0], source[1])
    elif isinstance(source, DataLoader):
        probe = _probe_from_batches(source, max_examples)
    elif isinstance(source, Dataset) and hasattr(source, "__len__"):
        count = min(len(source), max_examples)  # type: ignore[arg-type]
        if count == 0:
            raise ValueError("the probe dataset is empty")
        probe = Probe(*split_batch(default_collate([source[i] for i in range(count)])))
    elif isinstance(source, Iterable):
        probe = _probe_from_batches(source, max_examples)
    else:
        raise TypeError("a probe must be a Probe, an (inputs, targets) pair, a Dataset or a "
                        f"DataLoader; got {type(source).__name__}")
    if len(probe) == 0:
        raise ValueError("the probe holds no examples")
    if len(probe) > max_examples:
        probe = Probe(_truncate(probe.inputs, max_examples), probe.targets[:max_examples])
    return probe


def _probe_from_batches(batches: Iterable[Any], max_examples: int) -> Probe:
    inputs_parts: list[Any] = []
    target_parts: list[torch.Tensor] = []
    seen = 0
    for batch in islice(batches, max_examples):
        inputs, targets = split_batch(batch)
        inputs_parts.append(inputs)
        target_parts.append(targets)
        seen += int(targets.shape[0])
        if seen >= max_examples:
            break
    if not target_parts:
        raise ValueError("the probe data loader yielded no batches")
    return Probe(_concatenate(inputs_parts), torch.cat(target_parts))


def to_probes(sources: Mapping[str, ProbeSource] | None,
              max_examples: int = DEFAULT_MAX_PROBE_EXAMPLES) -> dict[str, Probe]:
    """``{name: Probe}`` from ``{name: anything to_probe takes}``."""
    return {name: to_probe(source, max_examples) for name, source in (sources or {}).items()}


def move_to(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside it on ``device`` (probes follow the model)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Probe):
        return Probe(move_to(value.inputs, device), value.targets.to(device))
    if isinstance(value, Mapping):
        return {key: move_to(item, device) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(move_to(item, device) for item in value)
    return value
