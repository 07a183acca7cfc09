"""Faults injected around a real training process and a real server: the trainer killed
with SIGKILL at random steps and resumed from its last checkpoint, the spool it left
corrupted, the server killed mid-run, the spool folder unusable or read-only, the disk
full. Afterwards every measured step is stored exactly once. ``benchmarks/faults.py``
draws the same faults at random by the dozen and counts them."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from ports import free_port
from runtime_server import stored_series
from runtime_toys import LossEstimator

from raresignal.agent import Monitor, MonitorConfig
from raresignal.protos.v1 import alerts_pb2, alerts_pb2_grpc, common_pb2
from raresignal.server.process import ServerProcess
from raresignal.server.serving.app import ServerConfig, ServerHandle, start_in_thread

TRAINER = Path(__file__).with_name("fault_trainer.py")
STEPS = 60


def _server(tmp_path: Path) -> ServerHandle:
    return start_in_thread(ServerConfig(db_path=str(tmp_path / "rs.db"), grpc_port=0,
                                        metrics_port=0, health_port=0))


def _trainer_command(server: ServerHandle | ServerProcess, tmp_path: Path,
                     *options: str) -> list[str]:
    return [sys.executable, str(TRAINER), "--server", server.grpc_target,
            "--spool-dir", str(tmp_path / "spool"), "--checkpoint", str(tmp_path / "ckpt.pt"),
            "--steps", str(STEPS), *options]


def _train(server: ServerHandle | ServerProcess, tmp_path: Path, die_at: int = -1,
           *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_trainer_command(server, tmp_path, "--die-at", str(die_at),
                                           *options),
                          capture_output=True, text=True, timeout=120)


def _runs(server: ServerHandle | ServerProcess) -> list[common_pb2.RunInfo]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        return list(alerts_pb2_grpc.RunsStub(channel).ListRuns(
            alerts_pb2.ListRunsRequest(include_finished=True), timeout=10).runs)


def test_a_trainer_killed_at_random_steps_loses_and_doubles_nothing(tmp_path: Path) -> None:
    deaths = sorted(random.Random(7).sample(range(6, STEPS - 1), 3))
    with _server(tmp_path) as server:
        for die_at in deaths:
            killed = _train(server, tmp_path, die_at)
            assert killed.returncode == -9, killed.stderr
        finished = _train(server, tmp_path)
        assert finished.returncode == 0 and "delivered" in finished.stdout, finished.stderr
        (run,) = _runs(server)
        # Steps measured after the last checkpoint were measured again by the resumed
        # process, with the same value: each step holds one value, none is missing.
        assert stored_series(server.grpc_target, run.run_id) == {
            step: step / 4 for step in range(STEPS)}
        assert run.state == common_pb2.RUN_STATE_COMPLETED
    assert not any((tmp_path / "spool").glob("*.spool"))


def _monitor(server: ServerHandle, spool_dir: Path, name: str) -> Monitor:
    return Monitor(torch.nn.Linear(2, 2), None, server=server.grpc_target, run_name=name,
                   estimators=[LossEstimator()],
                   config=MonitorConfig(spool_dir=str(spool_dir), report_interval_seconds=0.05,
                                        network_timeout_seconds=2.0,
                                        close_timeout_seconds=30.0, max_interval_factor=1))


def test_an_unusable_spool_folder_still_delivers_every_step(tmp_path: Path) -> None:
    blocker = tmp_path / "spool"
    blocker.write_text("a file where the spool folder should be")
    with _server(tmp_path) as server:
        monitor = _monitor(server, blocker / "inside", "no-spool-folder")
        for step in range(30):
            monitor.step(loss=torch.tensor(step / 4, dtype=torch.float64))
        assert monitor.close() is True
        assert monitor.run_id is not None
        assert stored_series(server.grpc_target, monitor.run_id) == {
            step: step / 4 for step in range(30)}


def test_a_full_disk_still_delivers_every_step(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync
    full_after = time.monotonic() + 0.2

    def fsync(fd: int) -> None:
        if time.monotonic() > full_after:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with _server(tmp_path) as server:
        monitor = _monitor(server, tmp_path / "spool", "disk-full")
        for step in range(40):
            monitor.step(loss=torch.tensor(step / 4, dtype=torch.float64))
            time.sleep(0.01)
        assert monitor.close() is True
        assert monitor.run_id is not None
        assert stored_series(server.grpc_target, monitor.run_id) == {
            step: step / 4 for step in range(40)}


def test_a_corrupted_spool_and_a_server_killed_mid_run_lose_and_double_nothing(
        tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "rs.db", tmp_path, grpc_port=free_port())
    server.start()
    try:
        killed = _train(server, tmp_path, 25, "--step-seconds", "0.02")
        assert killed.returncode == -9, killed.stderr
        # What a torn write and a stray block leave: junk before and after the records.
        (spool,) = (tmp_path / "spool").glob("*.spool")
        spool.write_bytes(b"\x00junk\xff" * 7 + spool.read_bytes() + b"\xde\xad\xbe")
        cue = tmp_path / "server-restarted"
        trainer = subprocess.Popen(
            _trainer_command(server, tmp_path, "--hold-at", "40", "--hold-file", str(cue)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # Killed while the trainer is mid-run: it waits at step 40, its stream open,
            # until the server is back; what it measured up to there is delivered first.
            run_id = _runs(server)[0].run_id
            deadline = time.monotonic() + 60
            while len(stored_series(server.grpc_target, run_id)) < 40:
                assert trainer.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            server.kill()
            server.start()
            cue.touch()
            stdout, stderr = trainer.communicate(timeout=120)
        finally:
            trainer.kill()
        assert trainer.returncode == 0 and "delivered" in stdout, stderr
        (run,) = _runs(server)
        assert stored_series(server.grpc_target, run.run_id) == {
            step: step / 4 for step in range(STEPS)}
        assert run.state == common_pb2.RUN_STATE_COMPLETED
    finally:
        server.stop()


def test_a_read_only_spool_folder_still_delivers_every_step(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    with _server(tmp_path) as server:
        finished = _train(server, tmp_path, -1, "--read-only-spool")
        assert finished.returncode == 0 and "delivered" in finished.stdout, finished.stderr
        assert "fault: read-only-spool" in finished.stdout
        (run,) = _runs(server)
        assert stored_series(server.grpc_target, run.run_id) == {
            step: step / 4 for step in range(STEPS)}
    assert not any((tmp_path / "spool").iterdir())
