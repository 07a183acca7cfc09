"""The server's single writer: runs, batches and alert evaluation, in order.

Every method runs on one storage thread, so a batch's duplicate check, its samples, the
alert-engine state they change and the run's new position are decided and committed
together, and the engine sees batches in exactly the order storage applied them.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import grpc

from raresignal.protos.catalog import CATALOG
from raresignal.protos.v1 import common_pb2, ingest_pb2
from raresignal.server.auth import Principal
from raresignal.server.engine import FIRING, PENDING, AlertEngine
from raresignal.server.live import LiveState
from raresignal.server.storage import (
    AlertChange,
    AlertRecord,
    EngineWrites,
    RunRecord,
    SeriesPoint,
    Storage,
)
from raresignal.server.validation import (
    MAX_SERIES_PER_RUN,
    RequestError,
    check_batch_envelope,
    check_close_state,
    check_open_run,
    check_samples,
    invalid,
    labels_key,
)

log = logging.getLogger("raresignal.server")

MAX_ALERTS_LISTED = 10_000


@dataclass
class BatchOutcome:
    applied: bool
    samples_applied: int = 0
    changes: list[AlertChange] = field(default_factory=list)


class Ledger:
    def __init__(self, storage: Storage, engine: AlertEngine, live: LiveState,
                 clock: Callable[[], float] = time.time) -> None:
        self.storage = storage
        self.engine = engine
        self.live = live
        self._clock = clock
        self._runs: dict[str, RunRecord] = {}
        for run in storage.list_runs(include_finished=True):
            self._track(run)
        engine.restore(storage.rule_states(),
                       storage.alerts(states=(PENDING, FIRING), limit=1 << 62))
        live.load_values(storage.latest_values())
        live.load_firing(engine.active_alerts())

    def _track(self, run: RunRecord) -> None:
        self._runs[run.run_id] = run
        self.engine.track_run(run.run_id, run.run_name, run.report_interval_seconds,
                              run.updated_at, run.last_step, finished=bool(run.finished_at))
        self.live.set_run(run)

    # -- ingest ------------------------------------------------------------------------

    def open_run(self, request: ingest_pb2.OpenRunRequest,
                 principal: Principal) -> tuple[RunRecord, dict[str, int]]:
        check_open_run(request)
        principal.authorize(request.run_name)
        now = self._clock()
        if request.resume_run_id:
            existing = self._runs.get(request.resume_run_id)
            if existing is None:
                raise RequestError(grpc.StatusCode.NOT_FOUND,
                                   f"resume_run_id {request.resume_run_id!r} is not a known run")
            if existing.run_name != request.run_name:
                raise invalid(f"resume_run_id {existing.run_id!r} belongs to run "
                              f"{existing.run_name!r}, not {request.run_name!r}")
            run = replace(existing, state=common_pb2.RUN_STATE_ACTIVE, finished_at=0.0,
                          world_size=request.world_size, updated_at=now,
                          report_interval_seconds=request.report_interval_seconds,
                          config=dict(request.config) or existing.config,
                          tags=dict(request.tags) or existing.tags,
                          agent_version=request.agent_version or existing.agent_version)
            self.storage.update_run(run)
            log.info("run resumed: %s (%s)", run.run_name, run.run_id)
        else:
            run = RunRecord(
                run_id=uuid.uuid4().hex[:16], run_name=request.run_name,
                state=common_pb2.RUN_STATE_ACTIVE, world_size=request.world_size,
                created_at=now, updated_at=now, last_step=0,
                report_interval_seconds=request.report_interval_seconds,
                config=dict(request.config), tags=dict(request.tags),
                agent_version=request.agent_version)
            self.storage.create_run(run)
            log.info("run opened: %s (%s)", run.run_name, run.run_id)
        self._track(run)
        return run, self.storage.last_sequences(run.run_id)

    def apply(self, batch: ingest_pb2.ReportBatch, principal: Principal) -> BatchOutcome:
        """Applies a batch exactly once; RequestError for anything it cannot accept."""
        check_batch_envelope(batch)
        run = self._runs.get(batch.run_id)
        if run is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"run_id {batch.run_id!r} is not a known run; call OpenRun")
        principal.authorize(run.run_name)
        if batch.sequence <= self.storage.last_sequence(run.run_id, batch.sender_id):
            return BatchOutcome(applied=False)
        if run.finished_at:
            state = common_pb2.RunState.Name(run.state)
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"run_id {run.run_id!r} ({run.run_name}) is closed ({state}); "
                               "resume it with OpenRun to report again")
        samples = check_samples(batch)
        new_series = self.storage.new_series_count(run.run_id, samples)
        if new_series and self.storage.series_count(run.run_id) + new_series > MAX_SERIES_PER_RUN:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"samples would create {new_series} new series, beyond the "
                               f"limit of {MAX_SERIES_PER_RUN} series per run")
        now = self._clock()
        changes = self.engine.observe(run.run_id, samples, now)
        writes = self.engine.take_writes()
        last_step = max((s.step for s in samples), default=run.last_step)
        updated = replace(run, updated_at=now, last_step=max(run.last_step, last_step))
        try:
            applied = self.storage.apply_batch(updated, batch.sender_id, batch.sequence,
                                               samples, writes)
        except Exception as exc:
            self._reload_engine(run)
            log.exception("storing a batch of run %s failed", run.run_id)
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               f"storage failed ({type(exc).__name__}); retry the batch") from exc
        if not applied:  # cannot happen with one writer; kept consistent all the same
            self._reload_engine(run)
            return BatchOutcome(applied=False)
        self._runs[run.run_id] = updated
        self.live.record(run.run_id, samples)
        self.live.apply_changes(changes)
        return BatchOutcome(applied=True, samples_applied=len(samples), changes=changes)

    def _reload_engine(self, run: RunRecord) -> None:
        self.engine.discard_writes()
        self.engine.forget_run(run.run_id)
        self.engine.track_run(run.run_id, run.run_name, run.report_interval_seconds,
                              run.updated_at, run.last_step, bool(run.finished_at))
        self.engine.restore(
            [s for s in self.storage.rule_states() if s[0] == run.run_id],
            self.storage.alerts(run_id=run.run_id, states=(PENDING, FIRING), limit=1 << 62))

    def close_run(self, run_id: str, state: int,
                  principal: Principal) -> tuple[RunRecord, list[AlertChange]]:
        final_state = check_close_state(state)
        run = self._runs.get(run_id)
        if run is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"run_id {run_id!r} is not a known run")
        principal.authorize(run.run_name)
        if run.finished_at:
            return run, []  # closing twice is harmless
        now = self._clock()
        changes = self.engine.close_run(run_id, now)
        closed = replace(run, state=final_state, finished_at=now, updated_at=now)
        self.storage.update_run(closed, self.engine.take_writes())
        self._runs[run_id] = closed
        self.live.set_run(closed)
        self.live.apply_changes(changes)
        log.info("run closed: %s (%s) %s", run.run_name, run_id,
                 common_pb2.RunState.Name(final_state))
        return closed, changes

    def tick(self) -> list[AlertChange]:
        """Runs the clock rules (RunStalled) and stores what they changed."""
        changes = self.engine.tick(self._clock())
        if changes:
            writes = self.engine.take_writes()
            for run_id in {c.alert.run_id for c in changes}:
                self.storage.update_run(self._runs[run_id], _only_run(writes, run_id))
            self.live.apply_changes(changes)
        return changes

    # -- reads -----------------------------------------------------------------------

    def run(self, run_id: str) -> RunRecord | None:
        return self._runs.get(run_id)

    def list_runs(self, include_finished: bool, principal: Principal) -> list[RunRecord]:
        return [run for run in self._runs.values()
                if (include_finished or not run.finished_at) and principal.allows(run.run_name)]

    def list_alerts(self, run_id: str, states: tuple[int, ...], rule: str, limit: int,
                    principal: Principal) -> list[AlertRecord]:
        if limit < 0:
            raise invalid("limit must be >= 0")
        limit = min(limit or 1000, MAX_ALERTS_LISTED)
        if run_id:
            run = self._runs.get(run_id)
            if run is None:
                raise RequestError(grpc.StatusCode.NOT_FOUND,
                                   f"run_id {run_id!r} is not a known run")
            principal.authorize(run.run_name)
        alerts = self.storage.alerts(run_id=run_id, states=states, rule=rule,
                                     limit=limit if principal.patterns == ("*",) else 1 << 62)
        return [a for a in alerts if principal.allows(a.run_name)][:limit]

    def active_alerts(self) -> list[AlertRecord]:
        return [replace(a, labels=dict(a.labels)) for a in self.engine.active_alerts()]

    def get_series(self, run_id: str, metric: str, labels: dict[str, str], since_step: int,
                   principal: Principal) -> list[SeriesPoint]:
        run = self._runs.get(run_id)
        if run is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"run_id {run_id!r} is not a known run")
        principal.authorize(run.run_name)
        if metric not in CATALOG:
            raise invalid(f"metric {metric[:128]!r} is not in the raresignal catalogue")
        return self.storage.get_series(run_id, metric, labels_key(labels), since_step)

    def close(self) -> None:
        self.storage.close()


def _only_run(writes: EngineWrites, run_id: str) -> EngineWrites:
    """The part of engine writes that belongs to one run."""
    return replace(
        writes,
        rule_states=[s for s in writes.rule_states if s[0] == run_id],
        alerts=[a for a in writes.alerts if a.run_id == run_id],
        changes=[c for c in writes.changes if c.alert.run_id == run_id],
    )
