"""The real server for the runtime tests: in a subprocess (so it can be killed) or read
back over its Runs API."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from raresignal.protos.v1 import alerts_pb2, alerts_pb2_grpc


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stored_series(target: str, run_id: str, metric: str = "loss",
                  token: str | None = None) -> dict[int, float]:
    """step -> value of one unlabelled series, read back with Runs.GetSeries."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(target) as channel:
        response = alerts_pb2_grpc.RunsStub(channel).GetSeries(
            alerts_pb2.GetSeriesRequest(run_id=run_id, metric=metric), timeout=10,
            metadata=metadata)
    steps = [s.step for s in response.samples]
    assert len(steps) == len(set(steps)), "a step is stored twice"
    return {s.step: s.value for s in response.samples}


class ServerProcess:
    """``raresignal server`` as a child process on a fixed gRPC port and SQLite file."""

    def __init__(self, db: Path, grpc_port: int, workdir: Path) -> None:
        self.db = db
        self.grpc_port = grpc_port
        self.ready_file = workdir / "ready.json"
        self.log_file = workdir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 60.0) -> dict[str, str]:
        self.ready_file.unlink(missing_ok=True)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "raresignal.server.cli", "server", "--db",
                 str(self.db), "--host", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                 "--metrics-port", "0", "--health-port", "0", "--ready-file",
                 str(self.ready_file)],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: "
                                   f"{self.log_file.read_text()[-2000:]}")
            if self.ready_file.exists() and self.ready_file.stat().st_size:
                try:
                    return json.loads(self.ready_file.read_text())
                except json.JSONDecodeError:
                    pass  # still being written
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"server not ready in {timeout} s: {self.log_file.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, no flush — as a crashed or evicted pod."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
