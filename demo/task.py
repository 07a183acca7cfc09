"""The demo's synthetic task: a common rule on most examples and a rare rule on a few.

Every example is a short token sequence ``[marker, s1, s2, s3, s4, s5]`` whose label is one
of the symbols. On common examples the marker is a plain token and the label is ``s1``.
On rare examples the marker is a trigger token and the label is ``s2``: the model must
learn to *compose* the trigger with a different read-out position, from a few percent of
the data. Because the rare rule reuses everything the common rule learned except one
switch, a shift of the data mix or a jump in regularisation makes the common rule absorb
the rare examples — the failure raresignal is built to see coming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

SYMBOLS = 16  # content tokens 0..15, also the classes
PLAIN_MARKERS = (16, 17, 18)  # markers of common examples
TRIGGER = 19  # marker of rare examples
VOCAB = 20
SEQUENCE_LENGTH = 6
# Probes come from a generator the training stream never uses, so no probe example is
# ever trained on.
PROBE_SEED_OFFSET = 10_000

Examples = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TaskConfig:
    """Shape of the data: how rare the rare slice is and how big the probes are."""

    rare_fraction: float = 0.03
    probe_size: int = 128
    seed: int = 0


def make_examples(count: int, rare: bool, generator: torch.Generator) -> Examples:
    """``count`` examples all of one kind (rare or common), as (tokens [N, 6], labels [N])."""
    symbols = torch.randint(0, SYMBOLS, (count, SEQUENCE_LENGTH - 1), generator=generator)
    if rare:
        markers = torch.full((count, 1), TRIGGER)
        labels = symbols[:, 1]
    else:
        choice = torch.randint(0, len(PLAIN_MARKERS), (count, 1), generator=generator)
        markers = torch.tensor(PLAIN_MARKERS)[choice]
        labels = symbols[:, 0]
    return torch.cat([markers, symbols], dim=1), labels.clone()


def make_batch(batch_size: int, rare_fraction: float, generator: torch.Generator) -> Examples:
    """A shuffled training batch in which each example is rare with ``rare_fraction``."""
    is_rare = torch.rand(batch_size, generator=generator) < rare_fraction
    rare_count = int(is_rare.sum())
    rare_x, rare_y = make_examples(rare_count, True, generator)
    common_x, common_y = make_examples(batch_size - rare_count, False, generator)
    tokens = torch.cat([rare_x, common_x])
    labels = torch.cat([rare_y, common_y])
    order = torch.randperm(batch_size, generator=generator)
    return tokens[order], labels[order]


def probe_examples(size: int, seed: int) -> tuple[Examples, Examples]:
    """Held-out (rare, common) probe examples, ``size`` of each, for the run of ``seed``."""
    generator = torch.Generator().manual_seed(seed + PROBE_SEED_OFFSET)
    rare = make_examples(size, True, generator)
    common = make_examples(size, False, generator)
    return rare, common


class _Block(nn.Module):
    """Pre-norm self-attention and MLP, written with plain matmuls so that every operation
    has a double backward (Hessian-vector products need one)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        head_width = width // self.heads
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=-1)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, head_width).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_width), dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, length, width)
        x = x + self.out(attended)
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """A two-block transformer that classifies a sequence from its marker position."""

    def __init__(self, width: int = 32, heads: int = 2, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.randn(SEQUENCE_LENGTH, width) * 0.1)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(blocks))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, SYMBOLS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))
