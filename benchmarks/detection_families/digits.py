"""A rare class of images (one digit, 3 % of the stream) learned by a small CNN, on
scikit-learn's bundled 8x8 digits.

The images are split once (seed 0) into a training pool, a probe pool and a held-out pool
per class, so the agent's probes and the ground truth never see a training image. Training
images get pixel noise, so the CNN cannot simply memorise the rare class's few images.
The downstream task relabels the common digits by a shift and never shows the rare one.
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


def _load() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    return images, torch.tensor(digits.target, dtype=torch.long)


class DigitsTask:
    name = "digits"
    settings = FamilySettings(learning_rate=3e-3, batch_size=64, rare_fraction=0.03,
                              classes=10, base_weight_decay=0.01, lr_spike_factor=30.0,
                              collapse_weight_decay=10.0, seconds_per_1000_steps=16.0)
    RARE_DIGIT = 8
    NOISE = 0.15
    SPLIT = (0.6, 0.2)  # training and probe shares of each class; the rest is held out

    def __init__(self) -> None:
        images, labels = _load()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        images, labels = images[order], labels[order]
        self.pools: dict[tuple[bool, str], Batch] = {}
        for rare in (True, False):
            chosen = (labels == self.RARE_DIGIT) if rare else (labels != self.RARE_DIGIT)
            x, y = images[chosen], labels[chosen]
            train_end = int(self.SPLIT[0] * len(y))
            probe_end = train_end + int(self.SPLIT[1] * len(y))
            self.pools[rare, "train"] = x[:train_end], y[:train_end]
            self.pools[rare, "probe"] = x[train_end:probe_end], y[train_end:probe_end]
            self.pools[rare, "heldout"] = x[probe_end:], y[probe_end:]

    def make_model(self) -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GELU(),
                             nn.Conv2d(8, 16, 3, padding=1), nn.GELU(), nn.AvgPool2d(2),
                             nn.Flatten(), nn.Linear(16 * 4 * 4, 10))

    def _draw(self, rare: bool, count: int, generator: torch.Generator) -> Batch:
        x, y = self.pools[rare, "train"]
        index = torch.randint(0, len(y), (count,), generator=generator)
        noise = self.NOISE * torch.randn(count, *x.shape[1:], generator=generator)
        return x[index] + noise, y[index]

    def batch(self, size: int, rare_fraction: float, generator: torch.Generator,
              downstream: bool = False) -> Batch:
        if downstream:
            x, y = self._draw(False, size, generator)
            return x, (y + 1) % 10  # the shift lands a common digit on the rare label too
        rare = rare_count(size, rare_fraction, generator)
        return mix(self._draw(True, rare, generator), self._draw(False, size - rare, generator),
                   generator)

    def _sample(self, rare: bool, pool: str, size: int, generator: torch.Generator) -> Batch:
        x, y = self.pools[rare, pool]
        index = torch.randperm(len(y), generator=generator)[:size]
        return x[index], y[index]

    def probes(self, seed: int, size: int) -> tuple[Probe, Probe]:
        generator = torch.Generator().manual_seed(seed + PROBE_SEED_OFFSET)
        return (Probe(*self._sample(True, "probe", size, generator)),
                Probe(*self._sample(False, "probe", size, generator)))

    def heldout(self, seed: int, size: int) -> Batch:
        generator = torch.Generator().manual_seed(seed + HELDOUT_SEED_OFFSET)
        return self._sample(True, "heldout", size, generator)
