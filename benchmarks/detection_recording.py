"""Plans the benchmark's runs, estimates their cost, and records them (in parallel,
resumable: a run whose trace file exists is not run again)."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from detection_families import SETTINGS
from detection_runs import train_run
from detection_scenarios import SCENARIOS_BY_NAME
from detection_traces import RunPlan, draw_change_step, recorded


@dataclass(frozen=True)
class RecordingConfig:
    """The shape of a recording. The defaults give 102 control runs and 56 collapse runs
    over the seven families (every family held out in turn: every control is reported
    held out), about two and a quarter hours on two cores (see BENCHMARKS.md for the
    measured costs)."""

    steps: int = 5000
    seeds: tuple[int, ...] = (0, 1)
    ramp_steps: int = 200  # the change ramps in over this many steps
    eval_every: int = 10  # the benchmark's exact evaluation of the held-out rare set
    probe_size: int = 128
    heldout_size: int = 256
    jobs: int = 2


# --quick: the whole pipeline in minutes, on runs too short for the agent's warm-ups.
QUICK = RecordingConfig(steps=600, seeds=(0,), ramp_steps=30, eval_every=5)


def plan_runs(families: Sequence[str], scenarios: Sequence[str], config: RecordingConfig
              ) -> list[RunPlan]:
    """Every family x scenario x seed that applies (edge-of-stability controls only where
    the family has a rate for them), each with its own change step."""
    plans = []
    for family in families:
        for name in scenarios:
            scenario = SCENARIOS_BY_NAME[name]
            if not scenario.applies_to(SETTINGS[family]):
                continue
            for seed in config.seeds:
                plans.append(RunPlan(
                    family=family, scenario=name, collapse=scenario.collapse, seed=seed,
                    steps=config.steps,
                    change_step=draw_change_step(family, name, seed, config.steps),
                    ramp_steps=config.ramp_steps, eval_every=config.eval_every,
                    probe_size=config.probe_size, heldout_size=config.heldout_size))
    return plans


def seconds_per_1000_steps(plan: RunPlan) -> float:
    """The measured cost of the plan's family, or of its full-batch run where known."""
    settings = SETTINGS[plan.family]
    run = SCENARIOS_BY_NAME[plan.scenario].full_batch_run(settings)
    if run is not None and run.seconds_per_1000_steps is not None:
        return run.seconds_per_1000_steps
    return settings.seconds_per_1000_steps


def estimate_seconds(plans: Sequence[RunPlan], jobs: int) -> float:
    """Wall-clock estimate from each run's measured cost per 1000 steps."""
    work = sum(seconds_per_1000_steps(p) * p.steps / 1000 for p in plans)
    return work / max(1, jobs)


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def progress_line(done: int, total: int, elapsed: float, width: int = 30) -> str:
    filled = round(width * done / total) if total else width
    left = elapsed / done * (total - done) if done else float("nan")
    eta = _duration(left) if done else "?"
    return (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} runs, "
            f"{_duration(elapsed)} elapsed, about {eta} left")


def _record_one(plan: RunPlan, directory: Path) -> tuple[str, float]:
    torch.set_num_threads(1)
    trace = train_run(plan, directory)
    return plan.name, trace.seconds


def _record_packed(job: tuple[RunPlan, Path]) -> tuple[str, float]:
    return _record_one(*job)


def record(plans: Sequence[RunPlan], directory: Path, jobs: int,
           report: Callable[[str], None] = print) -> list[RunPlan]:
    """Records every plan whose trace is not in ``directory`` yet, ``jobs`` at a time;
    returns the plans it ran."""
    done = recorded(directory)
    todo = [p for p in plans if p.file_name not in done]
    report(f"{len(plans) - len(todo)} of {len(plans)} runs already recorded in {directory}; "
           f"{len(todo)} to record, estimated {_duration(estimate_seconds(todo, jobs))} "
           f"with {jobs} job(s)")
    if not todo:
        return []
    started = time.perf_counter()
    if jobs <= 1:
        for index, plan in enumerate(todo, start=1):
            _record_one(plan, directory)
            report(f"{progress_line(index, len(todo), time.perf_counter() - started)}  "
                   f"{plan.name}")
        return todo
    # Spawned workers: a fresh interpreter each, one torch thread each.
    with multiprocessing.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
        jobs_in = [(plan, directory) for plan in todo]
        for index, (name, _) in enumerate(pool.imap_unordered(_record_packed, jobs_in),
                                          start=1):
            report(f"{progress_line(index, len(todo), time.perf_counter() - started)}  "
                   f"{name}")
    return todo
