"""Ground truth, lead time and false alarms: how one detector did on one run, and in sum.

* Ground truth of a collapse: the first evaluated step at or after the change step at
  which the held-out rare accuracy has fallen halfway from its running peak to chance,
  counted only once the peak shows the skill was learned (``LEARNED_SHARE`` of the way
  from chance to 1). A collapse run that never falls that far is "no collapse" and is
  scored apart.
* A false alarm: any alarm on a control, or any alarm before the change step of a
  collapse run (nothing had been induced yet); rates are per 10,000 healthy steps (a
  control's whole length, a collapse run's steps before the change).
* Detection: the first alarm at or after the change step of a collapsed run; lead =
  ground truth - alarm step (positive: the warning came first), also as a share of the
  collapse's duration (from the change step to the ground truth).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from detection_detectors import Alarm
from detection_families import SETTINGS
from detection_traces import RunTrace

LEARNED_SHARE = 0.5
HEALTHY_STEPS_UNIT = 10_000


def ground_truth_step(steps: Sequence[int], accuracy: Sequence[float], change_step: int,
                      chance_accuracy: float) -> int | None:
    """First step >= change_step below halfway from the running peak to chance."""
    learned = chance_accuracy + LEARNED_SHARE * (1.0 - chance_accuracy)
    peak = float("-inf")
    for step, value in zip(steps, accuracy, strict=True):
        if step >= change_step and peak >= learned and value < (peak + chance_accuracy) / 2:
            return step
        peak = max(peak, value)
    return None


def trace_ground_truth(trace: RunTrace) -> int | None:
    """The ground truth of a collapse run (None for a control)."""
    if not trace.plan.collapse:
        return None
    return ground_truth_step(trace.eval_steps, trace.heldout_accuracy, trace.plan.change_step,
                             SETTINGS[trace.plan.family].chance)


@dataclass(frozen=True)
class Outcome:
    """One detector on one run."""

    run: str
    family: str
    scenario: str
    collapse: bool
    seed: int
    detector: str
    change_step: int
    healthy_steps: int
    ground_truth: int | None
    false_alarms: int  # alarms on a control, or before the change of a collapse run
    first_alarm: int | None  # first alarm at or after the change (collapsed runs)
    first_source: str | None  # which rule or reference raised it
    lead: int | None

    @property
    def scorable(self) -> bool:
        """A collapse run in which the collapse did happen."""
        return self.collapse and self.ground_truth is not None

    @property
    def no_collapse(self) -> bool:
        return self.collapse and self.ground_truth is None

    @property
    def detected(self) -> bool:
        return self.scorable and self.first_alarm is not None

    @property
    def early(self) -> bool:
        return self.detected and self.lead is not None and self.lead > 0

    @property
    def lead_share(self) -> float | None:
        """Lead as a share of the collapse's duration (change step to ground truth)."""
        if self.lead is None or self.ground_truth is None:
            return None
        return self.lead / max(1, self.ground_truth - self.change_step)


def score(trace: RunTrace, detector: str, alarms: Iterable[Alarm]) -> Outcome:
    plan = trace.plan
    truth = trace_ground_truth(trace)
    ordered = sorted(alarms, key=lambda a: a.step)
    healthy = [a for a in ordered if not plan.collapse or a.step < plan.change_step]
    after = [a for a in ordered if plan.collapse and a.step >= plan.change_step]
    first = after[0] if after and truth is not None else None
    return Outcome(
        run=trace.name, family=plan.family, scenario=plan.scenario, collapse=plan.collapse,
        seed=plan.seed, detector=detector, change_step=plan.change_step,
        healthy_steps=plan.healthy_steps, ground_truth=truth, false_alarms=len(healthy),
        first_alarm=first.step if first else None,
        first_source=first.source if first else None,
        lead=truth - first.step if first and truth is not None else None)


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass(frozen=True)
class Summary:
    """One detector on one group of runs."""

    runs: int
    scorable: int  # collapse runs whose collapse happened
    no_collapse: int  # collapse runs whose rare accuracy never fell halfway to chance
    detected: int
    early: int  # detected with positive lead
    median_lead: float | None
    median_lead_share: float | None
    false_alarm_runs: int  # runs with at least one false alarm
    false_alarms: int
    healthy_steps: int

    @property
    def false_alarms_per_unit(self) -> float | None:
        """False alarms per HEALTHY_STEPS_UNIT healthy steps."""
        if not self.healthy_steps:
            return None
        return HEALTHY_STEPS_UNIT * self.false_alarms / self.healthy_steps


def summarize(outcomes: Sequence[Outcome]) -> Summary:
    detected = [o for o in outcomes if o.detected]
    return Summary(
        runs=len(outcomes),
        scorable=sum(o.scorable for o in outcomes),
        no_collapse=sum(o.no_collapse for o in outcomes),
        detected=len(detected),
        early=sum(o.early for o in outcomes),
        median_lead=_median([o.lead for o in detected if o.lead is not None]),
        median_lead_share=_median([s for o in detected if (s := o.lead_share) is not None]),
        false_alarm_runs=sum(o.false_alarms > 0 for o in outcomes),
        false_alarms=sum(o.false_alarms for o in outcomes),
        healthy_steps=sum(o.healthy_steps for o in outcomes))


def merit(outcomes: Sequence[Outcome]) -> tuple[float, ...]:
    """What the tuning maximises: first no false alarm at all, then early detections,
    then detections, then median lead (a larger tuple is better)."""
    summary = summarize(outcomes)
    return (-summary.false_alarm_runs, summary.early, summary.detected,
            summary.median_lead if summary.median_lead is not None else float("-inf"))
