"""What happens to a run at its switch step: four collapse mechanisms, three healthy changes.

A scenario is a change to the training setup applied once, before the batch of the switch
step. Collapse scenarios are expected to destroy the rare slice; healthy ones change the
run as real runs change (a learning-rate decay, a new data order) but keep the rare slice,
so any alarm on them is a false alarm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from detection_tasks import FamilySettings


@dataclass
class TrainingSetup:
    """The knobs a scenario may turn while the run is going."""

    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    rare_fraction: float
    downstream: bool = False

    def scale_learning_rate(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] *= factor

    def set_weight_decay(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["weight_decay"] = value


Change = Callable[[TrainingSetup, FamilySettings], None]


@dataclass(frozen=True)
class Scenario:
    name: str
    collapse: bool  # True: the rare slice is expected to collapse after the switch
    change: Change
    description: str


def _drop_rare(setup: TrainingSetup, settings: FamilySettings) -> None:
    setup.rare_fraction = 0.0


def _lr_spike(setup: TrainingSetup, settings: FamilySettings) -> None:
    setup.scale_learning_rate(settings.lr_spike_factor)


def _weight_decay_jump(setup: TrainingSetup, settings: FamilySettings) -> None:
    setup.set_weight_decay(settings.collapse_weight_decay)


def _finetune_other_task(setup: TrainingSetup, settings: FamilySettings) -> None:
    setup.downstream = True


def _unchanged(setup: TrainingSetup, settings: FamilySettings) -> None:
    return None


def _lr_decay(setup: TrainingSetup, settings: FamilySettings) -> None:
    setup.scale_learning_rate(0.3)


def _reshuffle(setup: TrainingSetup, settings: FamilySettings) -> None:
    # A new data order from a new stream, and a mix with half as much again of the rare
    # slice (as when a dataset is re-balanced): the rare slice stays.
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=setup.generator))
    setup.generator.manual_seed(seed)
    setup.rare_fraction *= 1.5


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("drop_rare", True, _drop_rare, "rare slice dropped from the data mix"),
    Scenario("lr_spike", True, _lr_spike, "learning rate multiplied past stability"),
    Scenario("weight_decay_jump", True, _weight_decay_jump,
             "AdamW weight decay raised far above the run's (over-regularisation)"),
    Scenario("finetune_other_task", True, _finetune_other_task,
             "fine-tuning on a task without the rare rule"),
    Scenario("continued", False, _unchanged, "plain continued training"),
    Scenario("lr_decay", False, _lr_decay, "learning rate decayed to 0.3x"),
    Scenario("reshuffle", False, _reshuffle,
             "new data order and 1.5x the rare fraction"),
)
SCENARIOS_BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}
