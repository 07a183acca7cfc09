"""The model's predictive distribution: per-example log-likelihood and label sampling.

The true Fisher needs labels drawn from the model itself, so every estimator speaks to
the likelihood through this one interface. Classification (logits [N, C]) and causal
language modelling (logits [N, T, V], targets [N, T] with -100 ignored) come built in;
any other likelihood plugs in by implementing the ``Likelihood`` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a target position that is not scored


@runtime_checkable
class Likelihood(Protocol):
    """What the estimators need to know about the model's output distribution."""

    def nll(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example negative log-likelihood summed over the example's tokens: [N]."""
        ...

    def counts(self, targets: torch.Tensor) -> torch.Tensor:
        """Number of scored tokens per example: [N] (1 per example for classification)."""
        ...

    def sample_labels(self, logits: torch.Tensor, targets: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
        """Labels drawn from the model, shaped like ``targets`` (ignored positions kept)."""
        ...

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example number of correctly predicted tokens: [N]."""
        ...


def _categorical(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits.detach().float(), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    draws = torch.multinomial(flat.cpu(), 1, generator=generator).reshape(probs.shape[:-1])
    return draws.to(logits.device)


@dataclass(frozen=True)
class ClassificationLikelihood:
    """Softmax over classes: logits [N, C], targets [N] of class indices."""

    def nll(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, reduction="none")

    def counts(self, targets: torch.Tensor) -> torch.Tensor:
        return torch.ones(targets.shape[0], dtype=torch.float32, device=targets.device)

    def sample_labels(self, logits: torch.Tensor, targets: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
        return _categorical(logits, generator)

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(-1) == targets).float()


@dataclass(frozen=True)
class CausalLMLikelihood:
    """Next-token softmax: logits [N, T, V] aligned with targets [N, T], which hold -100
    where not scored (labels as a Hugging Face model takes them must first be shifted so
    that position t holds the token at t + 1)."""

    def nll(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per_token = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="none",
        ).reshape(targets.shape)
        return per_token.sum(dim=1)

    def counts(self, targets: torch.Tensor) -> torch.Tensor:
        return (targets != IGNORE_INDEX).sum(dim=1).float()

    def sample_labels(self, logits: torch.Tensor, targets: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
        drawn = _categorical(logits, generator)
        return torch.where(targets == IGNORE_INDEX, targets, drawn)

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hits = (logits.argmax(-1) == targets) & (targets != IGNORE_INDEX)
        return hits.sum(dim=1).float()


def likelihood_for_task(task: str | Likelihood) -> Likelihood:
    """The built-in likelihood of a task name, or the given likelihood unchanged."""
    if isinstance(task, str):
        builtin: dict[str, Likelihood] = {
            "classification": ClassificationLikelihood(),
            "causal_lm": CausalLMLikelihood(),
        }
        if task not in builtin:
            raise ValueError(f"unknown task {task!r}; expected one of {sorted(builtin)} "
                             "or a Likelihood")
        return builtin[task]
    if not isinstance(task, Likelihood):
        raise TypeError(f"task must be a task name or a Likelihood, got {type(task).__name__}")
    return task


def mean_nll(likelihood: Likelihood, logits: torch.Tensor,
             targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per scored token: the usual training loss."""
    total = likelihood.counts(targets).sum().clamp(min=1.0)
    return likelihood.nll(logits, targets).sum() / total
