"""The monitor: the one object a training loop talks to.

Call ``step()`` once per optimizer step, after backward and before ``optimizer.step()``
(gradients are final then). It runs the estimators the budget scheduler says are due,
keeps their latest values in process and hands them to the sender thread. It never raises
because of the monitor and never waits on the network: an estimator that raises is
logged (rate-limited) and counted, and reporting happens in the background.

It also tells the person running it where the data goes: at the first step the run's name,
server and the commands to look at it, the run id once the server has assigned it, and a
summary at close; each once, on the reporting rank, through ``announce`` (logging at INFO
unless an integration passes its framework's printer).
"""

from __future__ import annotations

import atexit
import importlib.metadata
import logging
import math
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from raresignal.agent import distributed
from raresignal.agent.api import (
    DistributedContext,
    Estimator,
    ForwardFn,
    Measurement,
    Probe,
    StepContext,
    default_forward,
    first_step,
    floor_measurements,
    is_estimator,
    is_resumable,
    series_key,
)
from raresignal.agent.budget import BudgetScheduler
from raresignal.agent.config import MonitorConfig, default_spool_dir
from raresignal.agent.ratelimit import RateLimitedLog
from raresignal.agent.resumable import InFlight, UnitCosts
from raresignal.agent.sender import RUN_STATES, SampleTuple, Sender

if TYPE_CHECKING:
    from raresignal.agent.estimators.likelihood import Likelihood
    from raresignal.agent.estimators.objective import LossFn

log = logging.getLogger(__name__)

_STATE_FORMAT = 1

Labels = tuple[tuple[str, str], ...]
# Measurements with the step each was measured at (a resumable one: the step it began).
StampedMeasurements = list[tuple[int, Measurement]]


def _agent_version() -> str:
    try:
        return importlib.metadata.version("raresignal")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def start_message(run_name: str, server: str | None, run_id: str | None) -> str:
    """The first step's line: where the run's values go and how to look at them."""
    if server is None:
        return (f"raresignal: run '{run_name}' measures in process only (no server); "
                "read the values with latest()")
    where = (f"run id {run_id}" if run_id else "run id to follow")
    return (f"raresignal: run '{run_name}' reports to {server} ({where}); look with "
            f"`raresignal runs --server {server}`, "
            f"`raresignal alerts --server {server} --run {run_id or '<run id>'}` "
            f"or the raresignal Grafana dashboard (run {run_name})")


def run_id_message(run_name: str, server: str, run_id: str) -> str:
    """The line printed once the server has opened the run and its id is known."""
    return (f"raresignal: run '{run_name}' has run id {run_id} on {server}; its alerts: "
            f"`raresignal alerts --server {server} --run {run_id}`")


def end_message(run_name: str, server: str | None, run_id: str | None, state: str,
                steps: int, delivered: bool) -> str:
    """The closing line: how much was measured, and where the alerts are listed."""
    head = f"raresignal: run '{run_name}' {state}: {steps} steps measured"
    if server is None:
        return f"{head}; nothing was sent (no server), the last values stay in latest()"
    sent = ("every report delivered" if delivered else
            "some reports are still in the local spool (`raresignal spool push` sends them)")
    if run_id is None:
        return f"{head}, {sent}; find the run with `raresignal runs --all --server {server}`"
    return f"{head}, {sent}; its alerts: `raresignal alerts --server {server} --run {run_id}`"


def _check_estimators(estimators: Sequence[Any]) -> list[Estimator]:
    for estimator in estimators:
        if not is_estimator(estimator):
            raise TypeError(f"{estimator!r} is not an Estimator: it needs name, "
                            "default_interval, expensive, run, state_dict and load_state_dict")
    return list(estimators)


class Monitor:
    """Measures training health at every step and reports it; see the module docstring.

    ``task`` names the model's likelihood, which the true Fisher samples labels from:
    "classification" (the default), "causal_lm", "masked_lm", "regression" (Gaussian,
    variance 1) or "multi_label" (Bernoulli per output), or any ``Likelihood``. A loss
    with no likelihood (contrastive, diffusion, custom) is passed as
    ``loss_fn(model, inputs, targets) -> scalar`` (task "custom"): the Fisher-based
    signals are then unavailable, and said so; see ``build_default_estimators``.

    ``total_steps`` is the run's planned length in optimizer steps, when known: cadences
    then follow it (``raresignal.agent.cadence``), so a short run gets every signal several
    times. An integration that learns it later calls :meth:`plan`.

    ``on_measurements``, when given, is called with every ``(step, Measurement)`` the
    estimators produce, as they are published (a spread measurement with the step it
    started at), for a caller that keeps its own record of them; it must not raise.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        server: str | None = None,
        run_name: str = "run",
        probes: Mapping[str, Probe] | None = None,
        common_probe: Probe | None = None,
        forward: ForwardFn | None = None,
        task: str | Likelihood | None = None,
        config: MonitorConfig | None = None,
        token: str | None = None,
        estimators: Sequence[Estimator] | None = None,
        announce: Callable[[str], None] | None = None,
        loss_fn: LossFn | None = None,
        total_steps: int | None = None,
        on_measurements: Callable[[Sequence[tuple[int, Measurement]]], None] | None = None,
    ) -> None:
        self.config = config or MonitorConfig()
        self.model = model
        self.optimizer = optimizer
        self.server = server
        self.run_name = run_name
        self.task = task
        self.loss_fn = loss_fn
        self._token = token if token is not None else self.config.token
        self._forward = forward or default_forward
        # Bound at the first step: a monitor may be built before init_process_group.
        self._dist: DistributedContext | None = None
        if estimators is None:
            estimators = self._default_estimators(dict(probes or {}), common_probe)
        self.estimators: dict[str, Estimator] = {
            e.name: e for e in _check_estimators(estimators)}
        self._budget = BudgetScheduler(
            [(e.name, e.default_interval, e.expensive, first_step(e), floor_measurements(e))
             for e in estimators],
            target_overhead=self.config.target_overhead,
            max_interval_factor=self.config.max_interval_factor,
            adjust_every=self.config.budget_adjust_every_steps,
            window_steps=self.config.overhead_window_steps,
            apply_effort=self._apply_effort,
            planning=self.config,
        )
        self.total_steps: int | None = None
        if total_steps is not None:
            self.plan(total_steps)
        self._step = 0
        self._latest: dict[str, float] = {}
        self._estimator_errors: dict[str, int] = {}
        self._last_exit: float | None = None
        self._last_report = -math.inf
        self._last_step_seconds: float | None = None
        self._closed = False
        self._log = RateLimitedLog(log)
        self._sends = False
        self._resume: dict[str, Any] = {}
        self._sender: Sender | None = None
        # Where the run's values go, said once at the first step and once at close; an
        # integration passes its framework's rank-zero printer.
        self._announce = announce or log.info
        self._on_measurements = on_measurements
        self._announced_start = False
        self._announced_run_id = False
        # The resumable measurements spread over the steps now (one per estimator at most),
        # oldest first.
        self._flights: list[InFlight] = []
        # Each resumable estimator's unit costs by kind, kept across its measurements.
        self._unit_costs: dict[str, UnitCosts] = {}
        # This step's time in estimators' first (cold) runs, whole or in slices: the
        # self-reported overhead leaves it out (see BudgetScheduler.measured_overhead).
        self._cold_seconds = 0.0

    def _default_estimators(self, probes: dict[str, Probe], common_probe: Probe | None
                            ) -> list[Estimator]:
        from raresignal.agent.estimators import build_default_estimators

        return build_default_estimators(
            self.model, self.optimizer, probes, common_probe, self.config.estimator_config,
            task=self.task, forward=self._forward, loss_fn=self.loss_fn)

    def plan(self, total_steps: int) -> None:
        """Tells the monitor the run's planned length in optimizer steps; cadences and the
        budget's floors follow it (before or after the first step). Estimators with a
        ``plan(total_steps)`` method (warm-ups that must end within the run) are told too.
        """
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = int(total_steps)
        self._budget.plan(self.total_steps)
        self._plan_estimators(self.total_steps)

    def _plan_estimators(self, total_steps: int) -> None:
        for estimator in self.estimators.values():
            plan = getattr(estimator, "plan", None)
            if callable(plan):
                plan(total_steps)

    def _apply_effort(self, name: str, level: float) -> float | None:
        """The budget's way to make one estimator's runs cheaper: its optional
        ``set_effort``; one without it always does full work."""
        set_effort = getattr(self.estimators[name], "set_effort", None)
        if not callable(set_effort):
            return 1.0
        applied = set_effort(level)
        return None if applied is None else float(applied)

    # -- the training loop's calls -------------------------------------------------------

    def step(self, loss: torch.Tensor | float | None = None,
             batch: tuple[Any, torch.Tensor] | None = None) -> None:
        """Measures this optimizer step. Never raises because of the monitor."""
        if not self.config.enabled or self._closed:
            return
        entered = time.perf_counter()
        train_seconds = None if self._last_exit is None else entered - self._last_exit
        step = self._step
        estimator_seconds = 0.0
        self._cold_seconds = 0.0
        if self._dist is None:
            self._bind_distributed()
        try:
            estimator_seconds = self._measure(step, loss, batch, train_seconds)
        except Exception:
            self._log.warning("step", "raresignal: the monitor failed at step %d; training "
                              "goes on", step, exc_info=True)
        self._step += 1
        try:
            # Every rank reaches this at every step: the scheduler's collective lives here.
            self._budget.end_step(step, time.perf_counter() - entered, estimator_seconds,
                                  train_seconds, self._cold_seconds)
        except Exception:
            self._log.warning("budget", "raresignal: the budget scheduler failed at step %d",
                              step, exc_info=True)
        try:
            self._announce_progress()
        except Exception:
            self._log.warning("announce", "raresignal: cannot print where the run goes",
                              exc_info=True)
        self._last_exit = time.perf_counter()

    def _announces(self) -> bool:
        """Only the rank that reports speaks, so a multi-process run prints one line."""
        return self._dist is None or self._dist.rank == self.config.rank_to_send

    def _announce_progress(self) -> None:
        """The first step's line, then the run id once the sender has opened the run."""
        if not self._announces():
            return
        run_id = self.run_id if self._sends else None
        if not self._announced_start:
            self._announced_start = True
            self._announced_run_id = run_id is not None
            self._announce(start_message(self.run_name, self.server, run_id))
        elif run_id is not None and not self._announced_run_id:
            self._announced_run_id = True
            assert self.server is not None
            self._announce(run_id_message(self.run_name, self.server, run_id))

    def _bind_distributed(self) -> None:
        """Joins torch.distributed if it is initialised; decides whether this rank sends."""
        try:
            self._dist = distributed.build_context()
            self._budget.reduce_max = distributed.max_reducer()
        except Exception:
            self._log.warning("distributed", "raresignal: cannot read the process group; "
                              "measuring this rank alone", exc_info=True)
            self._dist = DistributedContext()
        self._sends = self.server is not None and self._dist.rank == self.config.rank_to_send
        if self._sends:
            atexit.register(_flush_at_exit, weakref.ref(self))

    def _measure(self, step: int, loss: torch.Tensor | float | None,
                 batch: tuple[Any, torch.Tensor] | None, train_seconds: float | None
                 ) -> float:
        if train_seconds is not None:
            self._last_step_seconds = train_seconds
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
        elif loss is not None:
            loss = torch.tensor(float(loss))
        batch_size = None
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            targets = batch[1]
            if isinstance(targets, torch.Tensor) and targets.dim() > 0:
                batch_size = int(targets.shape[0])
        assert self._dist is not None
        ctx = StepContext(step=step, model=self.model, optimizer=self.optimizer,
                          forward=self._forward, loss=loss, batch=batch,
                          batch_size=batch_size, distributed=self._dist)
        measurements: list[Measurement] = []
        spent = 0.0
        for name in self._budget.due(step, running=[f.name for f in self._flights]):
            estimator = self.estimators[name]
            if self._runs_in_units(estimator):
                self._start_flight(estimator, ctx)
                continue
            started = time.perf_counter()
            measurements.extend(self._run_estimator(estimator, ctx))
            seconds = time.perf_counter() - started
            spent += seconds
            self._count_cold(name, seconds)
            self._budget.record_run(name, step, seconds)
        # Last, in what the other estimators left of the step's slice.
        finished, spent = self._advance_flights(step, spent)
        ctx.cache.clear()
        self._publish(step, measurements, finished)
        return spent

    def _run_estimator(self, estimator: Estimator, ctx: StepContext) -> list[Measurement]:
        try:
            result = list(estimator.run(ctx))
        except Exception as error:
            self._count_error(estimator.name, ctx.step, error)
            return []
        return self._checked(estimator.name, result)

    def _count_error(self, name: str, step: int, error: Exception) -> None:
        """Counts and logs a failed run; called while handling the error (the traceback)."""
        self._estimator_errors[name] = self._estimator_errors.get(name, 0) + 1
        self._log.warning(f"estimator:{name}:{type(error).__name__}",
                          "raresignal: estimator %r failed at step %d (%s: %s); "
                          "training goes on", name, step, type(error).__name__, error,
                          exc_info=True)

    def _checked(self, name: str, result: Sequence[Any]) -> list[Measurement]:
        good = [m for m in result if isinstance(m, Measurement)]
        if len(good) < len(result):
            self._log.warning(f"estimator:{name}:type", "raresignal: estimator %r "
                              "returned values that are not Measurements; ignored", name)
        return good

    # -- resumable measurements ----------------------------------------------------------
    #
    # A resumable estimator's measurement starts at the step the budget says it is due,
    # then takes a share of each step's slice until it completes (see
    # raresignal.agent.resumable). Its values are stamped with the step it started at. The
    # sharpness, Fisher and probe estimators copy the parameters (and buffers) when they
    # start, so their values are exactly those of that step; one that reads the live
    # parameters sees them move over the steps it spans, which its cadence (hundreds of
    # steps) dwarfs. The budget sees its whole cost (the sum of its slices) when it
    # completes, and its run is recorded at that step: its next one is due a cadence later.
    #
    # Several may be in flight at once, one per estimator: a measurement in flight holds no
    # other estimator back. With a single one at a time, a cold sharpness run spread over
    # hundreds of steps would hold the Fisher and probe estimators for as long, and at the
    # start of a short run the first spread measurement would hold every later one past
    # the run's end. They share the slice: each step the next one in turn goes first (its
    # first unit runs unless the step's other work filled the slice), then the others in
    # what it left (a unit only where its predicted cost fits), so each advances at least
    # every few steps and a short one is not queued behind a long one. The price is
    # memory: each holds its copy of the parameters while in flight. Each estimator's unit
    # costs by kind outlive its measurements, so a warm run's units are predicted from
    # the cold run's.

    def _runs_in_units(self, estimator: Estimator) -> bool:
        """An expensive estimator that offers units always runs in them; a cheap one (the
        probes' loss) only once a whole run is known to take more than a step's slice, so
        on a model where it is cheap its readings keep their regular cadence."""
        if not is_resumable(estimator):
            return False
        if estimator.expensive:
            return True
        cost = self._budget.schedules[estimator.name].cost_seconds
        return cost is not None and cost > self._slice_seconds()

    def _slice_seconds(self) -> float:
        """This step's time for resumable work: a fraction of the smoothed step time,
        with a floor (the floor alone until a step time is known)."""
        step_seconds = self._budget.step_seconds or 0.0
        return max(self.config.resumable_slice_fraction * step_seconds,
                   self.config.resumable_slice_min_seconds)

    def _start_flight(self, estimator: Estimator, ctx: StepContext) -> None:
        """Starts ``estimator``'s measurement at this step; it runs in the slices."""
        try:
            units = estimator.run_in_units(ctx)  # type: ignore[attr-defined]
        except Exception as error:
            self._count_error(estimator.name, ctx.step, error)
            self._budget.record_run(estimator.name, ctx.step, 0.0)
            return
        costs = self._unit_costs.setdefault(estimator.name, UnitCosts())
        self._flights.append(InFlight(estimator.name, ctx.step, units, costs=costs))

    def _count_cold(self, name: str, seconds: float) -> None:
        """Counts ``seconds`` of ``name``'s work as cold if it has no complete run yet."""
        if self._budget.schedules[name].runs == 0:
            self._cold_seconds += seconds

    def _advance_flights(self, step: int, spent: float, slice_seconds: float | None = None
                         ) -> tuple[StampedMeasurements, float]:
        """Runs this step's slice (``spent`` of it already taken by the other estimators;
        ``slice_seconds`` overrides it), the measurements in flight taking turns to lead
        (see InFlight.advance). Records the cost of each that completed on every rank and
        returns their values, stamped with their starting steps, and the time spent so
        far."""
        if not self._flights:
            return [], spent
        if slice_seconds is None:
            slice_seconds = self._slice_seconds()
        # The turn is a function of the step: every rank takes the flights in one order.
        turn = step % len(self._flights)
        finished: StampedMeasurements = []
        for index, flight in enumerate(self._flights[turn:] + self._flights[:turn]):
            progress = flight.advance(slice_seconds, self._budget.reduce_max, spent=spent,
                                      lead=index == 0)
            spent += progress.seconds
            self._count_cold(flight.name, progress.seconds)
            if progress.error is not None:
                try:  # raised again so that the log carries its traceback
                    raise progress.error
                except Exception as error:
                    self._count_error(flight.name, flight.step, error)
            if not progress.done:
                continue
            self._flights.remove(flight)
            self._budget.record_run(flight.name, step, flight.seconds)
            values = self._checked(flight.name, flight.result)
            finished += [(flight.step, m) for m in values]
        return finished, spent

    def _finish_flights(self) -> None:
        """At the close of a completed run, runs what is left of the measurements in
        flight at once and publishes their values. Training is over, so no step waits for
        them; and a run that ends while measurements are spread over its last steps (in a
        short run, possibly the only ones of their signals) still gets them.

        Under torch.distributed they are dropped instead: their units may issue
        collectives, and close() is not a call every rank is known to make at the same
        point, so finishing there could leave a rank waiting on the others for ever."""
        if not self._flights:
            return
        if self._dist is not None and self._dist.is_distributed:
            self._drop_flights()
            return
        step = max(0, self._step - 1)
        try:
            finished, _ = self._advance_flights(step, 0.0, slice_seconds=math.inf)
            self._publish(step, [], finished)
        except Exception:
            self._log.warning("finish", "raresignal: cannot finish the measurements in "
                              "flight at close", exc_info=True)
        self._drop_flights()

    def _drop_flights(self) -> None:
        """Abandons the measurements in flight; their estimators stay as they were."""
        for flight in self._flights:
            flight.close()
        self._flights = []

    def _publish(self, step: int, measurements: list[Measurement],
                 earlier: Sequence[tuple[int, Measurement]] = ()) -> None:
        """Updates latest() and queues the samples (finite values only: the server
        rejects a batch holding a NaN, and the non-finite count is its own metric).
        ``earlier`` holds values measured from an earlier step on (resumable ones)."""
        stamped = [*earlier, *((step, m) for m in measurements)]
        for _, m in stamped:
            self._latest[m.key] = m.value
        if self._on_measurements is not None and stamped:
            self._on_measurements(stamped)
        if self._sender is None and self._sends:
            self._sender = self._make_sender()
            self._sender.start()
        if self._sender is None:
            return
        now = time.monotonic()
        report_agent = now - self._last_report >= self.config.report_interval_seconds
        if report_agent:
            self._last_report = now
            agent = self._agent_values(step)
        wall_time = time.time()
        samples: list[SampleTuple] = [
            (m.metric, m.labels, measured_at, float(m.value), wall_time)
            for measured_at, m in stamped if math.isfinite(m.value)]
        if report_agent:
            samples.extend((metric, labels, step, value, wall_time)
                           for (metric, labels), value in agent.items()
                           if math.isfinite(value))
        self._sender.submit(samples)

    def _agent_values(self, step: int) -> dict[tuple[str, Labels], float]:
        """The monitor's own series: progress, cost, cadences, health of the reporting."""
        values: dict[tuple[str, Labels], float] = {("step", ()): float(step)}
        if self._last_step_seconds is not None:
            values["step_duration_seconds", ()] = self._last_step_seconds
        overhead = self._budget.measured_overhead
        if overhead is not None:
            values["agent_overhead_ratio", ()] = overhead
        values["agent_budget_floor_exceeded", ()] = float(self._budget.floor_exceeded)
        for name, schedule in self._budget.schedules.items():
            labels = (("estimator", name),)
            values["agent_estimator_interval_steps", labels] = float(schedule.interval)
            values["agent_estimator_floor_interval_steps", labels] = float(
                schedule.max_interval)
            values["agent_estimator_effort_ratio", labels] = schedule.effort
            if schedule.last_seconds is not None:
                values["agent_estimator_seconds", labels] = schedule.last_seconds
            if name in self._estimator_errors:
                values["agent_estimator_errors_total", labels] = float(
                    self._estimator_errors[name])
        if self._sender is not None:
            values["agent_dropped_reports_total", ()] = float(self._sender.dropped_reports)
            values["agent_spool_bytes", ()] = float(self._sender.spool_bytes)
            values["agent_send_failures_total", ()] = float(self._sender.send_failures)
            values["agent_sender_errors_total", ()] = float(self._sender.internal_errors)
        return values

    def _make_sender(self) -> Sender:
        assert self.server is not None
        spool_dir = Path(self.config.spool_dir) if self.config.spool_dir else (
            default_spool_dir(self.run_name))
        config = self.config
        if self._token != config.token:
            config = replace(config, token=self._token)
        return Sender(
            self.server, self.run_name, config, spool_dir,
            sender_id=self._resume.get("sender_id")
            or f"rank{self._dist.rank}-{uuid.uuid4().hex[:8]}",
            world_size=self._dist.world_size,
            run_id=self._resume.get("run_id"),
            next_sequence=self._resume.get("next_sequence", 1),
            agent_version=_agent_version(),
        )

    # -- reading -------------------------------------------------------------------------

    def latest(self) -> dict[str, float]:
        """The last value of every series measured in this process, by series key,
        the monitor's own series (overhead, cadences, ...) included."""
        latest = dict(self._latest)
        if self._step > 0:
            for (metric, labels), value in self._agent_values(self._step - 1).items():
                latest[series_key(metric, dict(labels))] = value
        return latest

    @property
    def run_id(self) -> str | None:
        """The server's id of the run, once opened (or the id a loaded state resumes)."""
        if self._sender is not None and self._sender.run_id:
            return self._sender.run_id
        return self._resume.get("run_id")

    @property
    def step_count(self) -> int:
        """Optimizer steps measured so far (including those of a loaded state)."""
        return self._step

    @property
    def intervals(self) -> dict[str, int]:
        """Current cadence of every estimator, in steps."""
        return self._budget.intervals

    @property
    def floors(self) -> dict[str, int]:
        """The longest interval the budget may stretch each estimator to, in steps."""
        return {name: s.max_interval for name, s in self._budget.schedules.items()}

    @property
    def efforts(self) -> dict[str, float]:
        """Current effort of every estimator (1.0: full work per run)."""
        return self._budget.efforts

    @property
    def estimator_errors(self) -> dict[str, int]:
        return dict(self._estimator_errors)

    @property
    def sender(self) -> Sender | None:
        return self._sender

    # -- checkpointing -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the same run: ids, numbering, cadences, estimators.

        The run id is in it once the run is open; the sender opens it right after the
        first step, so only a checkpoint taken before the server was ever reached lacks
        it (resuming from that one opens a new run). Every step measured so far is sealed
        into the spool first, so the sequence numbering saved here covers it and a
        process resumed from this state replays whatever the server has not acknowledged.

        A resumable measurement in flight is not saved (this process goes on with it): its
        estimator's saved state is that of before it began, and it is still due in the
        saved schedule, so a process resumed from this state starts it again.
        """
        sender = self._sender
        # After close() the sender has sealed or sent everything: there is nothing to flush.
        if (sender is not None and not self._closed
                and not sender.flush(self.config.network_timeout_seconds)):
            log.warning("raresignal: the last steps before this checkpoint were not in the "
                        "spool within %.1f s; should this process end before sending them, "
                        "resuming from the checkpoint will not replay them",
                        self.config.network_timeout_seconds)
        return {
            "format": _STATE_FORMAT,
            "step": self._step,
            "run_id": self.run_id,
            "sender_id": sender.sender_id if sender else self._resume.get("sender_id"),
            "next_sequence": sender.next_sequence if sender else self._resume.get(
                "next_sequence", 1),
            "budget": self._budget.state_dict(),
            "estimators": {name: e.state_dict() for name, e in self.estimators.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a state; call it before the first step() to resume the same run."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"unknown monitor state format {state.get('format')!r}; "
                             f"expected {_STATE_FORMAT}")
        if self._sender is not None:
            raise RuntimeError("load_state_dict must be called before the first step()")
        self._step = int(state["step"])
        self._resume = {key: state[key] for key in ("run_id", "sender_id", "next_sequence")
                        if state.get(key) is not None}
        self._budget.load_state_dict(state.get("budget", {}))
        if self.total_steps is None and self._budget.total_steps is not None:
            self.total_steps = self._budget.total_steps  # the saved run's planned length
            self._plan_estimators(self.total_steps)
        for name, saved in state.get("estimators", {}).items():
            if name in self.estimators:
                self.estimators[name].load_state_dict(saved)

    # -- ending --------------------------------------------------------------------------

    def close(self, state: str = "completed") -> bool:
        """Flushes the reports (waiting at most ``close_timeout_seconds``) and closes the
        run. True when every report reached the server (or nothing was to be sent).

        A completed run first finishes the measurements spread over its last steps, if
        any (in one process; see ``_finish_flights``), so their values are reported."""
        if state not in RUN_STATES:
            raise ValueError(f"state must be one of {sorted(RUN_STATES)}, got {state!r}")
        if self._closed:
            return True
        self._closed = True
        if state == "completed":
            self._finish_flights()
        else:  # a failed or aborted process may be short of the memory or time it needs
            self._drop_flights()
        delivered = True
        if self._sender is not None:
            if self._step > 0:
                agent = self._agent_values(self._step - 1)
                wall_time = time.time()
                self._sender.submit([(metric, labels, self._step - 1, value, wall_time)
                                     for (metric, labels), value in agent.items()
                                     if math.isfinite(value)])
            delivered = self._sender.close(state, self.config.close_timeout_seconds)
        if self.config.enabled and self._announces():
            self._announce(end_message(self.run_name, self.server if self._sends else None,
                                       self.run_id, state, self._step, delivered))
        return delivered

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.close("completed" if exc_type is None else "failed")


def _flush_at_exit(ref: weakref.ReferenceType[Monitor]) -> None:
    """At interpreter exit, sends what is pending but leaves the run open: a script that
    never called close() did not say how the run ended."""
    monitor = ref()
    if monitor is None or monitor._closed or monitor._sender is None:
        return
    monitor._closed = True
    monitor._sender.close(None, monitor.config.close_timeout_seconds)
