"""True Fisher information from labels sampled from the model, per layer group.

F = E_x E_{y ~ p(.|x)} [grad log p(y|x) grad log p(y|x)^T]. With labels drawn from the
model this is curvature (the Gauss-Newton matrix of the NLL); with dataset labels it is
the empirical Fisher, which is not (Kunstner et al. 2019), so it is reported beside the
true Fisher and never instead of it. Traces are per scored token, so they match the
Hessian of the mean token loss in scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from raresignal.agent.estimators.per_example import (
    PerExampleGradients,
    PerExampleSummary,
    repeat_batch,
)


@dataclass(frozen=True)
class FisherSpectrum:
    eigenvalues: torch.Tensor  # descending, of the sketched Fisher S F S^T
    effective_rank: float


def sample_model_labels(per_example: PerExampleGradients, inputs: Any, targets: torch.Tensor,
                        generator: torch.Generator, draws: int = 1,
                        ) -> tuple[Any, torch.Tensor]:
    """The batch repeated ``draws`` times, with labels drawn from the model's predictions."""
    inputs, targets = repeat_batch(inputs, targets, draws)
    logits = per_example.logits(inputs)
    return inputs, per_example.likelihood.sample_labels(logits, targets.to(logits.device),
                                                        generator)


def group_traces(summary: PerExampleSummary) -> dict[str, float]:
    """Trace of each group's diagonal block: sum_i |g_i|^2 over scored tokens."""
    total = float(summary.counts.sum().clamp(min=1.0))
    per_group = summary.group_sq_norms.sum(dim=0) / total
    return {g: float(v) for g, v in zip(summary.groups, per_group, strict=True)}


def effective_rank(eigenvalues: torch.Tensor) -> float:
    """exp of the Shannon entropy of the normalised spectrum (Roy & Vetterli 2007)."""
    positive = eigenvalues[eigenvalues > 0].double()
    if positive.numel() == 0:
        return float("nan")
    p = positive / positive.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def sketched_spectrum(summary: PerExampleSummary, k: int | None = None) -> FisherSpectrum:
    """Top-k eigenvalues of the sketched Fisher G^T G / n_tokens, from G = S g_i rows.

    They are the squared singular values of G, taken as the eigenvalues of the smaller
    Gram matrix (G G^T when there are fewer rows than sketch dimensions): the same numbers
    to rounding, several times faster than an SVD of G.
    """
    total = float(summary.counts.sum().clamp(min=1.0))
    g = summary.sketches.double()
    gram = g @ g.T if g.shape[0] <= g.shape[1] else g.T @ g
    values = torch.linalg.eigvalsh(gram).flip(0).clamp(min=0.0) / total
    rank = effective_rank(values)
    top = values[:k] if k is not None else values
    return FisherSpectrum(top.float(), rank if math.isfinite(rank) else float("nan"))
