"""The gRPC services (Ingest, Alerts, Runs) on grpc.aio.

Handlers stay on the event loop only to decode, check, await and answer: every storage
and alert-engine call goes to the single storage thread, so the loop keeps serving other
streams while storage writes. Report batches go there in groups (:class:`GroupCommit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from raresignal.protos.transport import REJECTED_SEQUENCE_METADATA_KEY
from raresignal.protos.v1 import (
    alerts_pb2,
    alerts_pb2_grpc,
    common_pb2,
    ingest_pb2,
    ingest_pb2_grpc,
)
from raresignal.server.alerting.alertmanager import AlertmanagerNotifier
from raresignal.server.alerting.engine import FIRING, RESOLVED
from raresignal.server.alerting.transition_log import TransitionLog
from raresignal.server.serving.auth import Principal, TokenStore
from raresignal.server.serving.convert import alert_message, run_info
from raresignal.server.serving.ledger import BatchOutcome, Ledger, ReportRequest
from raresignal.server.serving.metrics import ServerMetrics
from raresignal.server.serving.quotas import exhausted
from raresignal.server.serving.validation import (
    MAX_ALERTS_PAGE_SIZE,
    MAX_RUNS_PAGE_SIZE,
    MAX_SAMPLES_PAGE_SIZE,
    MAX_SERIES_PAGE_SIZE,
    PAGE_BYTES,
    RequestError,
    check_alert_filter,
    check_metadata_entries,
    check_page_size,
    check_run_id,
    check_series_request,
    decode_page_token,
    encode_page_token,
    invalid,
    metadata_bytes_at_least,
)
from raresignal.server.storage.records import (
    AlertChange,
    AlertRecord,
    SeriesKey,
    SeriesPoint,
)

log = logging.getLogger("raresignal.server")

T = TypeVar("T")
M = TypeVar("M", bound=Message)
WATCH_QUEUE_SIZE = 10_000
# At most this many batches per group commit, so one transaction (and the ack latency of
# every batch in it) stays bounded however many senders queue up at once.
MAX_GROUP_BATCHES = 64


class AlertHub:
    """Fans alert changes out to WatchAlerts streams (event-loop side only)."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[AlertChange | None]] = set()
        self._overflowed: set[asyncio.Queue[AlertChange | None]] = set()

    def subscribe(self) -> asyncio.Queue[AlertChange | None]:
        queue: asyncio.Queue[AlertChange | None] = asyncio.Queue(WATCH_QUEUE_SIZE)
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[AlertChange | None]) -> None:
        self._queues.discard(queue)
        self._overflowed.discard(queue)

    def overflowed(self, queue: asyncio.Queue[AlertChange | None]) -> bool:
        return queue in self._overflowed

    def publish(self, changes: Sequence[AlertChange]) -> None:
        for queue in list(self._queues):
            for change in changes:
                try:
                    queue.put_nowait(change)
                except asyncio.QueueFull:
                    self._overflowed.add(queue)
                    break

    def close(self) -> None:
        """Ends every watch stream (at shutdown)."""
        for queue in list(self._queues):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)


class GroupCommit:
    """Hands report batches to the storage thread in groups (event-loop side only).

    A batch that arrives while the storage thread is busy waits for the current group to
    finish, then goes with every other batch that queued up meanwhile in one call of
    :meth:`Ledger.apply_many`: one transaction, one hop to the storage thread and one
    wake-up of the event loop per group instead of per batch. Under light load a group
    is a single batch and nothing waits longer than before.
    """

    def __init__(self, call: Callable[..., Awaitable[Any]], ledger: Ledger,
                 max_batches: int = MAX_GROUP_BATCHES) -> None:
        self._call = call
        self._ledger = ledger
        self._max_batches = max_batches
        self._queued: list[tuple[ReportRequest, asyncio.Future[BatchOutcome]]] = []
        self._drain: asyncio.Task[None] | None = None

    async def apply(self, batch: ingest_pb2.ReportBatch, principal: Principal) -> BatchOutcome:
        """The batch's outcome once its group is committed; RequestError if refused."""
        future: asyncio.Future[BatchOutcome] = asyncio.get_running_loop().create_future()
        # The samples are checked here, on the event loop, while the storage thread is
        # busy storing earlier groups (mostly outside the GIL, in the database driver).
        self._queued.append((ReportRequest.check(batch, principal), future))
        if self._drain is None:
            self._drain = asyncio.create_task(self._drain_queue())
        return await future

    async def _drain_queue(self) -> None:
        group: list[tuple[ReportRequest, asyncio.Future[BatchOutcome]]] = []
        try:
            while self._queued:
                group = self._queued[:self._max_batches]
                del self._queued[:self._max_batches]
                requests = [request for request, _ in group]
                try:
                    results = await self._call(self._ledger.apply_many, requests)
                except Exception as exc:  # a bug, not a refusal: every caller learns of it
                    log.exception("applying a group of %d batches failed", len(group))
                    results = [exc] * len(group)
                for (_, future), result in zip(group, results, strict=True):
                    if future.done():  # the stream went away meanwhile
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._drain = None
            for _, future in [*group, *self._queued]:  # only when cancelled (shutdown)
                future.cancel()
            self._queued.clear()


class Backend:
    """What the services share: the ledger on its thread, metrics, auth and outputs."""

    def __init__(self, ledger: Ledger, executor: ThreadPoolExecutor, metrics: ServerMetrics,
                 tokens: TokenStore, hub: AlertHub,
                 notifier: AlertmanagerNotifier | None) -> None:
        self.ledger = ledger
        self.executor = executor
        self.metrics = metrics
        self.tokens = tokens
        self.hub = hub
        self.notifier = notifier
        self.batches = GroupCommit(self.call, ledger)
        self.transitions = TransitionLog(log)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def principal(self, context: grpc.aio.ServicerContext) -> Principal:
        return self.tokens.principal(context.invocation_metadata())

    def publish(self, changes: Sequence[AlertChange]) -> None:
        self.transitions.record(changes)  # also on empty clock ticks: it flushes its counts
        if not changes:
            return
        self.hub.publish(changes)
        for change in changes:
            # An episode that fires again after a resolve (within its hold) is one alert.
            if change.alert.state == FIRING and change.previous_state != RESOLVED:
                self.metrics.alerts_fired.labels(change.alert.rule).inc()
        if self.notifier is not None:
            self.notifier.notify([change.alert for change in changes])


async def _abort(context: grpc.aio.ServicerContext, error: RequestError,
                 trailing: tuple[tuple[str, str], ...] = ()) -> None:
    await context.abort(error.code, error.message, trailing_metadata=trailing)


class IngestService(ingest_pb2_grpc.IngestServicer):
    def __init__(self, backend: Backend) -> None:
        self._b = backend

    async def OpenRun(self, request: ingest_pb2.OpenRunRequest,
                      context: grpc.aio.ServicerContext) -> ingest_pb2.OpenRunResponse:
        try:
            principal = self._b.principal(context)
            self._refuse_oversized_metadata(request)
            run, sequences = await self._b.call(self._b.ledger.open_run, request, principal)
        except RequestError as error:
            await _abort(context, error)
        return ingest_pb2.OpenRunResponse(run_id=run.run_id, run=run_info(run),
                                          last_sequences=sequences)

    def _refuse_oversized_metadata(self, request: ingest_pb2.OpenRunRequest) -> None:
        """Refuses, on the event loop and before anything is copied out of the request,
        metadata that cannot fit the quota, so the one storage thread, which every batch
        waits for, never copies the 2 MiB such a request may carry into strings and
        dicts. The ledger checks the exact size of what passes."""
        check_metadata_entries(request)
        limit = self._b.ledger.quotas.max_run_metadata_bytes
        size = metadata_bytes_at_least(request)
        if size > limit:
            raise exhausted("max_run_metadata_bytes", limit,
                            f"config and tags take at least {size} bytes")

    async def Report(self, request_iterator: AsyncIterator[ingest_pb2.ReportBatch],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[ingest_pb2.ReportAck]:
        metrics = self._b.metrics
        try:
            principal = self._b.principal(context)
        except RequestError as error:
            await _abort(context, error)
        async for batch in request_iterator:
            started = time.perf_counter()
            try:
                outcome = await self._b.batches.apply(batch, principal)
            except RequestError as error:
                metrics.batches.labels("rejected").inc()
                log.info("batch rejected (run %r, sender %r, sequence %d): %s: %r",
                         batch.run_id[:64], batch.sender_id[:64], batch.sequence,
                         error.code.name, error.message)
                await _abort(context, error,
                             ((REJECTED_SEQUENCE_METADATA_KEY, str(batch.sequence)),))
            if outcome.applied:
                metrics.batches.labels("applied").inc()
                metrics.samples.inc(outcome.samples_applied)
                self._b.publish(outcome.changes)
                result = ingest_pb2.ReportAck.OUTCOME_APPLIED
            else:
                metrics.batches.labels("duplicate").inc()
                result = ingest_pb2.ReportAck.OUTCOME_DUPLICATE
            metrics.batch_duration.observe(time.perf_counter() - started)
            yield ingest_pb2.ReportAck(sequence=batch.sequence, outcome=result,
                                       samples_applied=outcome.samples_applied)

    async def Heartbeat(self, request: ingest_pb2.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> ingest_pb2.HeartbeatResponse:
        try:
            principal = self._b.principal(context)
            changes = await self._b.call(self._b.ledger.heartbeat, request, principal)
        except RequestError as error:
            await _abort(context, error)
        self._b.publish(changes)
        return ingest_pb2.HeartbeatResponse()

    async def CloseRun(self, request: ingest_pb2.CloseRunRequest,
                       context: grpc.aio.ServicerContext) -> ingest_pb2.CloseRunResponse:
        try:
            principal = self._b.principal(context)
            run, changes = await self._b.call(self._b.ledger.close_run, request.run_id,
                                              request.state, principal)
        except RequestError as error:
            await _abort(context, error)
        self._b.publish(changes)
        return ingest_pb2.CloseRunResponse(run=run_info(run))


def _matches(alert: AlertRecord, request_filter: alerts_pb2.AlertFilter,
             principal: Principal) -> bool:
    return ((not request_filter.run_id or alert.run_id == request_filter.run_id)
            and (not request_filter.states or alert.state in request_filter.states)
            and (not request_filter.rule or alert.rule == request_filter.rule)
            and principal.allows(alert.run_name))


class AlertsService(alerts_pb2_grpc.AlertsServicer):
    def __init__(self, backend: Backend) -> None:
        self._b = backend

    async def ListAlerts(self, request: alerts_pb2.ListAlertsRequest,
                         context: grpc.aio.ServicerContext) -> alerts_pb2.ListAlertsResponse:
        f = request.filter
        try:
            principal = self._b.principal(context)
            check_alert_filter(f)
            if request.limit < 0:
                raise invalid(f"limit must be >= 0, got {request.limit}")
            page_size = check_page_size(request.page_size or request.limit,
                                        MAX_ALERTS_PAGE_SIZE)
            query = ("ListAlerts", f.run_id, tuple(sorted(set(f.states))), f.rule,
                     principal.patterns)
            after = decode_page_token(request.page_token, query, (float, str))
            alerts = await self._b.call(self._b.ledger.list_alerts, f.run_id, tuple(f.states),
                                        f.rule, page_size + 1, principal, after)
        except RequestError as error:
            await _abort(context, error)
        messages, last = _page(alerts, page_size, alert_message)
        token = "" if last is None else encode_page_token(
            query, (float(last.started_at), last.alert_id))
        return alerts_pb2.ListAlertsResponse(alerts=messages, next_page_token=token)

    async def WatchAlerts(self, request: alerts_pb2.WatchAlertsRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[
                              alerts_pb2.AlertEvent]:
        try:
            principal = self._b.principal(context)
            check_alert_filter(request.filter)
            if request.filter.run_id and await self._b.call(
                    self._b.ledger.run, request.filter.run_id) is None:
                raise RequestError(grpc.StatusCode.NOT_FOUND,
                                   f"run_id {request.filter.run_id!r} is not a known run")
        except RequestError as error:
            await _abort(context, error)
        hub = self._b.hub
        queue = hub.subscribe()  # before the snapshot, so no change falls in between
        try:
            for alert in await self._b.call(self._b.ledger.active_alerts):
                if _matches(alert, request.filter, principal):
                    yield alerts_pb2.AlertEvent(alert=alert_message(alert))
            while True:
                change = await queue.get()
                if change is None:
                    return
                if hub.overflowed(queue):
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        "watcher fell too far behind; watch again")
                if _matches(change.alert, request.filter, principal):
                    yield alerts_pb2.AlertEvent(alert=alert_message(change.alert),
                                                previous_state=change.previous_state)
        finally:
            hub.unsubscribe(queue)


class RunsService(alerts_pb2_grpc.RunsServicer):
    def __init__(self, backend: Backend) -> None:
        self._b = backend

    async def ListRuns(self, request: alerts_pb2.ListRunsRequest,
                       context: grpc.aio.ServicerContext) -> alerts_pb2.ListRunsResponse:
        try:
            principal = self._b.principal(context)
            page_size = check_page_size(request.page_size, MAX_RUNS_PAGE_SIZE)
            query = ("ListRuns", request.include_finished, principal.patterns)
            after = decode_page_token(request.page_token, query, (float, str))
            runs = await self._b.call(self._b.ledger.list_runs, request.include_finished,
                                      principal, after, page_size + 1)
        except RequestError as error:
            await _abort(context, error)
        messages, last = _page(runs, page_size, run_info)
        token = "" if last is None else encode_page_token(
            query, (float(last.created_at), last.run_id))
        return alerts_pb2.ListRunsResponse(runs=messages, next_page_token=token)

    async def GetSeries(self, request: alerts_pb2.GetSeriesRequest,
                        context: grpc.aio.ServicerContext) -> alerts_pb2.GetSeriesResponse:
        try:
            principal = self._b.principal(context)
            check_series_request(request)
            page_size = check_page_size(request.page_size, MAX_SAMPLES_PAGE_SIZE)
            query = ("GetSeries", request.run_id, request.metric,
                     tuple(sorted(request.labels.items())), request.since_step,
                     principal.patterns)
            after = decode_page_token(request.page_token, query, (int,))
            since_step = request.since_step if after is None else int(after[0]) + 1
            points = await self._b.call(self._b.ledger.get_series, request.run_id,
                                        request.metric, dict(request.labels), since_step,
                                        principal, page_size + 1)
        except RequestError as error:
            await _abort(context, error)

        # Every sample shares the metric and labels: copying them from one message is a
        # third of the cost of building each sample's labels map anew (a page of 5000).
        shared = common_pb2.Sample(metric=request.metric, labels=request.labels)

        def sample(point: SeriesPoint) -> common_pb2.Sample:
            message = common_pb2.Sample()
            message.CopyFrom(shared)
            message.step = point.step
            message.value = point.value
            message.wall_time = point.wall_time
            return message

        messages, last = _page(points, page_size, sample)
        token = "" if last is None else encode_page_token(query, (int(last.step),))
        return alerts_pb2.GetSeriesResponse(samples=messages, next_page_token=token)

    async def ListSeries(self, request: alerts_pb2.ListSeriesRequest,
                         context: grpc.aio.ServicerContext) -> alerts_pb2.ListSeriesResponse:
        try:
            principal = self._b.principal(context)
            check_run_id("run_id", request.run_id)
            page_size = check_page_size(request.page_size, MAX_SERIES_PAGE_SIZE)
            query = ("ListSeries", request.run_id, principal.patterns)
            after = decode_page_token(request.page_token, query, (str, str))
            keys = await self._b.call(self._b.ledger.list_series, request.run_id, principal,
                                      after, page_size + 1)
        except RequestError as error:
            await _abort(context, error)

        def series_info(key: SeriesKey) -> alerts_pb2.SeriesInfo:
            return alerts_pb2.SeriesInfo(metric=key[0], labels=json.loads(key[1]))

        messages, last = _page(keys, page_size, series_info)
        token = "" if last is None else encode_page_token(query, last)
        return alerts_pb2.ListSeriesResponse(series=messages, next_page_token=token)


# A repeated field's tag and length prefix, at most, beside each item's own bytes.
_ITEM_FRAMING_BYTES = 6


def _page(items: Sequence[T], page_size: int,
          to_message: Callable[[T], M]) -> tuple[list[M], T | None]:
    """The messages of a page: up to ``page_size`` of ``items`` (fetched one beyond, to
    learn whether another page follows) and, past the first, no more than PAGE_BYTES.
    Returns them and the last item they hold when another page follows, else None."""
    messages: list[M] = []
    total = 0
    for item in items[:page_size]:
        message = to_message(item)
        size = message.ByteSize() + _ITEM_FRAMING_BYTES
        if messages and total + size > PAGE_BYTES:
            break
        messages.append(message)
        total += size
    if len(messages) < len(items):
        return messages, items[len(messages) - 1]
    return messages, None
