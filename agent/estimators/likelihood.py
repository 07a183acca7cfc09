"""The model's predictive distribution: per-example log-likelihood and label sampling.

The true Fisher needs labels drawn from the model itself, so every estimator speaks to
the likelihood through this one interface. Built in, by task name:

- "classification": softmax, logits [N, C], targets [N] of class indices;
- "causal_lm": next-token softmax, logits [N, T, V], targets [N, T] (-100 ignored);
- "masked_lm": the same with targets set only at masked positions (-100 elsewhere);
- "regression": Gaussian y ~ N(f(x), variance), outputs and targets [N, ...] (MSE);
- "multi_label": independent Bernoulli per output, logits and 0/1 targets [N, K] (BCE).

Any other likelihood plugs in by implementing the ``Likelihood`` protocol. A loss with no
likelihood (contrastive, diffusion, custom) is task "custom" with a ``loss_fn``: the
loss-based signals then come from that scalar, and the Fisher-based ones are unavailable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a target position that is not scored
DEFAULT_TASK = "classification"
CUSTOM_TASK = "custom"  # a loss_fn and no likelihood


@runtime_checkable
class Likelihood(Protocol):
    """What the estimators need to know about the model's output distribution."""

    def nll(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example negative log-likelihood summed over the example's tokens: [N]
        (up to a constant that does not depend on the parameters)."""
        ...

    def counts(self, targets: torch.Tensor) -> torch.Tensor:
        """Number of scored tokens per example: [N] (1 per example for classification)."""
        ...

    def sample_labels(self, logits: torch.Tensor, targets: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
        """Labels drawn from the model, shaped like ``targets`` (ignored positions kept)."""
        ...

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example number of correctly predicted tokens: [N] (NaN where the task has
        no notion of a correct prediction, so no accuracy is reported)."""
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


@dataclass(frozen=True)
class MaskedLMLikelihood(CausalLMLikelihood):
    """Masked-token softmax: logits [N, T, V] and targets [N, T] holding the original token
    at masked positions and -100 elsewhere (as Hugging Face masked-LM labels come: no
    shift). Sampled labels replace only the masked positions."""


def _flat_sum(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape[0], -1).sum(dim=1)


@dataclass(frozen=True)
class GaussianLikelihood:
    """Regression with squared error: y ~ N(f(x), variance) independently per output, so
    the NLL is |y - f(x)|^2 / (2 variance) summed over an example's outputs (the
    normalising constant dropped). ``variance`` scales the Fisher as 1 / variance; with
    the default 1 the NLL is half the summed squared error, the Fisher J^T J."""

    variance: float = 1.0

    def __post_init__(self) -> None:
        if not self.variance > 0:
            raise ValueError(f"variance must be positive, got {self.variance}")

    def nll(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        residual = logits.float() - targets.float().reshape(logits.shape)
        return _flat_sum(residual.pow(2)) / (2.0 * self.variance)

    def counts(self, targets: torch.Tensor) -> torch.Tensor:
        return torch.ones(targets.shape[0], dtype=torch.float32, device=targets.device)

    def sample_labels(self, logits: torch.Tensor, targets: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
        mean = logits.detach().float()
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
        drawn = mean + noise.to(mean.device) * self.variance ** 0.5
        return drawn.reshape(targets.shape)

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.full((targets.shape[0],), float("nan"), device=targets.device)


@dataclass(frozen=True)
class BernoulliLikelihood:
    """Multi-label: each output an independent Bernoulli with probability sigmoid(logit);
    logits and 0/1 targets [N, K] (BCE with logits, summed over the labels). Accuracy is
    the share of an example's labels predicted right."""

    def nll(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per_label = F.binary_cross_entropy_with_logits(
            logits.float(), targets.float().reshape(logits.shape), reduction="none")
        return _flat_sum(per_label)

    def counts(self, targets: torch.Tensor) -> torch.Tensor:
        return torch.ones(targets.shape[0], dtype=torch.float32, device=targets.device)

    def sample_labels(self, logits: torch.Tensor, targets: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
        probs = torch.sigmoid(logits.detach().float()).cpu()
        drawn = torch.bernoulli(probs, generator=generator).to(logits.device)
        return drawn.reshape(targets.shape).to(targets.dtype)

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hits = (logits > 0).float() == targets.float().reshape(logits.shape)
        return hits.float().reshape(targets.shape[0], -1).mean(dim=1)


BUILTIN_LIKELIHOODS: dict[str, Likelihood] = {
    "classification": ClassificationLikelihood(),
    "causal_lm": CausalLMLikelihood(),
    "masked_lm": MaskedLMLikelihood(),
    "regression": GaussianLikelihood(),
    "multi_label": BernoulliLikelihood(),
}


def likelihood_for_task(task: str | Likelihood) -> Likelihood:
    """The built-in likelihood of a task name (``BUILTIN_LIKELIHOODS``), or the given likelihood
    unchanged. A regression with another noise variance passes
    ``GaussianLikelihood(variance=...)``."""
    if isinstance(task, str):
        if task not in BUILTIN_LIKELIHOODS:
            raise ValueError(f"unknown task {task!r}; expected one of "
                             f"{sorted(BUILTIN_LIKELIHOODS)} "
                             "or a Likelihood")
        return BUILTIN_LIKELIHOODS[task]
    if not isinstance(task, Likelihood):
        raise TypeError(f"task must be a task name or a Likelihood, got {type(task).__name__}")
    return task


def mean_nll(likelihood: Likelihood, logits: torch.Tensor,
             targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per scored token: the usual training loss."""
    total = likelihood.counts(targets).sum().clamp(min=1.0)
    return likelihood.nll(logits, targets).sum() / total


def resolve_task(task: str | Likelihood | None, has_loss_fn: bool) -> Likelihood | None:
    """The likelihood the Fisher-based signals sample from, or None for task "custom".

    No task means "custom" when a ``loss_fn`` is given, else ``DEFAULT_TASK``. A likelihood
    task with a ``loss_fn`` keeps both: the ``loss_fn`` is the training loss (sharpness,
    noise scale, probe loss) and the likelihood gives the Fisher (e.g. a label-smoothed
    classification loss).
    """
    if task is None:
        task = CUSTOM_TASK if has_loss_fn else DEFAULT_TASK
    if task == CUSTOM_TASK:
        if not has_loss_fn:
            raise ValueError("task 'custom' needs loss_fn=(model, inputs, targets) -> scalar")
        return None
    return likelihood_for_task(task)
