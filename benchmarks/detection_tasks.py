"""The two task families of the detection benchmark, each with a rare slice to lose.

* ``token_rule``: the demo's token task (``raresignal.demo.task``). Common
  examples read out the first symbol; rare examples (3 %) carry a trigger token and read
  out the second — a rare compositional rule learned by a two-block transformer. Training
  adds 10 % label noise and AdamW weight decay 1.0 (see :class:`TokenRuleTask`).
* ``minority_class``: a Gaussian-mixture classifier with three common classes and one
  minority class (3 % of the data) sitting close to a common class, learned by an MLP.

Each family also has a *downstream* task, for the fine-tuning scenario: same inputs, a
different labelling rule that has no rare slice, so training on it overwrites the rare rule.
Every draw comes from an explicit ``torch.Generator``, so a run is a function of its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raresignal.agent import Probe
from raresignal.demo.task import (
    PROBE_SEED_OFFSET,
    SYMBOLS,
    TinyTransformer,
    make_batch,
    make_examples,
    probe_examples,
)

Batch = tuple[torch.Tensor, torch.Tensor]
RARE_FRACTION = 0.03


@dataclass(frozen=True)
class FamilySettings:
    """Optimiser settings and the strength of each induced failure, per family."""

    learning_rate: float
    batch_size: int
    base_weight_decay: float  # AdamW weight decay of the healthy run
    lr_spike_factor: float  # the learning rate is multiplied by this in ``lr_spike``
    collapse_weight_decay: float  # AdamW weight decay set in ``weight_decay_jump``


class TokenRuleTask:
    """The demo's rare compositional rule, reused as it ships."""

    name = "token_rule"
    # The rare rule has its own pathway (the trigger token) that nothing but rare examples
    # trains, so after convergence it outlives a dropped slice indefinitely unless the
    # weights keep moving. Real runs keep moving: the run has the usual AdamW weight decay
    # and 10 % label noise (an irreducible loss, as real data has), and the common rule
    # stays perfect throughout.
    settings = FamilySettings(learning_rate=3e-3, batch_size=64, base_weight_decay=1.0,
                              lr_spike_factor=100.0, collapse_weight_decay=8.0)
    label_noise = 0.1
    downstream_position = 3  # the downstream task reads out the third symbol instead

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


class MinorityClassTask:
    """Three common Gaussian classes and a 3 % minority class next to class 0.

    The geometry is fixed (seed 0) for every run, so seeds vary only the initialisation
    and the data order. The minority centre lies ``MINORITY_DISTANCE`` noise units from
    class 0: far enough to be learned, close enough that the prior pulls it back.
    """

    name = "minority_class"
    settings = FamilySettings(learning_rate=3e-3, batch_size=64, base_weight_decay=0.0,
                              lr_spike_factor=30.0, collapse_weight_decay=10.0)
    DIM = 16
    COMMON_CLASSES = 3
    MINORITY = 3
    MINORITY_DISTANCE = 4.0
    CENTRE_SCALE = 1.5

    def __init__(self) -> None:
        geometry = torch.Generator().manual_seed(0)
        common = torch.randn(self.COMMON_CLASSES, self.DIM, generator=geometry)
        common = common * self.CENTRE_SCALE
        direction = torch.randn(self.DIM, generator=geometry)
        minority = common[0] + self.MINORITY_DISTANCE * direction / direction.norm()
        self.centres = torch.cat([common, minority[None]])
        # The downstream task: three classes by a different linear rule, no minority.
        self.downstream_weights = torch.randn(self.DIM, self.COMMON_CLASSES,
                                              generator=geometry)

    def make_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(self.DIM, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                             nn.Linear(64, self.MINORITY + 1))

    def _examples(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(len(labels), self.DIM, generator=generator)
        return self.centres[labels] + noise

    def batch(self, size: int, rare_fraction: float, generator: torch.Generator,
              downstream: bool = False) -> Batch:
        is_rare = torch.rand(size, generator=generator) < rare_fraction
        common = torch.randint(0, self.COMMON_CLASSES, (size,), generator=generator)
        labels = torch.where(is_rare, torch.full_like(common, self.MINORITY), common)
        inputs = self._examples(labels, generator)
        if downstream:
            inputs = self._examples(common, generator)
            labels = (inputs @ self.downstream_weights).argmax(dim=1)
        return inputs, labels

    def probes(self, seed: int, size: int) -> tuple[Probe, Probe]:
        generator = torch.Generator().manual_seed(seed + PROBE_SEED_OFFSET)
        rare_labels = torch.full((size,), self.MINORITY)
        common_labels = torch.randint(0, self.COMMON_CLASSES, (size,), generator=generator)
        return (Probe(self._examples(rare_labels, generator), rare_labels),
                Probe(self._examples(common_labels, generator), common_labels))


TaskFamily = TokenRuleTask | MinorityClassTask
FAMILIES: dict[str, type[TokenRuleTask] | type[MinorityClassTask]] = {
    TokenRuleTask.name: TokenRuleTask,
    MinorityClassTask.name: MinorityClassTask,
}
