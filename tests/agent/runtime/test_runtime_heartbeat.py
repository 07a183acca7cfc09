"""The sender's heartbeat against a recording gRPC server on loopback: what it carries,
that it is never spooled, that an idle sender waits for it instead of spinning, and that
a server without the call only turns heartbeats off."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from raresignal.agent import MonitorConfig
from raresignal.agent.sender import Sender
from raresignal.protos.v1 import ingest_pb2, ingest_pb2_grpc

RUN_ID = "0123456789abcdef"
SENDER_ID = "rank0-beat"


class RecordingIngest(ingest_pb2_grpc.IngestServicer):
    """Opens one run, acknowledges every batch, records heartbeats (or refuses them)."""

    def __init__(self, takes_heartbeats: bool) -> None:
        self.takes_heartbeats = takes_heartbeats
        self.heartbeats: list[ingest_pb2.HeartbeatRequest] = []
        self.batches: list[ingest_pb2.ReportBatch] = []
        self.lock = threading.Lock()

    def OpenRun(self, request: ingest_pb2.OpenRunRequest, context: grpc.ServicerContext
                ) -> ingest_pb2.OpenRunResponse:
        return ingest_pb2.OpenRunResponse(run_id=RUN_ID)

    def Report(self, request_iterator: Iterator[ingest_pb2.ReportBatch],
               context: grpc.ServicerContext) -> Iterator[ingest_pb2.ReportAck]:
        for batch in request_iterator:
            with self.lock:
                self.batches.append(batch)
            yield ingest_pb2.ReportAck(sequence=batch.sequence,
                                       outcome=ingest_pb2.ReportAck.OUTCOME_APPLIED)

    def Heartbeat(self, request: ingest_pb2.HeartbeatRequest, context: grpc.ServicerContext
                  ) -> ingest_pb2.HeartbeatResponse:
        if not self.takes_heartbeats:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        with self.lock:
            self.heartbeats.append(request)
        return ingest_pb2.HeartbeatResponse()


def wait_until(condition: Callable[[], object], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.02)


def serve(servicer: RecordingIngest) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ingest_pb2_grpc.add_IngestServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def sender_for(target: str, tmp_path: Path) -> Sender:
    config = MonitorConfig(spool_dir=str(tmp_path), report_interval_seconds=0.05,
                           heartbeat_interval_seconds=0.1, network_timeout_seconds=5.0,
                           reconnect_initial_seconds=0.05, reconnect_max_seconds=0.3)
    return Sender(target, "beating", config, tmp_path, SENDER_ID)


@pytest.fixture
def recording() -> Iterator[tuple[RecordingIngest, str]]:
    servicer = RecordingIngest(takes_heartbeats=True)
    server, target = serve(servicer)
    yield servicer, target
    server.stop(None)


def test_an_idle_sender_heartbeats_with_its_last_step_and_spools_nothing(
        recording: tuple[RecordingIngest, str], tmp_path: Path) -> None:
    servicer, target = recording
    sender = sender_for(target, tmp_path)
    sender.start()
    try:
        sender.submit([("loss", (), 41, 0.5, time.time())])
        wait_until(lambda: len(servicer.heartbeats) >= 3)
        sequence = sender.next_sequence
        beat = servicer.heartbeats[-1]
        assert (beat.run_id, beat.sender_id, beat.step) == (RUN_ID, SENDER_ID, 41)
        assert abs(beat.wall_time - time.time()) < 60
        assert [b.sequence for b in servicer.batches] == [1]  # heartbeats are no batches
        assert sender.next_sequence == sequence and sender.spool_bytes == 0
    finally:
        assert sender.close("completed", timeout=10)


def test_an_idle_sender_waits_for_its_next_heartbeat_instead_of_spinning(
        recording: tuple[RecordingIngest, str], tmp_path: Path) -> None:
    servicer, target = recording
    sender = sender_for(target, tmp_path)
    wakes = [0]
    collect = sender._collect

    def counted(block: bool) -> None:
        wakes[0] += 1
        collect(block)

    sender._collect = counted  # type: ignore[method-assign]
    sender.start()
    try:
        wait_until(lambda: len(servicer.heartbeats) >= 1)
        first_wakes, first_beats = wakes[0], len(servicer.heartbeats)
        wait_until(lambda: len(servicer.heartbeats) >= first_beats + 4)
        # A heartbeat is due every 2 report intervals: a thread that waits wakes a few
        # times per heartbeat, one that spins many thousands of times.
        beats = len(servicer.heartbeats) - first_beats
        assert wakes[0] - first_wakes <= 10 * (beats + 1)
    finally:
        assert sender.close("completed", timeout=10)


def test_a_server_without_heartbeats_turns_them_off_and_still_gets_every_batch(
        tmp_path: Path) -> None:
    servicer = RecordingIngest(takes_heartbeats=False)
    server, target = serve(servicer)
    sender = sender_for(target, tmp_path)
    sender.start()
    try:
        sender.submit([("loss", (), 1, 0.5, time.time())])
        wait_until(lambda: not sender._heartbeats)
        sender.submit([("loss", (), 2, 0.25, time.time())])
        assert sender.close("completed", timeout=10)
        assert [b.samples[0].step for b in servicer.batches] == [1, 2]
        assert sender.heartbeats_sent == 0 and sender.send_failures == 0
    finally:
        server.stop(None)
