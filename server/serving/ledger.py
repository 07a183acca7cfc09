"""The server's single writer: runs, batches and alert evaluation, in order.

Every method runs on one storage thread, so a batch's duplicate check, its samples, the
alert-engine state they change and the run's new position are decided and committed
together, and the engine sees batches in exactly the order storage applied them. The
duplicate check lives here, once, whatever the storage backend: a batch is applied only
if its sequence is above the sender's last committed one (or the last one earlier in its
group), and the storage commits each group's samples and sequences together.

On a shared database (replicas) the ledger applies any run's batches the same way, but
evaluates alerts only for the runs this replica owns (``serving.ownership``): every
applied report, heartbeat and close is queued in the batch's transaction, and the owner
feeds its engine from the queue, whichever replica received them, storing the engine's
writes in the transaction that takes them off the queue. A replica that takes a run over
restores its engine state (baselines, pending counts, open episodes) from the database.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import grpc

from raresignal.protos.v1 import common_pb2, ingest_pb2
from raresignal.server.alerting.engine import FIRING, PENDING, AlertEngine
from raresignal.server.serving.auth import Principal
from raresignal.server.serving.live import LiveState
from raresignal.server.serving.ownership import Ownership
from raresignal.server.serving.quotas import Quotas, exhausted, metadata_bytes
from raresignal.server.serving.validation import (
    MAX_SAMPLES_PER_BATCH,
    MAX_SERIES_PER_RUN,
    RUN_ID_CHARS,
    RequestError,
    check_batch_envelope,
    check_close_state,
    check_name,
    check_open_run,
    check_run_id,
    check_samples,
    invalid,
)
from raresignal.server.storage.base import AlertPosition, SequenceConflict, Storage
from raresignal.server.storage.records import (
    CLOSE,
    HEARTBEAT,
    REPORT,
    AlertChange,
    AlertRecord,
    BatchGroup,
    BatchWrite,
    CheckedSample,
    EngineWrites,
    Evaluation,
    Newest,
    RunRecord,
    SeriesKey,
    SeriesPoint,
    labels_key,
    newest_by_series,
    samples_to_evaluate,
)

log = logging.getLogger("raresignal.server")

# Queued evaluations one clock tick takes at most (the rest wait for the next tick).
EVALUATIONS_PER_TICK = 10_000

RunPosition = tuple[float, str]  # (created_at, run_id) of the last run a page held
SeriesPosition = tuple[str, str]  # (metric, labels key) of the last series a page held


@dataclass
class BatchOutcome:
    applied: bool
    samples_applied: int = 0
    changes: list[AlertChange] = field(default_factory=list)


@dataclass(frozen=True)
class ReportRequest:
    """A report batch with its caller and its samples already checked.

    Checking samples needs nothing but the batch, so it runs wherever the batch arrives
    (the event loop), while the storage thread stores earlier batches; a failed check is
    kept and raised where the ledger reaches it, so the errors come in the same order.
    """

    batch: ingest_pb2.ReportBatch
    principal: Principal
    samples: list[CheckedSample]
    newest: dict[SeriesKey, Newest]
    error: RequestError | None = None

    @classmethod
    def check(cls, batch: ingest_pb2.ReportBatch, principal: Principal) -> ReportRequest:
        if len(batch.samples) > MAX_SAMPLES_PER_BATCH:
            return cls(batch, principal, [], {})  # refused whole by the envelope check
        try:
            samples = check_samples(batch)
        except RequestError as error:
            return cls(batch, principal, [], {}, error)
        return cls(batch, principal, samples, newest_by_series(samples))


class Ledger:
    def __init__(self, storage: Storage, engine: AlertEngine, live: LiveState,
                 clock: Callable[[], float] = time.time, quotas: Quotas | None = None,
                 finished_run_ttl_seconds: float = float("inf"),
                 ownership: Ownership | None = None) -> None:
        self.storage = storage
        self.engine = engine
        self.live = live
        self.quotas = quotas or Quotas()
        self._clock = clock
        self._finished_ttl = finished_run_ttl_seconds
        self._runs: dict[str, RunRecord] = {}
        # Runs whose series the live state and the engine hold: active ones and those
        # finished within the TTL. An older finished run is only a record until resumed.
        self._loaded: set[str] = set()
        # Series and senders per run, counted once from storage, then kept as batches add
        # them.
        self._series_counts: dict[str, int] = {}
        self._sender_counts: dict[str, int] = {}
        # Replicas: the engine holds only the runs this replica owns, adopted from storage.
        # Without lease settings the ledger is the database's only server, as on SQLite.
        self.ownership = ownership if storage.shared else None
        # Replicas: the metrics whose every sample is queued for the runs' owners (those
        # the live replicas' rules read, learnt at each lease renewal), and the alerts of
        # runs taken over whose last notification may never have reached Alertmanager.
        self._queued_metrics = engine.metrics
        self._redeliveries: list[AlertRecord] = []
        if self.ownership is not None:
            live.set_owned(())
        # While this server was down nobody listened: a run's silence counts from now, so a
        # restart does not raise RunStalled for every run before its next heartbeat.
        started = clock()
        for run in storage.list_runs(include_finished=True):
            if self._expired(run, started):
                self._runs[run.run_id] = run
                live.expire_run(run)
            else:
                self._track(run, heard_at=max(run.updated_at, started))
        if self.ownership is not None:
            log.info("replica %s: evaluates the runs whose lease it holds (lease TTL %g s, "
                     "renewed every %g s)", self.ownership.replica_id,
                     self.ownership.ttl_seconds, self.ownership.heartbeat_seconds)
            return  # each run's engine state is loaded when its lease is taken
        engine.restore((s for s in storage.rule_states() if s[0] in self._loaded),
                       storage.alerts(states=(PENDING, FIRING), limit=1 << 62))
        live.load_values(v for v in storage.latest_values() if v.run_id in self._loaded)
        live.load_firing(engine.active_alerts())

    def _expired(self, run: RunRecord, now: float) -> bool:
        """A finished run past the metrics TTL: nothing shows it, nothing evaluates it."""
        return bool(run.finished_at) and now - run.finished_at > self._finished_ttl

    def _evaluates(self, run_id: str) -> bool:
        """Whether this server's engine evaluates the run: always, unless a replica."""
        return self.ownership is None or run_id in self.ownership.owned

    def _track(self, run: RunRecord, heard_at: float | None = None) -> None:
        self._runs[run.run_id] = run
        self._loaded.add(run.run_id)
        if not self._evaluates(run.run_id):
            self.live.set_run(run)
            return
        self.engine.track_run(run.run_id, run.run_name, run.report_interval_seconds,
                              run.updated_at if heard_at is None else heard_at, run.last_step,
                              finished=bool(run.finished_at))
        self.live.set_run(run)

    def _unload_expired(self, now: float) -> None:
        """Drops the series of finished runs past the TTL from the live state and engine."""
        for run_id in [r for r in self._loaded if self._expired(self._runs[r], now)]:
            self._loaded.discard(run_id)
            self.engine.forget_run(run_id)
            self.live.expire_run(self._runs[run_id])

    def _reload(self, run: RunRecord) -> None:
        """Brings an unloaded run's engine state and latest values back (it is resumed)."""
        self._track(run)
        if self._evaluates(run.run_id):
            self._reload_engine(run)
        self.live.load_values(self.storage.latest_values(run.run_id))

    # -- quotas ----------------------------------------------------------------------

    def _scope(self, principal: Principal) -> list[RunRecord]:
        """The runs that count against the caller's quotas: those its token may access."""
        return [run for run in self._runs.values() if principal.allows(run.run_name)]

    def _series_count(self, run_id: str) -> int:
        count = self._series_counts.get(run_id)
        if count is None:
            count = self._series_counts[run_id] = len(self.storage.series_keys(run_id))
        return count

    def _sender_count(self, run_id: str) -> int:
        count = self._sender_counts.get(run_id)
        if count is None:
            count = self._sender_counts[run_id] = len(self.storage.last_sequences(run_id))
        return count

    def _check_sender_quota(self, principal: Principal, group: BatchGroup) -> None:
        limit = self.quotas.max_senders_per_token
        held = sum(self._sender_count(run.run_id) + len(group.new_senders.get(run.run_id, ()))
                   for run in self._scope(principal))
        if held + 1 > limit:
            raise exhausted("max_senders_per_token", limit,
                            f"a new sender_id and this token's runs have {held}")

    def _check_open_quotas(self, request: ingest_pb2.OpenRunRequest, principal: Principal,
                           resumed: RunRecord | None) -> None:
        quotas = self.quotas
        size = metadata_bytes(dict(request.config), dict(request.tags))
        if size > quotas.max_run_metadata_bytes:
            raise exhausted("max_run_metadata_bytes", quotas.max_run_metadata_bytes,
                            f"config and tags take {size} bytes")
        scope = self._scope(principal)
        if resumed is None and len(scope) >= quotas.max_runs_per_token:
            raise exhausted("max_runs_per_token", quotas.max_runs_per_token,
                            f"this token's runs already number {len(scope)}, finished ones "
                            "included")
        if resumed is not None and not resumed.finished_at:
            return  # already open: resuming it opens nothing more
        open_runs = sum(1 for run in scope if not run.finished_at)
        if open_runs >= quotas.max_open_runs_per_token:
            raise exhausted("max_open_runs_per_token", quotas.max_open_runs_per_token,
                            f"this token already has {open_runs} open runs; close one first")

    def _check_series_quota(self, principal: Principal, group: BatchGroup,
                            new_series: int) -> None:
        limit = self.quotas.max_series_per_token
        held = sum(self._series_count(run.run_id) + len(group.new_series.get(run.run_id, ()))
                   for run in self._scope(principal))
        if held + new_series > limit:
            raise exhausted("max_series_per_token", limit,
                            f"samples would create {new_series} new series and this "
                            f"token's runs hold {held}")

    # -- ingest ------------------------------------------------------------------------

    def open_run(self, request: ingest_pb2.OpenRunRequest,
                 principal: Principal) -> tuple[RunRecord, dict[str, int]]:
        check_open_run(request)
        principal.authorize(request.run_name)
        now = self._clock()
        existing = None
        if request.resume_run_id:
            existing = self._known_run(request.resume_run_id, fresh=True)
            if existing is None:
                raise RequestError(grpc.StatusCode.NOT_FOUND,
                                   f"resume_run_id {request.resume_run_id!r} is not a known run")
            if existing.run_name != request.run_name:
                raise invalid(f"resume_run_id {existing.run_id!r} belongs to run "
                              f"{existing.run_name!r}, not {request.run_name!r}")
        self._check_open_quotas(request, principal, existing)
        if existing is not None:
            run = replace(existing, state=common_pb2.RUN_STATE_ACTIVE, finished_at=0.0,
                          world_size=request.world_size, updated_at=now,
                          report_interval_seconds=request.report_interval_seconds,
                          config=dict(request.config) or existing.config,
                          tags=dict(request.tags) or existing.tags,
                          agent_version=request.agent_version or existing.agent_version)
            self.storage.update_run(run)
            if run.run_id not in self._loaded:
                self._reload(run)
            log.info("run resumed: %r (%s)", run.run_name, run.run_id)
        else:
            run = RunRecord(
                run_id=uuid.uuid4().hex[:RUN_ID_CHARS], run_name=request.run_name,
                state=common_pb2.RUN_STATE_ACTIVE, world_size=request.world_size,
                created_at=now, updated_at=now, last_step=0,
                report_interval_seconds=request.report_interval_seconds,
                config=dict(request.config), tags=dict(request.tags),
                agent_version=request.agent_version)
            self.storage.create_run(run)
            log.info("run opened: %r (%s)", run.run_name, run.run_id)
        self._track(run)
        return run, self.storage.last_sequences(run.run_id)

    def _known_run(self, run_id: str, fresh: bool = False) -> RunRecord | None:
        """The run from memory, or (replicas) from storage when another replica opened it
        or ``fresh`` asks for the stored record."""
        run = self._runs.get(run_id)
        if self.ownership is None or (run is not None and not fresh):
            return run
        stored = self.storage.run(run_id)
        if stored is not None and stored.run_id not in self._runs:
            self._track(stored, heard_at=max(stored.updated_at, self._clock()))
        return stored or run

    def apply(self, batch: ingest_pb2.ReportBatch, principal: Principal) -> BatchOutcome:
        """Applies a batch exactly once; RequestError for anything it cannot accept."""
        result = self.apply_many([ReportRequest.check(batch, principal)])[0]
        if isinstance(result, RequestError):
            raise result
        return result

    def apply_many(self, requests: Sequence[ReportRequest],
                   conflict_retry: bool = True) -> list[BatchOutcome | RequestError]:
        """Applies batches exactly once, in order, committed together (group commit).

        Each batch gets the outcome it would get alone, after the ones before it: its own
        RequestError when it cannot be accepted, which leaves the others unaffected. If
        storing the group fails, the batches are tried again one transaction each, so a
        batch that breaks storage fails alone. A sequence another replica committed
        meanwhile (``SequenceConflict``) is decided again once against the committed
        sequences, which then acknowledge it as a duplicate.
        """
        group = BatchGroup()
        results: list[BatchOutcome | RequestError] = []
        applied: list[tuple[int, BatchWrite, list[AlertChange]]] = []
        for request in requests:
            try:
                prepared = self._prepare(request, group)
            except RequestError as error:
                results.append(error)
                continue
            if prepared is None:
                results.append(BatchOutcome(applied=False))
            else:
                write, changes = prepared
                applied.append((len(results), write, changes))
                results.append(BatchOutcome(applied=True, samples_applied=len(write.samples),
                                            changes=changes))
        if not applied:
            return results
        try:
            self.storage.apply_group(group)
        except Exception as exc:
            for run_id in group.runs:
                if self._evaluates(run_id):
                    self._reload_engine(self._runs[run_id])
            if isinstance(exc, SequenceConflict) and conflict_retry:
                return self.apply_many(requests, conflict_retry=False)
            if len(requests) == 1:
                log.exception("storing a batch of run %r failed",
                              requests[0].batch.run_id[:64])
                results[0] = RequestError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"storage failed ({type(exc).__name__}); retry the batch")
                return results
            log.warning("storing a group of %d batches failed (%s: %s); storing them one by one",
                        len(applied), type(exc).__name__, exc)
            for index, _, _ in applied:
                results[index] = self.apply_many([requests[index]])[0]
            return results
        for run_id, keys in group.new_series.items():
            if run_id in self._series_counts:  # else counted from storage when next needed
                self._series_counts[run_id] += len(keys)
        for run_id, senders in group.new_senders.items():
            if run_id in self._sender_counts:
                self._sender_counts[run_id] += len(senders)
        for _, write, changes in applied:
            self._runs[write.run.run_id] = write.run
            self.live.set_run(write.run)
            self.live.record_newest(write.run.run_id, write.newest)
            self.live.apply_changes(changes)
        return results

    def _prepare(self, request: ReportRequest, group: BatchGroup
                 ) -> tuple[BatchWrite, list[AlertChange]] | None:
        """Checks a batch, runs the alert engine on it and adds it to ``group``; None for
        a duplicate (a sequence not above the sender's last, committed or in the group)."""
        batch, principal = request.batch, request.principal
        check_batch_envelope(batch)
        run = group.runs.get(batch.run_id) or self._known_run(batch.run_id)
        if run is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"run_id {batch.run_id!r} is not a known run; call OpenRun")
        principal.authorize(run.run_name)
        last_sequence = group.sequences.get((run.run_id, batch.sender_id))
        if last_sequence is None:
            last_sequence = self.storage.last_sequence(run.run_id, batch.sender_id)
        new_sender = last_sequence == 0
        if batch.sequence <= last_sequence:
            return None
        if run.finished_at and self.ownership is not None:
            run = self._known_run(run.run_id, fresh=True) or run  # resumed elsewhere?
        if run.finished_at:
            state = common_pb2.RunState.Name(run.state)
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"run_id {run.run_id!r} ({run.run_name}) is closed ({state}); "
                               "resume it with OpenRun to report again")
        if request.error is not None:
            raise request.error
        samples, newest = request.samples, request.newest
        known = self.storage.series_keys(run.run_id)
        pending = group.new_series.get(run.run_id, set())
        new_series = [key for key in newest if key not in known and key not in pending]
        if new_series and len(known) + len(pending) + len(new_series) > MAX_SERIES_PER_RUN:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"samples would create {len(new_series)} new series, beyond "
                               f"the limit of {MAX_SERIES_PER_RUN} series per run")
        if new_series:
            self._check_series_quota(principal, group, len(new_series))
        if new_sender:
            self._check_sender_quota(principal, group)
        now = self._clock()
        last_step = max((step for step, _, _ in newest.values()), default=run.last_step)
        updated = replace(run, updated_at=now, last_step=max(run.last_step, last_step))
        if self.ownership is not None:
            # The run's owner evaluates it, from the queue, whichever replica it is.
            group.evaluations.append(Evaluation(
                run.run_id, REPORT, now, last_step,
                samples_to_evaluate(samples, newest, self._queued_metrics)))
            changes, writes = [], EngineWrites()
        else:
            changes = self.engine.observe(run.run_id, samples, now)
            writes = self.engine.take_writes()
        write = BatchWrite(updated, batch.sender_id, batch.sequence, samples, writes, newest)
        group.add(write, new_series, new_sender)
        return write, changes

    def _reload_engine(self, run: RunRecord) -> None:
        self.engine.discard_writes()
        self.engine.forget_run(run.run_id)
        self.engine.track_run(run.run_id, run.run_name, run.report_interval_seconds,
                              run.updated_at, run.last_step, bool(run.finished_at))
        self.engine.restore(
            self.storage.rule_states(run.run_id),
            self.storage.alerts(run_id=run.run_id, states=(PENDING, FIRING), limit=1 << 62))

    def close_run(self, run_id: str, state: int,
                  principal: Principal) -> tuple[RunRecord, list[AlertChange]]:
        check_run_id("run_id", run_id)
        final_state = check_close_state(state)
        run = self._known_run(run_id, fresh=True)
        if run is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"run_id {run_id!r} is not a known run")
        principal.authorize(run.run_name)
        if run.finished_at:
            return run, []  # closing twice is harmless
        now = self._clock()
        if self.ownership is not None:
            # Queued before the run is stored closed: a crash between the two leaves the
            # run open, so the agent's retry closes it (a second close resolves nothing).
            self.storage.enqueue([Evaluation(run_id, CLOSE, now, run.last_step)])
            changes: list[AlertChange] = []
        else:
            changes = self.engine.close_run(run_id, now)
        closed = replace(run, state=final_state, finished_at=now, updated_at=now)
        self.storage.update_run(closed, self.engine.take_writes())
        self._runs[run_id] = closed
        self.live.set_run(closed)
        self.live.apply_changes(changes)
        log.info("run closed: %r (%s) %s", run.run_name, run_id,
                 common_pb2.RunState.Name(final_state))
        return closed, changes

    def heartbeat(self, request: ingest_pb2.HeartbeatRequest,
                  principal: Principal) -> list[AlertChange]:
        """A sender's process is alive at a step: feeds the stall clock, stores nothing but
        the alert changes it causes."""
        check_run_id("run_id", request.run_id)
        check_name("sender_id", request.sender_id)
        if request.step < 0:
            raise invalid("step must be >= 0")
        run = self._known_run(request.run_id)
        if run is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"run_id {request.run_id!r} is not a known run; call OpenRun")
        principal.authorize(run.run_name)
        if run.finished_at:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"run_id {run.run_id!r} ({run.run_name}) is closed")
        if self.ownership is not None:
            self.storage.enqueue([Evaluation(run.run_id, HEARTBEAT, self._clock(),
                                             request.step)])
            return []
        changes = self.engine.heartbeat(run.run_id, request.step, self._clock())
        self._store_clock_changes(changes)
        return changes

    def tick(self) -> list[AlertChange]:
        """Runs the clock rules (RunStalled) and stores what they changed; a replica first
        renews its leases when due and evaluates what its runs have queued."""
        now = self._clock()
        if self.ownership is not None:
            changes = self._evaluate_owned(now)
            self._unload_expired(now)
            return changes
        changes = self.engine.tick(now)
        self._store_clock_changes(changes)
        self._unload_expired(now)
        return changes

    def _store_clock_changes(self, changes: list[AlertChange]) -> None:
        if changes:
            writes = self.engine.take_writes()
            for run_id in {c.alert.run_id for c in changes}:
                self.storage.update_run(self._runs[run_id], _only_run(writes, run_id))
            self.live.apply_changes(changes)

    # -- replicas ----------------------------------------------------------------------

    def _evaluate_owned(self, now: float) -> list[AlertChange]:
        ownership = self.ownership
        assert ownership is not None
        if ownership.renewal_due():
            # Finished runs keep an owner while /metrics shows them.
            held = self.storage.hold_leases(ownership.replica_id, ownership.ttl_seconds,
                                            self._finished_ttl)
            ownership.renewed()
            self._queued_metrics = self.storage.share_rule_metrics(ownership.replica_id,
                                                                   self.engine.metrics)
            self._refresh_runs(now)
            self._release(ownership.owned - held)
            for run_id in sorted(held - ownership.owned):
                self._adopt(run_id, now)
        changes: list[AlertChange] = []
        closed: set[str] = set()

        def evaluate(evaluations: list[Evaluation], held: set[str]) -> EngineWrites:
            self._release(ownership.owned - held)
            for evaluation in evaluations:
                changes.extend(self._feed(evaluation, closed))
            changes.extend(self.engine.tick(now))
            return self.engine.take_writes()

        try:
            lost = self.storage.evaluate_queued(ownership.replica_id, set(ownership.owned),
                                                evaluate, EVALUATIONS_PER_TICK)
        except Exception:
            # Nothing was taken off the queue: the engine goes back to what is stored.
            for run_id in ownership.owned:
                self._reload_engine(self._runs[run_id])
            raise
        self._release(lost)
        for run_id in closed:
            stored = self.storage.run(run_id)
            if stored is not None:
                self._runs[run_id] = stored
                self.live.set_run(stored)
        self.live.apply_changes(changes)
        return changes

    def _feed(self, evaluation: Evaluation, closed: set[str]) -> list[AlertChange]:
        """One queued evaluation into the engine of the run's owner."""
        run_id, at = evaluation.run_id, evaluation.received_at
        if run_id not in self._loaded:
            return []  # finished past the TTL: nothing evaluates it any more
        if evaluation.kind == CLOSE:
            closed.add(run_id)
            return self.engine.close_run(run_id, at)
        if evaluation.kind == HEARTBEAT:
            return self.engine.heartbeat(run_id, evaluation.step, at)
        changes = self.engine.observe(run_id, evaluation.samples, at)
        run = self._runs[run_id]
        updated = replace(run, updated_at=max(run.updated_at, at),
                          last_step=max(run.last_step, evaluation.step))
        self._runs[run_id] = updated
        self.live.set_run(updated)
        self.live.record_newest(run_id, newest_by_series(evaluation.samples))
        return changes

    def _refresh_runs(self, now: float) -> None:
        """Takes the runs as stored: other replicas open, advance and close them too, and
        add senders and series, so the quota counts are taken from storage again."""
        self._series_counts.clear()
        self._sender_counts.clear()
        for run in self.storage.list_runs(include_finished=True):
            if self._expired(run, now):
                self._runs[run.run_id] = run
                if run.run_id in self._loaded:
                    self._loaded.discard(run.run_id)
                    self.live.expire_run(run)
            elif not self._evaluates(run.run_id):  # an owned run's copy here is the newest
                self._runs[run.run_id] = run
                self._loaded.add(run.run_id)
                self.live.set_run(run)

    def _adopt(self, run_id: str, now: float) -> None:
        """Takes a run over: its engine state, open alerts and latest values from storage."""
        assert self.ownership is not None
        run = self.storage.run(run_id)
        if run is None:
            return
        self.ownership.owned.add(run_id)
        self.live.forget_alerts(run_id)
        self.engine.forget_run(run_id)
        # As after a restart, the run's silence counts from the takeover, not from its
        # last report: the failover itself is not a stall.
        self._track(run, heard_at=max(run.updated_at, now))
        self.engine.restore(
            self.storage.rule_states(run_id),
            self.storage.alerts(run_id=run_id, states=(PENDING, FIRING), limit=1 << 62))
        self.live.load_values(self.storage.latest_values(run_id))
        active = [a for a in self.engine.active_alerts() if a.run_id == run_id]
        self.live.load_firing(active)
        self.live.set_owned(self.ownership.owned)
        # The previous owner may have died between storing a transition and posting it:
        # its firing alerts are posted now rather than at the next resend, and its recent
        # resolutions again (Alertmanager deduplicates by labels, so a second post of
        # either changes nothing there).
        since = now - self.ownership.undelivered_seconds
        self._redeliveries.extend(self.storage.resolved_since(run_id, since))
        self._redeliveries.extend(replace(a, labels=dict(a.labels)) for a in active)
        log.info("run taken over for alert evaluation: %r (%s)", run.run_name, run_id)

    def _release(self, run_ids: set[str]) -> None:
        """Stops evaluating runs whose lease another replica holds now."""
        assert self.ownership is not None
        for run_id in run_ids & self.ownership.owned:
            self.ownership.owned.discard(run_id)
            self.engine.forget_run(run_id)
            self.live.forget_alerts(run_id)
            log.info("run's alert evaluation handed over: %s", run_id)
        self.live.set_owned(self.ownership.owned)

    def take_redeliveries(self) -> list[AlertRecord]:
        """The alerts of runs taken over since the last call, to post to Alertmanager
        again: the firing ones and those resolved within the lease's undelivered span."""
        redeliveries, self._redeliveries = self._redeliveries, []
        return redeliveries

    # -- reads -----------------------------------------------------------------------

    def run(self, run_id: str) -> RunRecord | None:
        return self._runs.get(run_id)

    def list_runs(self, include_finished: bool, principal: Principal,
                  after: RunPosition | None = None, limit: int | None = None
                  ) -> list[RunRecord]:
        """The runs the caller may see, oldest first (by created_at, then run_id), only
        those after ``after`` in that order, at most ``limit``."""
        runs = sorted((run for run in self._runs.values()
                       if (include_finished or not run.finished_at)
                       and principal.allows(run.run_name)
                       and (after is None or (run.created_at, run.run_id) > after)),
                      key=lambda run: (run.created_at, run.run_id))
        return runs if limit is None else runs[:limit]

    def list_alerts(self, run_id: str, states: tuple[int, ...], rule: str, limit: int,
                    principal: Principal, after: AlertPosition | None = None
                    ) -> list[AlertRecord]:
        """A page of the alerts the caller may see, newest first, after ``after``.

        A scoped caller's runs are picked here from the runs held in memory, and storage
        reads only their alerts (by index), never every team's."""
        if run_id:
            run = self._runs.get(run_id)
            if run is None:
                raise RequestError(grpc.StatusCode.NOT_FOUND,
                                   f"run_id {run_id!r} is not a known run")
            principal.authorize(run.run_name)
        run_ids: list[str] | None = None
        if run_id:
            run_ids = [run_id]
        elif "*" not in principal.patterns:
            run_ids = [run.run_id for run in self._runs.values()
                       if principal.allows(run.run_name)]
            if not run_ids:
                return []
        return self.storage.alerts(states=states, rule=rule, limit=limit, run_ids=run_ids,
                                   after=after)

    def active_alerts(self) -> list[AlertRecord]:
        return [replace(a, labels=dict(a.labels)) for a in self.engine.active_alerts()]

    def get_series(self, run_id: str, metric: str, labels: dict[str, str], since_step: int,
                   principal: Principal, limit: int | None = None) -> list[SeriesPoint]:
        run = self._runs.get(run_id)
        if run is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"run_id {run_id!r} is not a known run")
        principal.authorize(run.run_name)
        return self.storage.get_series(run_id, metric, labels_key(labels), since_step, limit)

    def list_series(self, run_id: str, principal: Principal,
                    after: SeriesPosition | None = None, limit: int | None = None
                    ) -> list[SeriesKey]:
        """The run's series, by metric then labels key, only those after ``after`` in that
        order, at most ``limit``."""
        run = self._runs.get(run_id)
        if run is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"run_id {run_id!r} is not a known run")
        principal.authorize(run.run_name)
        keys = sorted(key for key in self.storage.series_keys(run_id)
                      if after is None or key > after)
        return keys if limit is None else keys[:limit]

    def close(self) -> None:
        if self.ownership is not None and self.ownership.owned:
            try:
                self.storage.release_leases(self.ownership.replica_id)
            except Exception:  # the leases then expire after their TTL
                log.exception("giving up this replica's leases failed")
        self.storage.close()


def _only_run(writes: EngineWrites, run_id: str) -> EngineWrites:
    """The part of engine writes that belongs to one run."""
    return replace(
        writes,
        rule_states=[s for s in writes.rule_states if s[0] == run_id],
        alerts=[a for a in writes.alerts if a.run_id == run_id],
        changes=[c for c in writes.changes if c.alert.run_id == run_id],
    )
