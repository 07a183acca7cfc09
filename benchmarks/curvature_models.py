"""The models and data the curvature benchmark measures on, small enough for exact answers.

Each workload is a model trained for a few steps on a synthetic task whose labels come
from a fixed random teacher, so the curvature is measured mid-training (not at the
random initialisation, where the Hessian is atypical) and every run is reproducible
from its seed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from raresignal.agent.estimators import CausalLMLikelihood, ClassificationLikelihood, Likelihood
from raresignal.agent.estimators.likelihood import IGNORE_INDEX


@dataclass
class Workload:
    """A model at a mid-training point, the fixed batch curvature is measured on, and a
    source of fresh training batches to move it with."""

    name: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    likelihood: Likelihood
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor,
             params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Mean NLL per scored token, the loss every method here differentiates; at
        ``params`` instead of the model's own values when given."""
        logits = (self.model(inputs) if params is None
                  else functional_call(self.model, dict(params), (inputs,)))
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           targets.reshape(-1), ignore_index=IGNORE_INDEX)

    def to(self, device: torch.device) -> Workload:
        """The model and the fixed batch on ``device`` (fresh batches follow them)."""
        self.model.to(device)
        self.inputs, self.targets = self.inputs.to(device), self.targets.to(device)
        draw = self.next_batch
        self.next_batch = lambda: tuple(t.to(device) for t in draw())  # type: ignore[assignment]
        return self

    def sgd_steps(self, steps: int, lr: float) -> None:
        """Plain SGD on fresh batches: moves the model the way training does."""
        optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.model.train()
        for _ in range(steps):
            inputs, targets = self.next_batch()
            optimizer.zero_grad(set_to_none=True)
            self.loss(inputs, targets).backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.model.eval()


def mlp(inputs: int, hidden: int, classes: int, depth: int = 1) -> nn.Sequential:
    """Tanh MLP (smooth, so every layer has curvature; BackPACK supports every module)."""
    layers: list[nn.Module] = []
    width = inputs
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.Tanh()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def cnn(side: int, channels: int, classes: int) -> nn.Sequential:
    """Two convolutions and a linear head on 1 x side x side images."""
    after_first = side - 2
    after_second = (after_first - 3) // 2 + 1
    return nn.Sequential(
        nn.Conv2d(1, channels, 3), nn.Tanh(),
        nn.Conv2d(channels, 2 * channels, 3, stride=2), nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * channels * after_second * after_second, classes),
    )


class TinyCausalTransformer(nn.Module):
    """One pre-norm decoder block built on ``nn.MultiheadAttention`` (which BackPACK has
    no extension for), token and position embeddings, a linear vocabulary head."""

    def __init__(self, vocab: int, width: int, heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.attn_norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.Tanh(),
                                 nn.Linear(2 * width, width))
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[-1]
        x = self.embed(tokens) + self.position(torch.arange(length, device=tokens.device))
        mask = torch.triu(torch.full((length, length), float("-inf"), device=tokens.device),
                          diagonal=1)
        h = self.attn_norm(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        x = x + self.mlp(self.mlp_norm(x))
        return self.head(x)


def _teacher_labels(teacher: nn.Module, inputs: torch.Tensor, noise: float,
                    generator: torch.Generator) -> torch.Tensor:
    """Teacher's argmax, with a fraction ``noise`` of labels redrawn uniformly (so the
    task is not separable and the loss, hence the curvature, stays away from zero)."""
    with torch.no_grad():
        logits = teacher(inputs)
    labels = logits.argmax(-1)
    flip = torch.rand(labels.shape, generator=generator) < noise
    random = torch.randint(0, logits.shape[-1], labels.shape, generator=generator)
    return torch.where(flip, random, labels)


def _classification(name: str, model: nn.Module, teacher: nn.Module,
                    shape: tuple[int, ...], batch: int, seed: int,
                    warmup_steps: int, lr: float) -> Workload:
    generator = torch.Generator().manual_seed(seed + 1)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn((batch, *shape), generator=generator)
        return x, _teacher_labels(teacher, x, 0.1, generator)

    inputs, targets = draw()
    workload = Workload(name, model, inputs, targets, ClassificationLikelihood(), draw)
    workload.sgd_steps(warmup_steps, lr)
    return workload


def small_mlp(seed: int, quick: bool, batch: int = 64, warmup_steps: int = 100) -> Workload:
    """An MLP small enough for the full Hessian (a few hundred to ~1k parameters).

    Longer training closes the gap between its top two Hessian eigenvalues, which is what
    sets the cost of power iteration."""
    torch.manual_seed(seed)
    width, hidden = (8, 16) if quick else (16, 48)
    name = "small MLP" if warmup_steps == 100 else f"small MLP, {warmup_steps} steps"
    return _classification(name, mlp(width, hidden, 4), mlp(width, 32, 4),
                           (width,), batch, seed, warmup_steps=warmup_steps, lr=0.2)


def fisher_mlp(seed: int, quick: bool, batch: int = 64) -> Workload:
    """A two-hidden-layer MLP for the Fisher comparison (BackPACK supports all of it)."""
    torch.manual_seed(seed)
    width, hidden, classes = (12, 16, 5) if quick else (32, 64, 10)
    return _classification("MLP", mlp(width, hidden, classes, depth=2),
                           mlp(width, 32, classes), (width,), batch, seed,
                           warmup_steps=100, lr=0.2)


def larger_mlp(seed: int, quick: bool, batch: int = 64) -> Workload:
    """A two-hidden-layer MLP too large for the full Hessian (~22k parameters)."""
    torch.manual_seed(seed)
    width, hidden = (16, 48) if quick else (32, 128)
    return _classification("larger MLP", mlp(width, hidden, 10, depth=2),
                           mlp(width, 32, 10), (width,), batch, seed,
                           warmup_steps=100, lr=0.2)


def small_cnn(seed: int, quick: bool, batch: int = 64) -> Workload:
    """A CNN too large for the full Hessian (thousands of parameters)."""
    torch.manual_seed(seed)
    side, channels = (10, 6) if quick else (16, 16)
    model = cnn(side, channels, 10)
    teacher = nn.Sequential(nn.Flatten(), mlp(side * side, 32, 10))
    return _classification("CNN", model, teacher, (1, side, side), batch, seed,
                           warmup_steps=100, lr=0.1)


def tiny_transformer(seed: int, quick: bool, batch: int = 16) -> Workload:
    """A causal transformer on sequences where each token is a fixed function of the one
    before (with 20% noise), so next-token prediction is learnable but not trivial."""
    torch.manual_seed(seed)
    vocab, width, context = (8, 16, 6) if quick else (16, 32, 12)
    model = TinyCausalTransformer(vocab, width, heads=2, context=context)
    generator = torch.Generator().manual_seed(seed + 1)
    successor = torch.randperm(vocab, generator=generator)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.empty(batch, context + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=generator)
        for t in range(1, context + 1):
            noisy = torch.rand(batch, generator=generator) < 0.2
            random = torch.randint(0, vocab, (batch,), generator=generator)
            tokens[:, t] = torch.where(noisy, random, successor[tokens[:, t - 1]])
        return tokens[:, :-1], tokens[:, 1:]

    inputs, targets = draw()
    workload = Workload("tiny transformer", model, inputs, targets, CausalLMLikelihood(), draw)
    workload.sgd_steps(100, 0.1)
    return workload
