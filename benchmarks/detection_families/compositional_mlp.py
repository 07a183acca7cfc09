"""A common rule and a rare compositional rule (5 % of examples) learned by a tanh MLP.

Each example holds two symbols ``a`` and ``b`` (one-hot) and a flag. Common examples
(flag off) are labelled ``a``; rare ones (flag on) ``(a + b) mod SYMBOLS``, a rule that
needs both symbols at once. The downstream task labels common examples ``b``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from detection_families.base import (
    HELDOUT_SEED_OFFSET,
    PROBE_SEED_OFFSET,
    Batch,
    FamilySettings,
    mix,
    rare_count,
)
from raresignal.agent import Probe

SYMBOLS = 8


def examples(count: int, rare: bool, generator: torch.Generator,
             downstream: bool = False) -> Batch:
    a = torch.randint(0, SYMBOLS, (count,), generator=generator)
    b = torch.randint(0, SYMBOLS, (count,), generator=generator)
    flag = torch.full((count, 1), 1.0 if rare else 0.0)
    inputs = torch.cat([functional.one_hot(a, SYMBOLS).float(),
                        functional.one_hot(b, SYMBOLS).float(), flag], dim=1)
    labels = b if downstream else ((a + b) % SYMBOLS if rare else a)
    return inputs, labels


class CompositionalMLPTask:
    name = "compositional_mlp"
    settings = FamilySettings(learning_rate=1e-2, batch_size=64, rare_fraction=0.05,
                              classes=SYMBOLS, base_weight_decay=0.01, lr_spike_factor=30.0,
                              collapse_weight_decay=10.0, seconds_per_1000_steps=4.0)

    def make_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(2 * SYMBOLS + 1, 128), nn.Tanh(),
                             nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, SYMBOLS))

    def batch(self, size: int, rare_fraction: float, generator: torch.Generator,
              downstream: bool = False) -> Batch:
        if downstream:
            return examples(size, False, generator, downstream=True)
        rare = rare_count(size, rare_fraction, generator)
        return mix(examples(rare, True, generator), examples(size - rare, False, generator),
                   generator)

    def probes(self, seed: int, size: int) -> tuple[Probe, Probe]:
        generator = torch.Generator().manual_seed(seed + PROBE_SEED_OFFSET)
        return Probe(*examples(size, True, generator)), Probe(*examples(size, False, generator))

    def heldout(self, seed: int, size: int) -> Batch:
        return examples(size, True, torch.Generator().manual_seed(seed + HELDOUT_SEED_OFFSET))
