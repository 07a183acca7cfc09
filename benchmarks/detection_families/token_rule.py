"""A rare compositional token rule learned by a two-block transformer (the demo's task).

Common examples read out the first symbol; rare examples (3 %) carry a trigger token and
read out the second. Training adds 10 % label noise and AdamW weight decay 1.0: the rare
rule has its own pathway (the trigger) that only rare examples train, so without a moving
run it would outlive a dropped slice indefinitely. The downstream task reads out the third
symbol.
"""

from __future__ import annotations

import torch
from torch import nn

from detection_families.base import (
    HELDOUT_SEED_OFFSET,
    Batch,
    FamilySettings,
)
from raresignal.agent import Probe
from raresignal.demo.task import SYMBOLS, TinyTransformer, make_batch, make_examples, probe_examples


class TokenRuleTask:
    name = "token_rule"
    settings = FamilySettings(learning_rate=3e-3, batch_size=64, rare_fraction=0.03,
                              classes=SYMBOLS, base_weight_decay=1.0, lr_spike_factor=100.0,
                              collapse_weight_decay=8.0, seconds_per_1000_steps=71.0)
    label_noise = 0.1
    downstream_position = 3

    def make_model(self) -> nn.Module:
        return TinyTransformer()

    def batch(self, size: int, rare_fraction: float, generator: torch.Generator,
              downstream: bool = False) -> Batch:
        if downstream:
            tokens, _ = make_examples(size, False, generator)
            labels = tokens[:, self.downstream_position].clone()
        else:
            tokens, labels = make_batch(size, rare_fraction, generator)
        noisy = torch.rand(size, generator=generator) < self.label_noise
        random_labels = torch.randint(0, SYMBOLS, (size,), generator=generator)
        return tokens, torch.where(noisy, random_labels, labels)

    def probes(self, seed: int, size: int) -> tuple[Probe, Probe]:
        rare, common = probe_examples(size, seed)
        return Probe(*rare), Probe(*common)

    def heldout(self, seed: int, size: int) -> Batch:
        return make_examples(size, True, torch.Generator().manual_seed(
            seed + HELDOUT_SEED_OFFSET))
