"""What happens to a run: four collapse mechanisms and the healthy controls.

A collapse scenario changes the training setup from the run's change step, ramped in over
``ramp_steps`` (real failures are usually gradual: a data mix drifts away from a slice, a
schedule climbs past stability, a fine-tuning mix shifts); it is expected to destroy the
rare skill. A control changes a run as healthy runs change (a schedule, warm restarts, a
batch size, a resume, a skill learned late, full-batch training at the edge of stability)
and keeps the rare skill, so any rare-signal alert on it is a false alarm. Every control
runs the full length of the plan. The full-batch controls train on one fixed batch with
the optimiser and rate the family measured to reach the edge of stability
(``FullBatchRun``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from detection_families import FamilySettings, FullBatchRun


@dataclass
class TrainingSetup:
    """The knobs a scenario may turn while the run is going, and their values at the
    change step (every change is a function of those and of its ramp, so it can ramp)."""

    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    rare_fraction: float
    batch_size: int
    downstream_fraction: float = 0.0  # share of batches drawn from the downstream task
    _base: dict[str, list[float]] = field(default_factory=dict)

    def capture(self) -> None:
        """Remember the values at the change step; the ramp moves away from these."""
        groups = self.optimizer.param_groups
        self._base = {"lr": [float(g["lr"]) for g in groups],
                      "weight_decay": [float(g.get("weight_decay", 0.0)) for g in groups]}

    def set_learning_rate(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def scale_learning_rate(self, factor: float) -> None:
        for group, base in zip(self.optimizer.param_groups, self._base["lr"], strict=True):
            group["lr"] = base * factor

    def move_weight_decay(self, target: float, ramp: float) -> None:
        for group, base in zip(self.optimizer.param_groups, self._base["weight_decay"],
                               strict=True):
            group["weight_decay"] = base + ramp * (target - base)


# (setup, family settings, ramp in (0, 1]) -> None, from the change step on.
Change = Callable[[TrainingSetup, FamilySettings, float], None]
# (setup, family settings, share of the run done in [0, 1)) -> None, at every step.
Schedule = Callable[[TrainingSetup, FamilySettings, float], None]


def _nothing(setup: TrainingSetup, settings: FamilySettings, value: float) -> None:
    return None


@dataclass(frozen=True)
class Scenario:
    name: str
    collapse: bool  # True: the rare skill is expected to collapse after the change
    description: str
    change: Change = _nothing
    schedule: Schedule = _nothing
    starts_without_rare: bool = False  # the rare slice enters the mix at the change
    resumes: bool = False  # the run is checkpointed and resumed at the change step
    # The optimiser of a full-batch run for the whole run ("gd" or "adam"), or None.
    full_batch: str | None = None

    def applies_to(self, settings: FamilySettings) -> bool:
        """An edge-of-stability control needs a rate known to reach the edge."""
        return self.learning_rate(settings) is not None

    def full_batch_run(self, settings: FamilySettings) -> FullBatchRun | None:
        return None if self.full_batch is None else settings.full_batch_run(self.full_batch)

    def learning_rate(self, settings: FamilySettings) -> float | None:
        if self.full_batch is None:
            return settings.learning_rate
        run = self.full_batch_run(settings)
        return None if run is None else run.learning_rate


def _drop_rare(setup: TrainingSetup, settings: FamilySettings, ramp: float) -> None:
    setup.rare_fraction = settings.rare_fraction * (1.0 - ramp)


def _lr_spike(setup: TrainingSetup, settings: FamilySettings, ramp: float) -> None:
    setup.scale_learning_rate(settings.lr_spike_factor ** ramp)  # a geometric climb


def _weight_decay_jump(setup: TrainingSetup, settings: FamilySettings, ramp: float) -> None:
    setup.move_weight_decay(settings.collapse_weight_decay, ramp)


def _finetune_other_task(setup: TrainingSetup, settings: FamilySettings,
                         ramp: float) -> None:
    setup.downstream_fraction = ramp


def _rare_enters(setup: TrainingSetup, settings: FamilySettings, ramp: float) -> None:
    setup.rare_fraction = settings.rare_fraction * ramp


THINNED_TO = 0.4  # share of the rare slice left in the thinning control


def _thin_rare(setup: TrainingSetup, settings: FamilySettings, ramp: float) -> None:
    setup.rare_fraction = settings.rare_fraction * (1.0 - (1.0 - THINNED_TO) * ramp)


WARMUP_SHARE = 0.05  # of the run, in the warm-up + cosine control
COSINE_FLOOR = 0.1  # the cosine decays the learning rate to this share of its peak


def _warmup_cosine(setup: TrainingSetup, settings: FamilySettings, done: float) -> None:
    if done < WARMUP_SHARE:
        factor = (done + 1e-3) / WARMUP_SHARE  # the offset keeps step 0 from a zero rate
    else:
        phase = (done - WARMUP_SHARE) / (1.0 - WARMUP_SHARE)
        factor = COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * phase))
    setup.set_learning_rate(settings.learning_rate * factor)


# Cosine annealing with warm restarts (SGDR, Loshchilov and Hutter 2017): cycles of 10%,
# 20% and 40% of the run (restarts at 10%, 30% and 70%), then a last one cut by the end;
# each decays to COSINE_FLOOR of the peak and restarts at the peak at once.
RESTART_FIRST_CYCLE = 0.1
RESTART_CYCLE_GROWTH = 2


def restart_cycle(done: float) -> tuple[float, float]:
    """(share of the run done when the current cycle began, that cycle's length)."""
    start, length = 0.0, RESTART_FIRST_CYCLE
    while done >= start + length:
        start, length = start + length, length * RESTART_CYCLE_GROWTH
    return start, length


def _warm_restarts(setup: TrainingSetup, settings: FamilySettings, done: float) -> None:
    start, length = restart_cycle(done)
    phase = (done - start) / length
    factor = COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * phase))
    setup.set_learning_rate(settings.learning_rate * factor)


BATCH_GROWTH = 4  # the batch-size control grows the batch this many times


def _grow_batch(setup: TrainingSetup, settings: FamilySettings, ramp: float) -> None:
    setup.batch_size = round(settings.batch_size * (1 + (BATCH_GROWTH - 1) * ramp))


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("drop_rare", True, "rare slice phased out of the data mix", change=_drop_rare),
    Scenario("lr_spike", True, "learning rate climbing past stability", change=_lr_spike),
    Scenario("weight_decay_jump", True,
             "AdamW weight decay raised far above the run's (over-regularisation)",
             change=_weight_decay_jump),
    Scenario("finetune_other_task", True,
             "fine-tuning mix shifting to a task without the rare rule",
             change=_finetune_other_task),
    Scenario("continued", False, "plain continued training"),
    Scenario("rare_learned_late", False,
             "the rare slice enters the mix at the change step: the skill is learned, "
             "not lost", change=_rare_enters, starts_without_rare=True),
    Scenario("rare_thinning", False,
             f"the rare slice thins to {THINNED_TO:.0%} of its share; the skill survives",
             change=_thin_rare),
    Scenario("warmup_cosine", False,
             f"linear learning-rate warm-up over {WARMUP_SHARE:.0%} of the run, then "
             f"cosine decay to {COSINE_FLOOR:g}x", schedule=_warmup_cosine),
    Scenario("warm_restarts", False,
             f"cosine annealing to {COSINE_FLOOR:g}x with warm restarts (SGDR) at 10%, 30% "
             "and 70% of the run: the learning rate jumps back to its peak at once",
             schedule=_warm_restarts),
    Scenario("batch_size_change", False, f"the batch grows {BATCH_GROWTH}x",
             change=_grow_batch),
    Scenario("checkpoint_resume", False,
             "checkpointed at the change step; a new model, optimizer and Monitor load it "
             "and the run goes on", resumes=True),
    Scenario("edge_of_stability_gd", False,
             "full-batch gradient descent at a rate whose sharpness settles at 2 / lr",
             full_batch="gd"),
    Scenario("edge_of_stability_adam", False,
             "full-batch Adam at a rate whose preconditioned sharpness settles at "
             "38 / lr (beta1 0.9)", full_batch="adam"),
)
SCENARIOS_BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}
COLLAPSES = tuple(s.name for s in SCENARIOS if s.collapse)
CONTROLS = tuple(s.name for s in SCENARIOS if not s.collapse)


def ramp(step: int, change_step: int, ramp_steps: int) -> float | None:
    """How far the change has ramped in at ``step``: None before the change step, then
    (step - change + 1) / ramp_steps up to 1 (1 at once when ramp_steps is 0)."""
    if step < change_step:
        return None
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - change_step + 1) / ramp_steps)
