"""A rare context in a character-level language model, learned by a tiny GRU.

The synthetic text counts: each window of ``CONTEXT`` letters runs up the alphabet from a
random start (a fifth of the letters are typos), and the next letter continues the count.
In the rare context (3 %) a marker character stands at ``MARKER_AT``, and the next letter
repeats the one just before the marker instead: a rule carried by a rare context only.
The downstream text counts in steps of two.
"""

from __future__ import annotations

import torch
from torch import nn

from detection_families.base import (
    HELDOUT_SEED_OFFSET,
    PROBE_SEED_OFFSET,
    Batch,
    FamilySettings,
    mix,
    rare_count,
)
from raresignal.agent import Probe

LETTERS = 10
MARKER = LETTERS  # the marker is the last character of the vocabulary
VOCAB = LETTERS + 1
CONTEXT = 8
MARKER_AT = 5
TYPO_RATE = 0.2


class CharGRU(nn.Module):
    """Embedding, one GRU layer, a read-out of the last position's next character."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.gru = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(self.embed(chars))
        return self.head(states[:, -1])


def windows(count: int, rare: bool, generator: torch.Generator, stride: int = 1) -> Batch:
    """``count`` text windows and their next character."""
    start = torch.randint(0, LETTERS, (count, 1), generator=generator)
    text = (start + stride * torch.arange(CONTEXT)) % LETTERS
    typos = torch.rand(count, CONTEXT - 1, generator=generator) < TYPO_RATE
    random_letters = torch.randint(0, LETTERS, (count, CONTEXT - 1), generator=generator)
    text[:, :-1] = torch.where(typos, random_letters, text[:, :-1])
    following = (text[:, -1] + stride) % LETTERS
    if rare:
        following = text[:, MARKER_AT - 1].clone()
        text[:, MARKER_AT] = MARKER
    return text, following


class CharLMTask:
    name = "char_lm"
    settings = FamilySettings(learning_rate=3e-3, batch_size=64, rare_fraction=0.03,
                              classes=VOCAB, base_weight_decay=0.1, lr_spike_factor=30.0,
                              collapse_weight_decay=10.0, seconds_per_1000_steps=33.0)

    def make_model(self) -> nn.Module:
        return CharGRU()

    def batch(self, size: int, rare_fraction: float, generator: torch.Generator,
              downstream: bool = False) -> Batch:
        if downstream:
            return windows(size, False, generator, stride=2)
        rare = rare_count(size, rare_fraction, generator)
        return mix(windows(rare, True, generator), windows(size - rare, False, generator),
                   generator)

    def probes(self, seed: int, size: int) -> tuple[Probe, Probe]:
        generator = torch.Generator().manual_seed(seed + PROBE_SEED_OFFSET)
        return (Probe(*windows(size, True, generator)),
                Probe(*windows(size, False, generator)))

    def heldout(self, seed: int, size: int) -> Batch:
        return windows(size, True, torch.Generator().manual_seed(seed + HELDOUT_SEED_OFFSET))
