"""Rank of a layer's representation on a probe: a collapsing rank is an early warning.

Effective rank is exp of the entropy of the normalised singular values (Roy & Vetterli
2007); stable rank is |A|_F^2 / |A|_2^2; a unit is dormant when its mean absolute
activation is at most ``threshold`` times the layer average (Sokar et al. 2023).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class RepresentationStats:
    effective_rank: float
    stable_rank: float
    dormant_fraction: float


def representation_stats(features: torch.Tensor, dormant_threshold: float
                         ) -> RepresentationStats:
    """Ranks of a [samples, units] feature matrix (extra leading dims are flattened)."""
    matrix = features.detach().double().reshape(-1, features.shape[-1])
    s = torch.linalg.svdvals(matrix)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return RepresentationStats(0.0, 0.0, 1.0)
    p = s[s > 0] / s.sum()
    effective = float(torch.exp(-(p * p.log()).sum()))
    stable = float(s.pow(2).sum() / s[0].pow(2))
    activity = matrix.abs().mean(dim=0)
    score = activity / activity.mean().clamp(min=torch.finfo(torch.float64).tiny)
    dormant = float((score <= dormant_threshold).double().mean())
    return RepresentationStats(effective, stable, dormant)


def capture_features(model: nn.Module, layer: str, run: Callable[[], Any]) -> torch.Tensor:
    """Output of submodule ``layer`` (first element if it returns a tuple) during ``run``."""
    try:
        module = model.get_submodule(layer)
    except AttributeError as error:
        raise ValueError(f"model has no layer named {layer!r}") from error
    captured: list[torch.Tensor] = []

    def hook(_: nn.Module, __: Any, output: Any) -> None:
        captured.append((output[0] if isinstance(output, (tuple, list)) else output).detach())

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"layer {layer!r} did not run during the probe forward pass")
    return captured[-1]
