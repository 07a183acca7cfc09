"""What every task family of the detection benchmark provides, and its settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from raresignal.agent import Probe

Batch = tuple[torch.Tensor, torch.Tensor]

# Seed offsets keep the agent's probes, the benchmark's held-out set and the training
# stream of one run apart: the ground truth never reads an example the agent probes.
PROBE_SEED_OFFSET = 10_000
HELDOUT_SEED_OFFSET = 20_000


@dataclass(frozen=True)
class FamilySettings:
    """Optimiser settings, the rare slice and the strength of each induced change."""

    learning_rate: float
    batch_size: int
    rare_fraction: float  # share of training examples from the rare slice
    classes: int  # outputs of the model; chance accuracy is 1 / classes
    base_weight_decay: float  # AdamW weight decay of the healthy run
    lr_spike_factor: float  # the learning rate is multiplied by this in ``lr_spike``
    collapse_weight_decay: float  # AdamW weight decay set in ``weight_decay_jump``
    # The full-batch edge-of-stability control: a gradient-descent rate at which
    # sharpness settles at 2 / lr while the loss keeps falling, measured (None: no such
    # rate is known for the family, which then has no such control).
    eos_sgd_lr: float | None = None
    full_batch_size: int = 256  # examples of the fixed full batch
    # Measured training cost (one thread, the benchmark's machine), for the estimate
    # printed before a recording starts.
    seconds_per_1000_steps: float = 10.0

    @property
    def chance(self) -> float:
        return 1.0 / self.classes


class TaskFamily(Protocol):
    """A task with a common skill and a rare one, and a downstream task without the rare.

    ``probes`` are the agent's labelled eval sets (rare, common); ``heldout`` is the
    benchmark's own rare eval set, for the ground truth. Every draw comes from an explicit
    generator, so a run is a function of its seed.
    """

    name: str
    settings: FamilySettings

    def make_model(self) -> nn.Module: ...

    def batch(self, size: int, rare_fraction: float, generator: torch.Generator,
              downstream: bool = False) -> Batch: ...

    def probes(self, seed: int, size: int) -> tuple[Probe, Probe]: ...

    def heldout(self, seed: int, size: int) -> Batch: ...


def mix(rare: Batch, common: Batch, generator: torch.Generator) -> Batch:
    """One shuffled batch of the two parts."""
    inputs = torch.cat([rare[0], common[0]])
    targets = torch.cat([rare[1], common[1]])
    order = torch.randperm(len(targets), generator=generator)
    return inputs[order], targets[order]


def rare_count(size: int, rare_fraction: float, generator: torch.Generator) -> int:
    """How many of ``size`` examples are rare: each one with ``rare_fraction``."""
    return int((torch.rand(size, generator=generator) < rare_fraction).sum())
