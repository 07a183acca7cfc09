"""What happens to a run at its switch step: four collapse mechanisms, three healthy changes.

A scenario is a change to the training setup that starts at the switch step and ramps in
over ``ramp_steps`` steps (0: all at once). Real failures are usually gradual: a data
mixture drifts away from a slice, a schedule climbs past stability, a fine-tuning mix
shifts. Collapse scenarios are expected to destroy the rare slice; healthy ones change the
run as real runs change (a learning-rate decay, a new data order) but keep the rare slice,
so any alarm on them is a false alarm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from detection_tasks import FamilySettings


@dataclass
class TrainingSetup:
    """The knobs a scenario may turn while the run is going, and their values at the
    switch (every change is a function of those and of its progress, so it can ramp)."""

    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    rare_fraction: float
    downstream_fraction: float = 0.0  # share of batches drawn from the downstream task
    reshuffled: bool = False
    _base: dict[str, list[float]] = field(default_factory=dict)

    def capture(self) -> None:
        """Remember the values at the switch; the ramp moves away from these."""
        groups = self.optimizer.param_groups
        self._base = {"lr": [float(g["lr"]) for g in groups],
                      "weight_decay": [float(g.get("weight_decay", 0.0)) for g in groups],
                      "rare_fraction": [self.rare_fraction]}

    def scale_learning_rate(self, factor: float) -> None:
        for group, base in zip(self.optimizer.param_groups, self._base["lr"], strict=True):
            group["lr"] = base * factor

    def move_weight_decay(self, target: float, progress: float) -> None:
        for group, base in zip(self.optimizer.param_groups, self._base["weight_decay"],
                               strict=True):
            group["weight_decay"] = base + progress * (target - base)

    def scale_rare_fraction(self, factor: float) -> None:
        self.rare_fraction = self._base["rare_fraction"][0] * factor


# (setup, family settings, progress in (0, 1]) -> None; progress 1 is the full change.
Change = Callable[[TrainingSetup, FamilySettings, float], None]


@dataclass(frozen=True)
class Scenario:
    name: str
    collapse: bool  # True: the rare slice is expected to collapse after the switch
    change: Change
    description: str


def _drop_rare(setup: TrainingSetup, settings: FamilySettings, progress: float) -> None:
    setup.scale_rare_fraction(1.0 - progress)


def _lr_spike(setup: TrainingSetup, settings: FamilySettings, progress: float) -> None:
    setup.scale_learning_rate(settings.lr_spike_factor ** progress)  # geometric climb


def _weight_decay_jump(setup: TrainingSetup, settings: FamilySettings,
                       progress: float) -> None:
    setup.move_weight_decay(settings.collapse_weight_decay, progress)


def _finetune_other_task(setup: TrainingSetup, settings: FamilySettings,
                         progress: float) -> None:
    setup.downstream_fraction = progress


def _unchanged(setup: TrainingSetup, settings: FamilySettings, progress: float) -> None:
    return None


def _lr_decay(setup: TrainingSetup, settings: FamilySettings, progress: float) -> None:
    setup.scale_learning_rate(0.3 ** progress)


def _reshuffle(setup: TrainingSetup, settings: FamilySettings, progress: float) -> None:
    # A new data order from a new stream, and a mix with half as much again of the rare
    # slice (as when a dataset is re-balanced): the rare slice stays.
    if not setup.reshuffled:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=setup.generator))
        setup.generator.manual_seed(seed)
        setup.reshuffled = True
    setup.scale_rare_fraction(1.0 + 0.5 * progress)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("drop_rare", True, _drop_rare, "rare slice phased out of the data mix"),
    Scenario("lr_spike", True, _lr_spike, "learning rate climbing past stability"),
    Scenario("weight_decay_jump", True, _weight_decay_jump,
             "AdamW weight decay raised far above the run's (over-regularisation)"),
    Scenario("finetune_other_task", True, _finetune_other_task,
             "fine-tuning mix shifting to a task without the rare rule"),
    Scenario("continued", False, _unchanged, "plain continued training"),
    Scenario("lr_decay", False, _lr_decay, "learning rate decayed to 0.3x"),
    Scenario("reshuffle", False, _reshuffle,
             "new data order and 1.5x the rare fraction"),
)
SCENARIOS_BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}


def progress(step: int, switch_step: int, ramp_steps: int) -> float | None:
    """How far the change has ramped in at ``step``: None before the switch, then
    (step - switch + 1) / ramp_steps up to 1 (1 at the switch when ramp_steps is 0)."""
    if step < switch_step:
        return None
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - switch_step + 1) / ramp_steps)
