"""The sender against the real server on loopback: delivery, spooling, rejection,
resumption and authentication."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from ports import free_port
from runtime_server import stored_series
from runtime_toys import LossEstimator

from raresignal.agent import Monitor, MonitorConfig
from raresignal.agent.sender import Sender
from raresignal.agent.spool import Spool
from raresignal.protos.v1 import alerts_pb2, alerts_pb2_grpc, common_pb2, ingest_pb2
from raresignal.server.serving.app import ServerConfig, ServerHandle, start_in_thread


def _server(tmp_path: Path, grpc_port: int = 0, **kwargs: object) -> ServerHandle:
    return start_in_thread(ServerConfig(db_path=str(tmp_path / "rs.db"), host="127.0.0.1",
                                        grpc_port=grpc_port, metrics_port=0, health_port=0,
                                        **kwargs))


def _config(tmp_path: Path, **overrides: object) -> MonitorConfig:
    settings: dict[str, object] = dict(
        spool_dir=str(tmp_path / "spool"), report_interval_seconds=0.05,
        reconnect_initial_seconds=0.05, reconnect_max_seconds=0.3,
        network_timeout_seconds=2.0, close_timeout_seconds=20.0, max_interval_factor=1)
    settings.update(overrides)
    return MonitorConfig(**settings)  # type: ignore[arg-type]


def _losses(first: int, count: int, offset: float = 0.0) -> Iterator[float]:
    """Distinct, exactly representable losses so stored values can be compared with ==."""
    return (offset + step / 4 for step in range(first, first + count))


def test_every_step_arrives_once_with_its_value(tmp_path: Path) -> None:
    with _server(tmp_path) as server:
        monitor = Monitor(torch.nn.Linear(2, 2), None, server=server.grpc_target,
                          run_name="delivery", estimators=[LossEstimator()],
                          config=_config(tmp_path))
        expected = {}
        for step, loss in enumerate(_losses(0, 40)):
            monitor.step(loss=torch.tensor(loss, dtype=torch.float64))
            expected[step] = loss
            if step % 10 == 0:
                time.sleep(0.06)  # let several batches form
        assert monitor.close() is True
        sender = monitor.sender
        assert sender is not None and monitor.run_id
        assert stored_series(server.grpc_target, monitor.run_id) == expected
        # Each sequence number was applied exactly once: as many APPLIED acks as batches.
        assert sender.applied_batches == sender.next_sequence - 1 >= 2
        assert sender.duplicate_batches == 0 and sender.dropped_reports == 0
        # The monitor's own series go out once per report interval and at close.
        progress = stored_series(server.grpc_target, monitor.run_id, "step")
        assert max(progress) == 39 and all(value == step for step, value in progress.items())
        assert not sender.spool_path.exists()  # everything acknowledged, spool removed

        with grpc.insecure_channel(server.grpc_target) as channel:
            runs = alerts_pb2_grpc.RunsStub(channel).ListRuns(
                alerts_pb2.ListRunsRequest(include_finished=True), timeout=10).runs
        assert [(r.run_name, r.state) for r in runs if r.run_id == monitor.run_id] == [
            ("delivery", common_pb2.RUN_STATE_COMPLETED)]


def test_reports_wait_in_the_spool_until_the_server_comes_up(tmp_path: Path) -> None:
    port = free_port()
    monitor = Monitor(torch.nn.Linear(2, 2), None, server=f"127.0.0.1:{port}",
                      run_name="late-server", estimators=[LossEstimator()],
                      config=_config(tmp_path))
    expected = {}
    for step, loss in enumerate(_losses(0, 20)):
        monitor.step(loss=torch.tensor(loss, dtype=torch.float64))
        expected[step] = loss
    sender = monitor.sender
    assert sender is not None
    deadline = time.monotonic() + 10
    while (sender.spool_bytes == 0 or sender.send_failures == 0) and (
            time.monotonic() < deadline):
        time.sleep(0.02)
    assert sender.spool_bytes > 0 and sender.spool_path.stat().st_size > 0
    assert sender.send_failures > 0 and monitor.run_id is None

    with _server(tmp_path, grpc_port=port) as server:
        for step, loss in enumerate(_losses(20, 20), start=20):
            monitor.step(loss=torch.tensor(loss, dtype=torch.float64))
            expected[step] = loss
        assert monitor.close() is True
        assert monitor.run_id is not None
        assert stored_series(server.grpc_target, monitor.run_id) == expected
    assert sender.dropped_reports == 0


def test_a_rejected_batch_is_dropped_counted_and_the_stream_goes_on(tmp_path: Path) -> None:
    with _server(tmp_path) as server:
        sender = Sender(server.grpc_target, "rejects", _config(tmp_path, batch_size=1),
                        tmp_path / "spool", sender_id="rank0-rejects")
        sender.start()
        now = time.time()
        sender.submit([("loss", (), 0, 1.0, now)])
        sender.submit([("not_in_the_catalogue", (), 1, 2.0, now)])
        sender.submit([("loss", (), 2, 3.0, now)])
        assert sender.close("completed", timeout=20) is True
        assert sender.dropped_reports == 1  # the one sample of the rejected batch
        assert sender.applied_batches == 2
        assert sender.run_id is not None
        assert stored_series(server.grpc_target, sender.run_id) == {0: 1.0, 2: 3.0}


def test_a_resumed_checkpoint_continues_the_run_without_being_taken_for_duplicates(
        tmp_path: Path) -> None:
    with _server(tmp_path) as server:
        first = Monitor(torch.nn.Linear(2, 2), None, server=server.grpc_target,
                        run_name="resumed", estimators=[LossEstimator()],
                        config=_config(tmp_path))
        for step, loss in enumerate(_losses(0, 10)):
            if step == 5:
                # The run id is in a checkpoint once the run is open (the sender opens it
                # right after the first step).
                deadline = time.monotonic() + 10
                while first.run_id is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                checkpoint = first.state_dict()
            first.step(loss=torch.tensor(loss, dtype=torch.float64))
        # The first process stops without closing the run (it crashed after step 9).
        assert first.sender is not None and first.sender.close(None, timeout=20) is True
        assert checkpoint["run_id"] == first.run_id

        second = Monitor(torch.nn.Linear(2, 2), None, server=server.grpc_target,
                         run_name="resumed", estimators=[LossEstimator()],
                         config=_config(tmp_path))
        second.load_state_dict(checkpoint)
        assert second.run_id == first.run_id
        for loss in _losses(5, 10, offset=100.0):  # steps 5..14 computed again / anew
            second.step(loss=torch.tensor(loss, dtype=torch.float64))
        assert second.close() is True
        assert second.run_id == first.run_id
        assert second.sender is not None and second.sender.duplicate_batches == 0

        stored = stored_series(server.grpc_target, first.run_id)
    assert stored == {**{s: s / 4 for s in range(5)},
                      **{s: 100.0 + s / 4 for s in range(5, 15)}}


def test_a_wrong_token_never_blocks_training_and_a_right_one_delivers(
        tmp_path: Path) -> None:
    with _server(tmp_path, tokens={"secret": ["auth-*"]}) as server:
        refused = Monitor(torch.nn.Linear(2, 2), None, server=server.grpc_target,
                          run_name="auth-1", token="wrong", estimators=[LossEstimator()],
                          config=_config(tmp_path / "a", close_timeout_seconds=0.5))
        for loss in _losses(0, 5):
            refused.step(loss=torch.tensor(loss))
        assert refused.close() is False  # nothing could be delivered
        assert refused.sender is not None and refused.sender.send_failures > 0
        assert refused.sender.spool_path.exists()  # kept for a later attempt

        accepted = Monitor(torch.nn.Linear(2, 2), None, server=server.grpc_target,
                           run_name="auth-1", token="secret", estimators=[LossEstimator()],
                           config=_config(tmp_path / "b"))
        for loss in _losses(0, 5):
            accepted.step(loss=torch.tensor(loss, dtype=torch.float64))
        assert accepted.close() is True
        assert accepted.run_id is not None
        assert stored_series(server.grpc_target, accepted.run_id, token="secret") == {
            s: s / 4 for s in range(5)}


@pytest.mark.parametrize("state", ["failed", "aborted"])
def test_close_records_how_the_run_ended(tmp_path: Path, state: str) -> None:
    with _server(tmp_path) as server:
        monitor = Monitor(torch.nn.Linear(2, 2), None, server=server.grpc_target,
                          run_name=f"ended-{state}", estimators=[LossEstimator()],
                          config=_config(tmp_path))
        monitor.step(loss=torch.tensor(1.0))
        assert monitor.close(state) is True
        with grpc.insecure_channel(server.grpc_target) as channel:
            runs = alerts_pb2_grpc.RunsStub(channel).ListRuns(
                alerts_pb2.ListRunsRequest(include_finished=True), timeout=10).runs
        states = {r.run_id: r.state for r in runs}
        assert states[monitor.run_id] == {"failed": common_pb2.RUN_STATE_FAILED,
                                          "aborted": common_pb2.RUN_STATE_ABORTED}[state]


def test_a_full_spool_drops_the_oldest_and_delivers_the_rest(tmp_path: Path) -> None:
    port = free_port()
    sender = Sender(f"127.0.0.1:{port}", "bounded",
                    _config(tmp_path, batch_size=5, spool_max_bytes=2048),
                    tmp_path / "spool", sender_id="rank0-bounded")
    sender.start()
    for step in range(200):
        sender.submit([("loss", (), step, step / 4, 1.0)])
    deadline = time.monotonic() + 10
    while sender.dropped_reports == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # let the sender take the rest of the queue
    assert 0 < sender.spool_bytes <= 2048
    with _server(tmp_path, grpc_port=port) as server:
        assert sender.close("completed", timeout=20) is True
        assert sender.run_id is not None
        stored = stored_series(server.grpc_target, sender.run_id)
    # Dropped are counted sample by sample; what survived is the newest, intact.
    assert len(stored) + sender.dropped_reports == 200
    assert sorted(stored) == list(range(200 - len(stored), 200))
    assert all(value == step / 4 for step, value in stored.items())


def test_a_full_queue_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    sender = Sender("127.0.0.1:9", "queue", _config(tmp_path, queue_size=2),
                    tmp_path / "spool", sender_id="rank0-queue")  # thread not started
    assert sender.submit([("loss", (), 0, 1.0, 1.0)])
    assert sender.submit([("loss", (), 1, 1.0, 1.0), ("grad_norm", (), 1, 1.0, 1.0)])
    assert not sender.submit([("loss", (), 2, 1.0, 1.0), ("grad_norm", (), 2, 1.0, 1.0)])
    assert sender.dropped_reports == 2


def test_the_sender_survives_an_unexpected_error_and_delivers_everything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original_remove = Spool.remove
    failures = iter([True])

    def remove_failing_once(self: Spool, sequence: int) -> object:
        if next(failures, False):
            raise RuntimeError("injected: the spool failed while settling an ack")
        return original_remove(self, sequence)

    monkeypatch.setattr(Spool, "remove", remove_failing_once)
    with _server(tmp_path) as server:
        sender = Sender(server.grpc_target, "survives", _config(tmp_path, batch_size=1),
                        tmp_path / "spool", sender_id="rank0-survives")
        sender.start()
        now = time.time()
        for step in range(20):
            sender.submit([("loss", (), step, step / 4, now)])
        assert sender.close("completed", timeout=20) is True
        assert sender.internal_errors == 1
        assert sender.dropped_reports == 0
        assert sender.run_id is not None
        assert stored_series(server.grpc_target, sender.run_id) == {
            step: step / 4 for step in range(20)}


def test_a_checkpoint_holds_every_step_measured_before_it(tmp_path: Path) -> None:
    # Nothing listens here, and batches are sealed only once a minute unless flushed: a
    # step measured before the checkpoint is on disk only because state_dict() flushed.
    config = _config(tmp_path, report_interval_seconds=60.0, network_timeout_seconds=5.0)
    monitor = Monitor(torch.nn.Linear(2, 2), None, server=f"127.0.0.1:{free_port()}",
                      run_name="flushed", estimators=[LossEstimator()], config=config)
    for loss in _losses(0, 7):
        monitor.step(loss=torch.tensor(loss, dtype=torch.float64))
    state = monitor.state_dict()
    assert monitor.sender is not None

    on_disk = Spool(monitor.sender.spool_path, max_bytes=1 << 20)
    losses = {sample.step: sample.value
              for record in on_disk
              for sample in ingest_pb2.ReportBatch.FromString(record.payload).samples
              if sample.metric == "loss"}
    assert losses == {step: step / 4 for step in range(7)}
    assert state["next_sequence"] == on_disk.max_sequence + 1
    monitor.sender.close(None, timeout=0)


def _wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_a_spool_left_behind_is_delivered_to_its_run_by_the_next_process(
        tmp_path: Path) -> None:
    port = free_port()
    with _server(tmp_path, grpc_port=port) as server:
        first = Monitor(torch.nn.Linear(2, 2), None, server=server.grpc_target,
                        run_name="left-behind", estimators=[LossEstimator()],
                        config=_config(tmp_path))
        for loss in _losses(0, 5):
            first.step(loss=torch.tensor(loss, dtype=torch.float64))
        sender = first.sender
        assert sender is not None
        _wait_until(lambda: sender.applied_batches > 0 and sender.spool_bytes == 0)
    run_id = first.run_id
    assert run_id is not None
    for loss in _losses(5, 10):  # the server is gone: these wait in the spool
        first.step(loss=torch.tensor(loss, dtype=torch.float64))
    # The process dies: no checkpoint, nothing delivered, the run never closed.
    first._closed = True
    assert sender.close(None, timeout=0) is False
    assert sender.spool_path.exists()

    with _server(tmp_path, grpc_port=port) as server:
        second = Monitor(torch.nn.Linear(2, 2), None, server=server.grpc_target,
                         run_name="left-behind", estimators=[LossEstimator()],
                         config=_config(tmp_path))
        for loss in _losses(0, 3, offset=100.0):
            second.step(loss=torch.tensor(loss, dtype=torch.float64))
        assert second.close() is True
        assert second.sender is not None and second.run_id != run_id
        (delivery,) = second.sender.left_behind
        assert delivery.close("failed", timeout=20) is True
        assert stored_series(server.grpc_target, run_id) == {
            step: step / 4 for step in range(15)}
        assert stored_series(server.grpc_target, second.run_id) == {
            step: 100.0 + step / 4 for step in range(3)}
        with grpc.insecure_channel(server.grpc_target) as channel:
            runs = alerts_pb2_grpc.RunsStub(channel).ListRuns(
                alerts_pb2.ListRunsRequest(include_finished=True), timeout=10).runs
        states = {r.run_id: r.state for r in runs}
        assert states == {run_id: common_pb2.RUN_STATE_FAILED,
                          second.run_id: common_pb2.RUN_STATE_COMPLETED}
    assert not sender.spool_path.exists()
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == []


def test_a_live_senders_spool_is_left_alone(tmp_path: Path) -> None:
    config = _config(tmp_path)
    target = f"127.0.0.1:{free_port()}"  # nothing listens: both spool
    first = Sender(target, "shared-name", config, tmp_path / "spool", sender_id="rank0-aaaa")
    first.start()
    first.submit([("loss", (), 0, 1.0, time.time())])
    _wait_until(lambda: first.spool_bytes > 0)
    second = Sender(target, "shared-name", config, tmp_path / "spool", sender_id="rank0-bbbb")
    second.start()
    second.submit([("loss", (), 0, 2.0, time.time())])
    _wait_until(lambda: second.spool_bytes > 0)
    assert second.left_behind == []
    first.close(None, timeout=0)
    second.close(None, timeout=0)
