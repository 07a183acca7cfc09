"""`raresignal spool push` delivers a spool that a training process left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import torch
from ports import free_port
from toy_estimators import LossEstimator

from raresignal.agent import Monitor, MonitorConfig
from raresignal.protos.v1 import alerts_pb2, alerts_pb2_grpc, common_pb2
from raresignal.server.process import ServerProcess


def _push(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "raresignal.client.cli", "spool", "push",
                           *argv], capture_output=True, text=True, timeout=120)


def test_spool_push_delivers_a_left_behind_spool_and_closes_its_run(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    server = ServerProcess(tmp_path / "rs.db", tmp_path, grpc_port=free_port())
    monitor = Monitor(torch.nn.Linear(2, 2), None, server=server.grpc_target,
                      run_name="pushed", estimators=[LossEstimator()],
                      config=MonitorConfig(spool_dir=str(spool_dir),
                                           report_interval_seconds=0.05,
                                           network_timeout_seconds=1.0,
                                           max_interval_factor=1))
    for step in range(12):
        monitor.step(loss=torch.tensor(step / 4, dtype=torch.float64))
    monitor._closed = True  # the process ends without closing: the spool stays behind
    assert monitor.sender is not None and monitor.sender.close(None, timeout=0) is False

    with server.start():
        pushed = _push("--spool-dir", str(spool_dir), "--server", server.grpc_target)
        assert pushed.returncode == 0, pushed.stderr
        assert "delivered" in pushed.stdout and "closed as failed" in pushed.stdout
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = alerts_pb2_grpc.RunsStub(channel)
            (run,) = stub.ListRuns(alerts_pb2.ListRunsRequest(include_finished=True),
                                   timeout=10).runs
            samples = stub.GetSeries(alerts_pb2.GetSeriesRequest(run_id=run.run_id,
                                                                 metric="loss"),
                                     timeout=10).samples
        assert (run.run_name, run.state) == ("pushed", common_pb2.RUN_STATE_FAILED)
        assert {s.step: s.value for s in samples} == {step: step / 4 for step in range(12)}
        again = _push("--spool-dir", str(spool_dir), "--server", server.grpc_target)
        assert again.returncode == 0 and "no left-behind spools" in again.stdout
    assert not list(spool_dir.glob("*.spool"))


def test_spool_push_keeps_a_spool_it_cannot_deliver(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    server = ServerProcess(tmp_path / "rs.db", tmp_path, grpc_port=free_port())
    monitor = Monitor(torch.nn.Linear(2, 2), None, server=server.grpc_target,
                      run_name="unreachable", estimators=[LossEstimator()],
                      config=MonitorConfig(spool_dir=str(spool_dir),
                                           report_interval_seconds=0.05,
                                           network_timeout_seconds=1.0,
                                           max_interval_factor=1))
    monitor.step(loss=torch.tensor(1.0))
    monitor._closed = True
    assert monitor.sender is not None and monitor.sender.close(None, timeout=0) is False
    failed = _push("--spool-dir", str(spool_dir), "--server", server.grpc_target,
                   "--timeout", "1")
    assert failed.returncode == 1 and "not delivered" in failed.stdout
    assert len(list(spool_dir.glob("*.spool"))) == 1
