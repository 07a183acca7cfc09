"""A run's plan and everything it recorded, and its JSON-lines file (one file per run).

The file holds a ``plan`` line, then one ``step`` line per optimizer step (the training
loss, the pre-clip gradient norm and every measurement the agent made at that step: what
the server would receive), ``eval`` lines (the benchmark's own exact evaluation of the
held-out rare set and of the rare probe's loss) and an ``end`` line. A file is written
under a temporary name and renamed when the run ends, so a recording that is killed
leaves no file that looks complete, and a resumed recording skips exactly the runs done.
"""

from __future__ import annotations

import json
import math
import random
import zlib
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import accumulate
from pathlib import Path
from typing import Any, TextIO

from raresignal.agent.estimators.gradient_stats import ratio_at_peak_learning_rate

Labels = tuple[tuple[str, str], ...]
RecordedSample = tuple[int, str, Labels, float]  # (step, metric, labels, value)

CHANGE_WINDOW = (0.3, 0.7)  # the change step is drawn uniformly in this share of the run


@dataclass(frozen=True)
class RunPlan:
    """One run: which task, which scenario, how long, and when the change comes."""

    family: str
    scenario: str
    collapse: bool
    seed: int
    steps: int
    change_step: int
    ramp_steps: int  # the change ramps in over this many steps (0: all at once)
    eval_every: int  # steps between the benchmark's exact evaluations
    probe_size: int  # examples per agent probe
    heldout_size: int  # examples of the benchmark's held-out rare set

    @property
    def name(self) -> str:
        return f"{self.family}/{self.scenario}/seed{self.seed}"

    @property
    def file_name(self) -> str:
        return f"{self.family}--{self.scenario}--seed{self.seed}.jsonl"

    @property
    def healthy_steps(self) -> int:
        """Steps in which nothing was induced: a control's whole run, a collapse's
        steps before the change."""
        return self.change_step if self.collapse else self.steps


def draw_change_step(family: str, scenario: str, seed: int, steps: int) -> int:
    """The run's change step, uniform in CHANGE_WINDOW of its length, drawn from the seed
    (and the run's names, so runs of one seed do not all change at the same step)."""
    low = math.ceil(CHANGE_WINDOW[0] * steps)
    high = math.floor(CHANGE_WINDOW[1] * steps)
    return random.Random(zlib.crc32(f"{family}/{scenario}/{seed}".encode())).randint(low, high)


@dataclass
class RunTrace:
    """Everything one run produced; detectors and the ground truth read only this."""

    plan: RunPlan
    samples: list[RecordedSample] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    heldout_accuracy: list[float] = field(default_factory=list)
    probe_loss: list[float] = field(default_factory=list)  # the agent's rare probe, labelled
    seconds: float = 0.0
    estimator_errors: dict[str, int] = field(default_factory=dict)
    monitor_steps: int = 0  # steps the (last) Monitor counted, resumed ones included

    @property
    def name(self) -> str:
        return self.plan.name


class TraceWriter:
    """Streams one run's trace to ``directory / plan.file_name`` as the run goes."""

    def __init__(self, directory: Path, plan: RunPlan) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.final = directory / plan.file_name
        self.partial = self.final.with_suffix(".partial")
        self._file: TextIO = self.partial.open("w")
        self._line({"kind": "plan", **asdict(plan)})

    def _line(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")

    def step(self, step: int, loss: float, grad_norm: float,
             samples: list[RecordedSample]) -> None:
        self._line({"kind": "step", "step": step, "loss": loss, "grad_norm": grad_norm,
                    "samples": _encoded(samples)})

    def late_samples(self, samples: list[RecordedSample]) -> None:
        """Measurements published after the last step (closing the monitor finishes the
        measurements still spread over steps)."""
        if samples:
            self._line({"kind": "samples", "samples": _encoded(samples)})

    def evaluation(self, step: int, accuracy: float, probe_loss: float) -> None:
        self._line({"kind": "eval", "step": step, "heldout_accuracy": accuracy,
                    "probe_loss": probe_loss})

    def end(self, trace: RunTrace) -> None:
        self._line({"kind": "end", "seconds": trace.seconds,
                    "estimator_errors": trace.estimator_errors,
                    "monitor_steps": trace.monitor_steps})
        self._file.close()
        self.partial.replace(self.final)

    def abandon(self) -> None:
        self._file.close()
        self.partial.unlink(missing_ok=True)


def _encoded(samples: list[RecordedSample]) -> list[list[Any]]:
    # Each sample keeps its own step: a measurement spread over several steps is
    # published later than the step it was taken at, which is the step it is stamped with.
    return [[step, m, [list(p) for p in labels], v] for step, m, labels, v in samples]


def _decoded(entries: list[list[Any]], line_step: int | None) -> list[RecordedSample]:
    """Samples of one line; files written before samples carried their own step hold
    ``[metric, labels, value]``, stamped with the line's step."""
    out: list[RecordedSample] = []
    for entry in entries:
        step = int(entry[0]) if len(entry) == 4 else line_step
        if step is None:
            raise ValueError("a sample without a step outside a step line")
        m, labels, value = entry[-3:]
        out.append((step, str(m), tuple((str(k), str(v)) for k, v in labels), float(value)))
    return out


def _records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open() as lines:
        for line in lines:
            yield json.loads(line)


def read_trace(path: Path) -> RunTrace:
    """The trace of one finished run's file."""
    records = _records(path)
    head = next(records)
    if head.get("kind") != "plan":
        raise ValueError(f"{path}: the first line is not a plan")
    head.pop("kind")
    trace = RunTrace(RunPlan(**head))
    ended = False
    for record in records:
        kind = record["kind"]
        if kind == "step":
            step = int(record["step"])
            trace.loss.append(float(record["loss"]))
            trace.grad_norm.append(float(record["grad_norm"]))
            trace.samples.extend(_decoded(record["samples"], step))
        elif kind == "samples":
            trace.samples.extend(_decoded(record["samples"], None))
        elif kind == "eval":
            trace.eval_steps.append(int(record["step"]))
            trace.heldout_accuracy.append(float(record["heldout_accuracy"]))
            trace.probe_loss.append(float(record["probe_loss"]))
        elif kind == "end":
            trace.seconds = float(record["seconds"])
            trace.estimator_errors = dict(record["estimator_errors"])
            trace.monitor_steps = int(record["monitor_steps"])
            ended = True
    if not ended:
        raise ValueError(f"{path}: the run did not end (no end line)")
    trace.samples = with_ratio_at_peak_lr(trace.samples)
    return trace


def recorded(directory: Path) -> set[str]:
    """File names of the runs already recorded in ``directory``."""
    return {p.name for p in directory.glob("*.jsonl")} if directory.is_dir() else set()


def read_traces(directory: Path) -> list[RunTrace]:
    return [read_trace(path) for path in sorted(directory.glob("*.jsonl"))]


RARE_PROBE_NAME = "rare"  # the name of the agent's rare probe in every run
RARE_PROBE = (("probe", RARE_PROBE_NAME),)


def with_probe_loss_every(trace: RunTrace, every: int) -> RunTrace:
    """The trace as the agent would have recorded it had it read the rare probe's loss
    every ``every`` steps: its own readings of that loss are replaced by the benchmark's
    exact evaluations of the same probe set (a forward pass in evaluation mode, as the
    agent's) at the steps that are multiples of ``every``. The benchmark evaluates after
    the optimizer's step, the agent before the next one: an evaluation at step s is the
    agent's reading at step s + 1. The agent reads it every 10 steps in a run planned
    for 5000; recordings made while its budget could stretch that (to every 25 steps on
    the benchmark's small models) are scored at the agent's cadence this way."""
    if every < 1 or every % trace.plan.eval_every:
        raise ValueError(f"{trace.name}: the probe's loss was evaluated every "
                         f"{trace.plan.eval_every} steps; {every} is not a multiple")
    samples = [s for s in trace.samples if not (s[1] == "probe_loss" and s[2] == RARE_PROBE)]
    samples += [(step + 1, "probe_loss", RARE_PROBE, value)
                for step, value in zip(trace.eval_steps, trace.probe_loss, strict=True)
                if step % every == 0 and step + 1 < trace.plan.steps]
    samples.sort(key=lambda sample: sample[0])  # stable: a step's other samples keep order
    return replace(trace, samples=samples)


AT_PEAK_LR = "update_to_weight_ratio_at_peak_lr"


def with_ratio_at_peak_lr(samples: Sequence[RecordedSample]) -> list[RecordedSample]:
    """The samples, with the update/weight ratio at the run's peak learning rate derived
    from the recorded ratio and learning rate (as the agent computes it) when a trace was
    recorded by an agent that did not report it yet."""
    if any(metric == AT_PEAK_LR for _, metric, _, _ in samples):
        return list(samples)
    rates = {step: value for step, metric, labels, value in samples
             if metric == "learning_rate" and not labels}
    steps = sorted(rates)
    peaks = list(accumulate((rates[s] if math.isfinite(rates[s]) else 0.0 for s in steps),
                            max))
    out: list[RecordedSample] = []
    for step, metric, labels, value in samples:
        out.append((step, metric, labels, value))
        if metric == "update_to_weight_ratio" and not labels:
            index = bisect_right(steps, step) - 1  # the rate of this step, as the agent
            if index >= 0:
                at_peak = ratio_at_peak_learning_rate(value, rates[steps[index]],
                                                      peaks[index])
                if at_peak is not None:
                    out.append((step, AT_PEAK_LR, labels, at_peak))
    return out
