"""What every task family of the detection benchmark provides, and its settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import nn

from raresignal.agent import Probe

Batch = tuple[torch.Tensor, torch.Tensor]

# Seed offsets keep the agent's probes, the benchmark's held-out set and the training
# stream of one run apart: the ground truth never reads an example the agent probes.
PROBE_SEED_OFFSET = 10_000
HELDOUT_SEED_OFFSET = 20_000


@dataclass(frozen=True)
class FullBatchRun:
    """A full-batch edge-of-stability control: one fixed batch for the whole run, and an
    optimiser and rate measured to bring the sharpness to its stability threshold (2 / lr
    for gradient descent, 38 / lr preconditioned for Adam) while the run stays healthy."""

    optimizer: Literal["gd", "adam"]  # plain SGD, or Adam at its default betas
    learning_rate: float
    size: int  # examples of the fixed batch
    # Share of the common examples whose label is redrawn uniformly among the common
    # classes (the rare slice keeps its labels): a loss floor the model cannot reach by
    # separating the batch (see ``CommonLabelNoise``).
    common_label_noise: float = 0.0
    # Measured training cost, when it differs from the family's (a large fixed batch).
    seconds_per_1000_steps: float | None = None


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
    # The full-batch edge-of-stability controls measured to reach the edge on this
    # family, at most one per optimiser (a family without one has no such control).
    edge_of_stability: tuple[FullBatchRun, ...] = ()
    # Measured training cost (one thread, the benchmark's machine), for the estimate
    # printed before a recording starts.
    seconds_per_1000_steps: float = 10.0

    @property
    def chance(self) -> float:
        return 1.0 / self.classes

    def full_batch_run(self, optimizer: str) -> FullBatchRun | None:
        """The family's edge-of-stability run with ``optimizer``, if one is known."""
        return next((r for r in self.edge_of_stability if r.optimizer == optimizer), None)


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


@runtime_checkable
class CommonLabelNoise(Protocol):
    """A family whose full-batch run redraws some common labels (``common_label_noise``)."""

    def redraw_common_labels(self, targets: torch.Tensor, share: float,
                             generator: torch.Generator) -> torch.Tensor:
        """``targets`` with each common example's label redrawn with probability
        ``share``, uniformly among the common classes; rare labels unchanged."""
        ...


class ProbesFromExamples:
    """``probes`` and ``heldout`` for a family that draws a rare or a common set with
    ``examples(size, rare, generator)``, from the seed offsets that keep them apart."""

    def examples(self, size: int, rare: bool, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def probes(self, seed: int, size: int) -> tuple[Probe, Probe]:
        generator = torch.Generator().manual_seed(seed + PROBE_SEED_OFFSET)
        return (Probe(*self.examples(size, True, generator)),
                Probe(*self.examples(size, False, generator)))

    def heldout(self, seed: int, size: int) -> Batch:
        return self.examples(size, True,
                             torch.Generator().manual_seed(seed + HELDOUT_SEED_OFFSET))


def mix(rare: Batch, common: Batch, generator: torch.Generator) -> Batch:
    """One shuffled batch of the two parts."""
    inputs = torch.cat([rare[0], common[0]])
    targets = torch.cat([rare[1], common[1]])
    order = torch.randperm(len(targets), generator=generator)
    return inputs[order], targets[order]


def rare_count(size: int, rare_fraction: float, generator: torch.Generator) -> int:
    """How many of ``size`` examples are rare: each one with ``rare_fraction``."""
    return int((torch.rand(size, generator=generator) < rare_fraction).sum())
