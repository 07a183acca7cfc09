"""Ground truth, lead time and false alarms: how one detector did on one run, and in sum.

* Ground truth: the first evaluated step at which the rare probe's accuracy is below half
  of its running peak, counted only once that peak has reached ``MIN_PEAK`` (before the
  rare rule is learned there is nothing to lose).
* A false alarm: any alarm on a healthy control, or any alarm before the switch step of a
  collapse run (nothing had been induced yet).
* Detection: the first alarm at or after the switch step of a collapse run whose ground
  truth exists; lead time = ground-truth step - alarm step (positive: the warning came
  before the rare accuracy had halved).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from detection_detectors import Alarm
from detection_runs import RunTrace

MIN_PEAK = 0.5


def ground_truth_step(steps: Sequence[int], accuracy: Sequence[float],
                      min_peak: float = MIN_PEAK) -> int | None:
    """First step whose accuracy is below half the running peak (a peak >= min_peak)."""
    peak = float("-inf")
    for step, value in zip(steps, accuracy, strict=True):
        if peak >= min_peak and value < peak / 2:
            return step
        peak = max(peak, value)
    return None


def lead_time(ground_truth: int, alarm_step: int) -> int:
    """Steps of warning: positive when the alarm came before the ground truth."""
    return ground_truth - alarm_step


@dataclass(frozen=True)
class Outcome:
    """One detector on one run."""

    run: str
    family: str
    scenario: str
    collapse: bool
    seed: int
    detector: str
    ground_truth: int | None
    false_alarms: int  # alarms on a healthy run, or before the switch of a collapse run
    first_alarm: int | None  # first alarm at or after the switch (collapse runs)
    first_source: str | None  # which rule or baseline raised it
    lead: int | None

    @property
    def scorable(self) -> bool:
        """A collapse run in which the collapse did happen."""
        return self.collapse and self.ground_truth is not None

    @property
    def detected(self) -> bool:
        return self.scorable and self.first_alarm is not None

    @property
    def early(self) -> bool:
        return self.detected and self.lead is not None and self.lead > 0


def score(trace: RunTrace, detector: str, alarms: Iterable[Alarm]) -> Outcome:
    truth = ground_truth_step(trace.eval_steps, trace.rare_accuracy)
    ordered = sorted(alarms, key=lambda a: a.step)
    if not trace.collapse:
        false_alarms, after = len(ordered), []
    else:
        false_alarms = sum(1 for a in ordered if a.step < trace.switch_step)
        after = [a for a in ordered if a.step >= trace.switch_step]
    first = after[0] if after and truth is not None else None
    return Outcome(
        run=trace.name, family=trace.family, scenario=trace.scenario,
        collapse=trace.collapse, seed=trace.seed, detector=detector, ground_truth=truth,
        false_alarms=false_alarms, first_alarm=first.step if first else None,
        first_source=first.source if first else None,
        lead=lead_time(truth, first.step) if first and truth is not None else None)


@dataclass(frozen=True)
class Summary:
    """One detector on one group of runs (a scenario, or all collapse runs)."""

    runs: int
    scorable: int  # collapse runs whose collapse happened
    detected: int
    early: int  # detected with positive lead time
    median_lead: float | None
    false_alarm_runs: int  # runs with at least one false alarm

    @property
    def detection_rate(self) -> float | None:
        return self.detected / self.scorable if self.scorable else None


def summarize(outcomes: Sequence[Outcome]) -> Summary:
    leads = [o.lead for o in outcomes if o.detected and o.lead is not None]
    return Summary(
        runs=len(outcomes),
        scorable=sum(o.scorable for o in outcomes),
        detected=sum(o.detected for o in outcomes),
        early=sum(o.early for o in outcomes),
        median_lead=statistics.median(leads) if leads else None,
        false_alarm_runs=sum(o.false_alarms > 0 for o in outcomes))


def merit(outcomes: Sequence[Outcome]) -> tuple[float, ...]:
    """What the tuning maximises: first no false alarm at all, then early detections,
    then detections, then median lead time (a larger tuple is better)."""
    summary = summarize(outcomes)
    return (-summary.false_alarm_runs, summary.early, summary.detected,
            summary.median_lead if summary.median_lead is not None else float("-inf"))
