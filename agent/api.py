"""Contracts between the agent's parts: what an estimator sees and what it returns.

The runtime (monitor, budget scheduler, sender) and the estimators meet only here, so
either side can change without the other. Nothing in this module touches the network.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from raresignal.protos.catalog import spec as catalog_spec

# forward(model, inputs) -> logits. Classification: [N, C]; causal LM: [N, T, V].
ForwardFn = Callable[[nn.Module, Any], torch.Tensor]
# all_reduce_sum(tensor) -> tensor summed over ranks (identity in one process).
ReduceFn = Callable[[torch.Tensor], torch.Tensor]

T = TypeVar("T")
# Work cut into bounded units: each next() does one unit (e.g. one Hessian-vector
# product) and the generator finally returns its result (StopIteration.value). A yield
# may name the kind of the unit that follows it (the work up to the next yield, e.g.
# "reorthogonalise"), so that the runner can predict that unit's cost from earlier units
# of its kind (see raresignal.agent.resumable); a bare yield leaves it unnamed.
Units = Generator[str | None, None, T]


def default_forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Calls the model the usual way for its inputs and returns the logits: a dict is
    passed as keyword arguments, a tuple or list as positional ones, and an output with
    ``.logits`` (Hugging Face models) gives its logits."""
    if isinstance(inputs, Mapping):
        output = model(**inputs)
    elif isinstance(inputs, (tuple, list)):
        output = model(*inputs)
    else:
        output = model(inputs)
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"forward returned {type(output).__name__}, not logits; pass "
                        "forward=(model, inputs) -> logits to the Monitor")
    return logits


@dataclass(frozen=True)
class Measurement:
    """One value an estimator measured at the current step."""

    metric: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        allowed = catalog_spec(self.metric).labels
        for key, _ in self.labels:
            if key not in allowed:
                raise ValueError(f"label {key!r} is not allowed on metric {self.metric!r}")

    @property
    def key(self) -> str:
        return series_key(self.metric, dict(self.labels))


# A resumable estimator's measurement in units (see ResumableEstimator).
MeasurementUnits = Generator[str | None, None, Sequence[Measurement]]


def series_key(metric: str, labels: Mapping[str, str] | None = None) -> str:
    """A stable text key for one series, e.g. ``probe_accuracy{probe=rare}``."""
    if not labels:
        return metric
    inner = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return f"{metric}{{{inner}}}"


def parse_series_key(key: str) -> tuple[str, dict[str, str]]:
    """Inverse of :func:`series_key`: ``"m{a=b}"`` -> ``("m", {"a": "b"})``."""
    if "{" not in key:
        return key, {}
    metric, inner = key[:-1].split("{", 1)
    labels = dict(item.split("=", 1) for item in inner.split(",") if item)
    return metric, labels


@dataclass(frozen=True)
class Probe:
    """A fixed set of examples the monitor evaluates: inputs and their targets.

    ``inputs`` is whatever ``forward`` accepts (a tensor, or a tuple/dict of tensors);
    ``targets`` holds class indices ([N] for classification, [N, T] for causal LM,
    with -100 for positions to ignore).
    """

    inputs: Any
    targets: torch.Tensor

    def __len__(self) -> int:
        return int(self.targets.shape[0])


@dataclass
class DistributedContext:
    """How estimators reach the other ranks. Every rank must call the same reductions
    in the same order; the scheduler guarantees every rank runs the same estimators."""

    rank: int = 0
    world_size: int = 1
    all_reduce_sum: ReduceFn = field(default=lambda t: t)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


@dataclass
class StepContext:
    """What an estimator may look at during one optimizer step.

    Built by the monitor after backward (gradients final: unscaled, accumulated) and
    before ``optimizer.step()``. Estimators must leave gradients, parameters, the
    model's train/eval mode and the RNG state as they found them.
    """

    step: int
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    forward: ForwardFn
    loss: torch.Tensor | None = None  # detached training loss of this step
    batch: tuple[Any, torch.Tensor] | None = None  # (inputs, targets) of this step, if given
    batch_size: int | None = None
    distributed: DistributedContext = field(default_factory=DistributedContext)
    # Per-step cache an estimator may use to share work with later estimators of the same
    # step (e.g. the gradient sketch); emptied by the monitor after each step.
    cache: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Estimator(Protocol):
    """One measurement with its own cadence.

    ``name`` labels the estimator's timing series; ``default_interval`` is its cadence
    in optimizer steps before the budget scheduler adjusts it (1 = every step);
    ``expensive`` estimators are never run twice in one step and are the ones the
    scheduler stretches first.

    ``first_step``, ``needs_whole_parameters``, ``floor_measurements``, ``set_effort`` and
    ``plan`` have defaults:
    a class that subclasses ``Estimator`` inherits them, and the monitor also accepts an
    estimator that only has the other members (see :func:`is_estimator`), reading the
    defaults for it.
    """

    name: str
    default_interval: int
    expensive: bool
    first_step: int = 0
    """No run before this step, for an estimator that measures nothing during a warm-up
    (the scheduler then takes no empty run for its cost)."""
    needs_whole_parameters: bool = False
    """True when it needs every value of a parameter in one process (HVPs, per-example
    gradients): it is left out when the parameters are sharded (FSDP)."""
    floor_measurements: int | None = None
    """The fewest runs its signal needs in a planned run: the budget never stretches it
    past ``planned length // floor_measurements`` (``raresignal.agent.cadence``). None:
    ``MonitorConfig.floor_measurements``."""

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        """Measures at this step. May raise; the monitor logs, counts and goes on."""
        ...

    def set_effort(self, level: float) -> float | None:
        """Optional: do ``level`` (in (0, 1]; 1 = full) of a full run's work per run, for
        proportionally less time, e.g. fewer examples or iterations, keeping the readings
        comparable. The budget lowers it before it stretches the interval, and asks every
        rank for the same level. Returns the level applied (None: as asked); the default
        does full work always and returns 1.0."""
        return 1.0

    def plan(self, total_steps: int) -> None:
        """Optional: the run's planned length in optimizer steps, for an estimator whose
        warm-up or reference must fall within the run. The default ignores it."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (baselines, warm starts, sketches)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


# What an estimator must have; the other members of ``Estimator`` have defaults.
_REQUIRED_ATTRIBUTES = ("name", "default_interval", "expensive")
_REQUIRED_METHODS = ("run", "state_dict", "load_state_dict")


def is_estimator(candidate: object) -> bool:
    """Whether ``candidate`` has every required member of :class:`Estimator`.

    Unlike ``isinstance(candidate, Estimator)``, it accepts an estimator without the
    members that have defaults (``first_step``, ``needs_whole_parameters``,
    ``floor_measurements``).
    """
    return (all(hasattr(candidate, name) for name in _REQUIRED_ATTRIBUTES)
            and all(callable(getattr(candidate, name, None)) for name in _REQUIRED_METHODS))


@runtime_checkable
class ResumableEstimator(Estimator, Protocol):
    """An expensive estimator whose measurement can be spread over several steps.

    ``run_in_units(ctx)`` starts a measurement at ``ctx.step`` and returns a generator that
    does one bounded unit of work per ``next()`` and finally returns the measurements,
    which the monitor stamps with that starting step. A yield may name the kind of the
    unit that follows it (see ``Units``). Between two units training goes on,
    so each unit must leave the training state as it found it (modes, grads, RNG), and
    the estimator's own state (warm starts) changes only when the last unit completes: a
    measurement dropped half-way (``close()``) leaves it as it was. ``run(ctx)`` must equal
    running every unit at once. Under torch.distributed the ranks run their units in
    lockstep (see ``raresignal.agent.resumable``): units that issue collectives must be as
    many on every rank.
    """

    def run_in_units(self, ctx: StepContext) -> MeasurementUnits: ...


def is_resumable(estimator: object) -> bool:
    """Whether ``estimator`` offers ``run_in_units`` (see :class:`ResumableEstimator`)."""
    return callable(getattr(estimator, "run_in_units", None))


def run_units(units: Units[T]) -> T:
    """Runs every unit at once and returns the result."""
    while True:
        try:
            next(units)
        except StopIteration as done:
            return done.value


def first_step(estimator: Estimator) -> int:
    """The estimator's ``first_step``, or the protocol's default when it has none."""
    return getattr(estimator, "first_step", Estimator.first_step)


def floor_measurements(estimator: Estimator) -> int | None:
    """The estimator's ``floor_measurements``, or None (the monitor's default) when it has
    none."""
    return getattr(estimator, "floor_measurements", Estimator.floor_measurements)
