"""The background thread that carries measurements to the server.

``submit()`` is the only call the training loop makes, and it never blocks: it puts one
step's samples on a bounded queue, or counts them as dropped when the queue is full.
Everything that can be slow happens in the thread: batching, writing the spool, the gRPC
channel (created here, after any DataLoader worker has forked), OpenRun, the Report
stream, reconnecting with exponential backoff and jitter, CloseRun.

Exactly-once delivery rests on the wire contract: each batch carries this sender's id and
a strictly increasing sequence number, is written to the spool before it is sent and
leaves the spool only when the server acknowledges it (APPLIED or DUPLICATE). A batch the
server rejects (the stream ends with a validation status and the rejected sequence in the
trailing metadata) can never succeed, so it is dropped, logged and counted.

While the process lives, the thread also sends a heartbeat (the run, this sender, the last
step submitted, the wall time) whenever it has sent nothing for
``heartbeat_interval_seconds``, so the server tells a paused or hung loop from a dead
process. Heartbeats carry no measurements: they are never spooled, and a failed one is
simply followed by the next.

"Reports" in the dropped counter are samples (single measurements), whether they were
dropped from a full queue, from a full spool or in a rejected batch.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc

from raresignal.agent.config import MonitorConfig
from raresignal.agent.ratelimit import RateLimitedLog
from raresignal.agent.spool import Spool, SpoolRecord
from raresignal.agent.spool_claims import SPOOL_SUFFIX, LeftBehind, SpoolClaim, find_left_behind
from raresignal.client.channels import auth_metadata, open_channel
from raresignal.protos import transport
from raresignal.protos.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc

log = logging.getLogger(__name__)

# (metric, labels, step, value, wall_time): a plain tuple keeps step() cheap.
SampleTuple = tuple[str, tuple[tuple[str, str], ...], int, float, float]

# Statuses that end a stream because of one batch's content: resending cannot help.
_REJECTION_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
})
# Batches sent on one stream before waiting for their acknowledgements.
_STREAM_WINDOW = 64

# A left-behind spool is delivered in the background for as long as this process lives;
# what it cannot deliver by then stays for the next process to find.
_LEFT_BEHIND_DELIVERY_SECONDS = 24 * 3600.0
# The state a left-behind spool's run is closed with: its process ended without closing it.
LEFT_BEHIND_RUN_STATE = "failed"

RUN_STATES = {
    "completed": common_pb2.RUN_STATE_COMPLETED,
    "failed": common_pb2.RUN_STATE_FAILED,
    "aborted": common_pb2.RUN_STATE_ABORTED,
}


def rejected_sequence(error: grpc.RpcError) -> int | None:
    """The sequence the server named as rejected in the trailing metadata, if any."""
    trailing = getattr(error, "trailing_metadata", lambda: None)() or ()
    for key, value in trailing:
        if key == transport.REJECTED_SEQUENCE_METADATA_KEY:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def left_behind_sender(found: LeftBehind, target: str, config: MonitorConfig,
                       spool_dir: Path, world_size: int = 1, agent_version: str = ""
                       ) -> Sender:
    """A sender (not started) that delivers a left-behind spool to its own run; its
    ``close(LEFT_BEHIND_RUN_STATE, timeout)`` delivers, then closes that run."""
    log.info("raresignal: delivering the spool %s that an earlier process of run %r left "
             "behind (run %s)", spool_dir / f"{found.sender_id}{SPOOL_SUFFIX}",
             found.run_name, found.run_id or "never opened")
    return Sender(target, found.run_name, config, spool_dir, found.sender_id,
                  world_size=world_size, run_id=found.run_id, agent_version=agent_version,
                  delivers_left_behind=False)


class Sender:
    """Queue → batches → spool → gRPC, in one daemon thread."""

    def __init__(
        self,
        target: str,
        run_name: str,
        config: MonitorConfig,
        spool_dir: Path,
        sender_id: str,
        *,
        world_size: int = 1,
        run_id: str | None = None,
        next_sequence: int = 1,
        agent_version: str = "",
        delivers_left_behind: bool = True,
    ) -> None:
        """``delivers_left_behind``: at start, find the spools earlier processes of this
        run name (and rank) left undelivered, and deliver each to its own run."""
        self.target = target
        self.run_name = run_name
        self.sender_id = sender_id
        self.spool_path = spool_dir / f"{sender_id}{SPOOL_SUFFIX}"
        self._delivers_left_behind = delivers_left_behind
        self._claim: SpoolClaim | None = None
        self._left_behind: list[Sender] = []
        self._config = config
        self._world_size = world_size
        self._agent_version = agent_version
        self._run_id = run_id
        self._next_sequence = max(1, next_sequence)
        # Items: one step's samples, a flush request, or None to wake the thread.
        self._queue: queue.Queue[list[SampleTuple] | threading.Event | None] = queue.Queue(
            config.queue_size)
        self._buffer: list[SampleTuple] = []
        self._last_flush = time.monotonic()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._close_state: str | None = None
        self._close_deadline = 0.0
        self._all_sent = False
        self._run_opened = False
        self._channel: grpc.Channel | None = None
        self._stub: ingest_pb2_grpc.IngestStub | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._spool: Spool | None = None
        self._spool_bytes = 0
        self._dropped_in_queue = 0
        self._dropped_in_sender = 0
        self._applied_batches = 0
        self._duplicate_batches = 0
        self._send_failures = 0
        self._internal_errors = 0
        self._log = RateLimitedLog(log)
        # Written by submit() on the training thread, read here: a plain int, no lock.
        self._current_step = 0
        self._last_contact = time.monotonic()
        self._heartbeats = True  # off once a server says it does not know the call
        self._heartbeats_sent = 0

    # -- read from the training thread ---------------------------------------------------

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def next_sequence(self) -> int:
        return self._next_sequence

    @property
    def dropped_reports(self) -> int:
        return self._dropped_in_queue + self._dropped_in_sender

    @property
    def spool_bytes(self) -> int:
        return self._spool_bytes

    @property
    def send_failures(self) -> int:
        return self._send_failures

    @property
    def left_behind(self) -> list[Sender]:
        """The senders delivering spools that earlier processes left behind."""
        return list(self._left_behind)

    @property
    def heartbeats_sent(self) -> int:
        """Heartbeats the server acknowledged."""
        return self._heartbeats_sent

    @property
    def internal_errors(self) -> int:
        """Unexpected errors the thread survived (each logged, rate-limited)."""
        return self._internal_errors

    @property
    def applied_batches(self) -> int:
        """Batches the server acknowledged as APPLIED (first delivery)."""
        return self._applied_batches

    @property
    def duplicate_batches(self) -> int:
        """Batches the server acknowledged as DUPLICATE (a replay it already held)."""
        return self._duplicate_batches

    # -- the training thread's side ------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="raresignal-sender",
                                            daemon=True)
            self._thread.start()

    def submit(self, samples: list[SampleTuple]) -> bool:
        """Queues one step's samples without blocking; False when they were dropped."""
        if not samples:
            return True
        self._current_step = samples[0][2]
        try:
            self._queue.put_nowait(samples)
            return True
        except queue.Full:
            self._dropped_in_queue += len(samples)
            self._log.warning("queue-full", "raresignal: report queue full (%d steps); "
                              "dropping measurements", self._config.queue_size)
            return False

    def flush(self, timeout: float) -> bool:
        """Waits at most ``timeout`` seconds until every sample submitted so far is in a
        sealed, spooled batch, so that ``next_sequence`` then covers them all (what a
        checkpoint must record). True when that happened in time."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return False
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self, state: str | None, timeout: float) -> bool:
        """Flushes for at most ``timeout`` seconds, then closes the run with ``state``
        (None leaves the run open). True when every batch reached the server."""
        if self._thread is None:
            self.start()
        if not self._closing.is_set():
            self._close_state = state
            self._close_deadline = time.monotonic() + timeout
            self._closing.set()
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)  # wake the thread
        assert self._thread is not None
        # The thread's own deadline bounds the flush; one network timeout more covers
        # the CloseRun call and a stream in flight.
        self._thread.join(timeout + 2 * self._config.network_timeout_seconds + 1.0)
        return self._all_sent

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._claim = SpoolClaim.take(self.spool_path.parent, self.sender_id)
            if self._claim is None:
                if not self._delivers_left_behind:
                    return  # another process is delivering this spool already
                log.warning("raresignal: another live process holds the spool %s",
                            self.spool_path)
            self._spool = Spool(self.spool_path, self._config.spool_max_bytes,
                                self._config.spool_fsync)
            self._spool_bytes = self._spool.live_bytes
            self._next_sequence = max(self._next_sequence, self._spool.max_sequence + 1)
            if self._claim is not None:
                self._claim.record_run(self.run_name, self._run_id)
            if self._delivers_left_behind:
                self._deliver_left_behind()
            self._loop()
            self._finish()
        except Exception:
            log.exception("raresignal: the sender thread stopped; measurements stay in %s",
                          self.spool_path)
        finally:
            if self._claim is not None:
                self._claim.release(delivered=self._all_sent)

    def _deliver_left_behind(self) -> None:
        """Starts delivering, each to its own run, the spools that earlier processes of
        this run name and rank left behind, then closes those runs."""
        prefix = self.sender_id.split("-", 1)[0] + "-"
        for found in find_left_behind(self.spool_path.parent, self.run_name, prefix,
                                      self.sender_id):
            self._left_behind.append(self._start_left_behind_delivery(found))

    def _start_left_behind_delivery(self, found: LeftBehind) -> Sender:
        sender = left_behind_sender(found, self.target, self._config, self.spool_path.parent,
                                    world_size=self._world_size,
                                    agent_version=self._agent_version)
        threading.Thread(target=sender.close,
                         args=(LEFT_BEHIND_RUN_STATE, _LEFT_BEHIND_DELIVERY_SECONDS),
                         name="raresignal-left-behind", daemon=True).start()
        return sender

    def _loop(self) -> None:
        assert self._spool is not None
        while True:
            closing = self._closing.is_set()
            try:
                self._collect(block=not closing)
                if self._network_due() and time.monotonic() >= self._retry_at:
                    self._try_send()
                elif not closing and self._heartbeat_due_at() <= time.monotonic():
                    self._send_heartbeat()
            except Exception:
                # Whatever went wrong, the thread carries on: measurements keep flowing
                # into the spool, and the next attempt may well succeed.
                self._on_internal_error()
            if closing:
                drained = self._queue.empty() and not self._buffer and not len(self._spool)
                out_of_time = time.monotonic() >= self._close_deadline
                retry_too_late = len(self._spool) > 0 and self._retry_at >= self._close_deadline
                if drained or out_of_time or retry_too_late:
                    return
                if len(self._spool) and self._retry_at > time.monotonic():
                    time.sleep(min(0.05, max(0.0, self._retry_at - time.monotonic())))

    def _collect(self, block: bool) -> None:
        """Takes samples off the queue into batches, waiting at most until the next flush
        or the next retry is due."""
        interval = self._config.report_interval_seconds
        # An empty buffer has no flush due: wait for samples (submit wakes the thread) and
        # look again after one interval, rather than spin.
        deadline = (self._last_flush if self._buffer else time.monotonic()) + interval
        if self._network_due():
            deadline = min(deadline, max(self._retry_at, time.monotonic()))
        deadline = min(deadline, self._heartbeat_due_at())
        wait = max(0.0, deadline - time.monotonic()) if block else 0.0
        try:
            item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            while True:
                if isinstance(item, threading.Event):
                    # Everything queued before the flush request is in the buffer now.
                    if self._buffer:
                        self._seal(len(self._buffer))
                    item.set()
                elif item is not None:
                    self._buffer.extend(item)
                    while len(self._buffer) >= self._config.batch_size:
                        self._seal(self._config.batch_size)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        if self._buffer and (self._closing.is_set()
                             or time.monotonic() - self._last_flush >= interval):
            self._seal(len(self._buffer))
        if not self._buffer:
            self._last_flush = max(self._last_flush, time.monotonic() - interval)

    def _network_due(self) -> bool:
        """Whether there is something to do on the network: batches to send, or the run to
        open (opened early so that a checkpoint taken soon after start holds its id)."""
        return bool(len(self._spool or ())) or not self._run_opened

    def _seal(self, count: int) -> None:
        """Makes a batch of the first ``count`` buffered samples and spools it."""
        assert self._spool is not None
        samples, self._buffer = self._buffer[:count], self._buffer[count:]
        batch = ingest_pb2.ReportBatch(sender_id=self.sender_id, sequence=self._next_sequence)
        for metric, labels, step, value, wall_time in samples:
            batch.samples.append(common_pb2.Sample(metric=metric, labels=dict(labels),
                                                   step=step, value=value,
                                                   wall_time=wall_time))
        self._next_sequence += 1
        self._last_flush = time.monotonic()
        for record in self._spool.append(batch):
            self._drop(record, "the spool is full (spool_max_bytes=%d)",
                       self._config.spool_max_bytes)
        self._spool_bytes = self._spool.live_bytes

    def _drop(self, record: SpoolRecord, reason: str, *args: object) -> None:
        self._dropped_in_sender += record.samples
        self._log.warning("drop:" + reason, "raresignal: dropped batch %d (%d samples): "
                          + reason, record.sequence, record.samples, *args)

    # -- network -------------------------------------------------------------------------

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return auth_metadata(self._config.token)

    def _ensure_stub(self) -> ingest_pb2_grpc.IngestStub:
        if self._stub is None:
            backoff = [
                ("grpc.initial_reconnect_backoff_ms",
                 int(self._config.reconnect_initial_seconds * 1000)),
                ("grpc.max_reconnect_backoff_ms", int(self._config.reconnect_max_seconds * 1000)),
            ]
            self._channel = open_channel(self.target, self._config.tls, backoff)
            self._stub = ingest_pb2_grpc.IngestStub(self._channel)
        return self._stub

    def _reset_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stub = None

    def _try_send(self) -> None:
        try:
            stub = self._ensure_stub()
            if not self._run_opened:
                self._open_run(stub)
            acknowledged = self._stream(stub) if len(self._spool or ()) else True
            self._last_contact = time.monotonic()
            self._failures = 0
            # A stream that ended cleanly without acknowledging anything would otherwise
            # be retried at once, in a busy loop.
            self._retry_at = 0.0 if acknowledged else time.monotonic() + 1.0
        except grpc.RpcError as error:
            self._on_error(error)

    def _heartbeat_due_at(self) -> float:
        """When the next heartbeat is due (infinity: none is, or none can be sent)."""
        if not (self._heartbeats and self._run_opened and self._run_id):
            return float("inf")
        return max(self._last_contact + self._config.heartbeat_interval_seconds,
                   self._retry_at)

    def _send_heartbeat(self) -> None:
        """Tells the server this process lives, at which step; a failure only waits for
        the next one (batches have their own retries)."""
        self._last_contact = time.monotonic()
        request = ingest_pb2.HeartbeatRequest(run_id=self._run_id or "",
                                              sender_id=self.sender_id,
                                              step=self._current_step, wall_time=time.time())
        try:
            self._ensure_stub().Heartbeat(request,
                                          timeout=self._config.network_timeout_seconds,
                                          metadata=self._metadata())
        except grpc.RpcError as error:
            code = error.code() if hasattr(error, "code") else None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                self._heartbeats = False  # an older server: reports alone keep it informed
                log.info("raresignal: the server at %s takes no heartbeats", self.target)
                return
            name = code.name if code is not None else type(error).__name__
            self._log.warning("heartbeat:" + name, "raresignal: heartbeat to %s failed (%s)",
                              self.target, name)
            return
        self._heartbeats_sent += 1

    def _open_run(self, stub: ingest_pb2_grpc.IngestStub) -> None:
        request = ingest_pb2.OpenRunRequest(
            run_name=self.run_name,
            resume_run_id=self._run_id or "",
            config=self._config.run_config,
            tags=self._config.tags,
            world_size=self._world_size,
            report_interval_seconds=self._config.report_interval_seconds,
            agent_version=self._agent_version,
        )
        try:
            response = stub.OpenRun(request, timeout=self._config.network_timeout_seconds,
                                    metadata=self._metadata())
        except grpc.RpcError as error:
            if not (self._run_id and error.code() == grpc.StatusCode.NOT_FOUND):
                raise
            log.warning("raresignal: the server does not know run %s (%s); opening a new "
                        "run named %r", self._run_id, error.details(), self.run_name)
            request.resume_run_id = ""
            response = stub.OpenRun(request, timeout=self._config.network_timeout_seconds,
                                    metadata=self._metadata())
        assert self._spool is not None
        self._run_id = response.run_id
        first_free = response.last_sequences.get(self.sender_id, 0) + 1
        shift = self._spool.renumber_unsent(first_free)
        if shift:
            log.info("raresignal: renumbered unsent batches by %d after resuming run %s",
                     shift, self._run_id)
        self._next_sequence = max(self._next_sequence + shift, first_free,
                                  self._spool.max_sequence + 1)
        self._run_opened = True
        if self._claim is not None:
            self._claim.record_run(self.run_name, self._run_id)
        log.debug("raresignal: run %s open on %s (sender %s)", self._run_id, self.target,
                  self.sender_id)

    def _stream(self, stub: ingest_pb2_grpc.IngestStub) -> bool:
        """Sends up to one window of spooled batches and removes what is acknowledged or
        rejected; False when the stream settled none of them."""
        assert self._spool is not None
        records = list(self._spool)[:_STREAM_WINDOW]
        if not records:
            return True
        settled = 0
        for record in records:
            record.sent = True
        timeout = self._config.network_timeout_seconds * (1 + len(records) / 8)
        call = stub.Report(self._batches(records), timeout=timeout, metadata=self._metadata())
        try:
            for ack in call:
                if self._spool.remove(ack.sequence) is not None:
                    settled += 1
                if ack.outcome == ingest_pb2.ReportAck.OUTCOME_DUPLICATE:
                    self._duplicate_batches += 1
                else:
                    self._applied_batches += 1
        except grpc.RpcError as error:
            sequence = rejected_sequence(error)
            if sequence is None or error.code() not in _REJECTION_CODES:
                raise
            record = self._spool.remove(sequence)
            if record is not None:
                settled += 1
                self._drop(record, "the server rejected it: %s %s", error.code().name,
                           error.details())
        finally:
            self._spool_bytes = self._spool.live_bytes
        return settled > 0

    def _batches(self, records: Sequence[SpoolRecord]) -> Iterator[ingest_pb2.ReportBatch]:
        for record in records:
            batch = ingest_pb2.ReportBatch.FromString(record.payload)
            batch.run_id = self._run_id or ""
            yield batch

    def _back_off(self) -> float:
        """Schedules the next attempt after one more failure; returns the delay."""
        self._failures += 1
        ceiling = min(self._config.reconnect_max_seconds,
                      self._config.reconnect_initial_seconds * 2 ** (self._failures - 1))
        delay = random.uniform(ceiling / 2, ceiling)  # "equal jitter": spread, never zero
        self._retry_at = time.monotonic() + delay
        return delay

    def _on_error(self, error: grpc.RpcError) -> None:
        code = error.code() if hasattr(error, "code") else None
        self._send_failures += 1
        delay = self._back_off()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            # A fresh channel connects at once instead of waiting out grpc's own backoff.
            self._reset_channel()
        name = code.name if code is not None else type(error).__name__
        details = error.details() if hasattr(error, "details") else str(error)
        self._log.warning("rpc:" + name, "raresignal: cannot reach %s (%s: %s); spooling to "
                          "%s, retrying in %.1f s", self.target, name, details,
                          self.spool_path, delay)

    def _on_internal_error(self) -> None:
        self._internal_errors += 1
        self._back_off()
        self._log.warning("internal", "raresignal: the sender hit an unexpected error and "
                          "carries on; unsent batches stay in %s", self.spool_path,
                          exc_info=True)

    def _finish(self) -> None:
        assert self._spool is not None
        self._all_sent = not len(self._spool) and not self._buffer and self._queue.empty()
        state = self._close_state
        if state is not None and self._run_opened and self._run_id:
            remaining = self._close_deadline - time.monotonic()
            try:
                self._ensure_stub().CloseRun(
                    ingest_pb2.CloseRunRequest(run_id=self._run_id, state=RUN_STATES[state]),
                    timeout=max(1.0, min(self._config.network_timeout_seconds, remaining)),
                    metadata=self._metadata())
            except grpc.RpcError as error:
                log.warning("raresignal: could not close run %s: %s %s", self._run_id,
                            error.code().name, error.details())
        if not self._all_sent:
            log.warning("raresignal: %d batches were not acknowledged before close; they "
                        "stay in %s", len(self._spool), self.spool_path)
        self._spool.close()
        self._reset_channel()

