"""The server as a child process, started through its command line.

For whatever needs the real service in its own process — the demo, tests that kill and
restart it — started exactly as an operator would start it. The server writes its
addresses to a ready file once it listens, so ports may be picked by the server (0).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

READY_TIMEOUT_SECONDS = 60.0


def _address(value: object, host: str) -> str:
    """``host:port`` from a ready-file entry given as a port, ``host:port`` or a URL."""
    if isinstance(value, int):
        return f"{host}:{value}"
    text = str(value)
    if "://" in text:
        text = text.split("://", 1)[1].split("/", 1)[0]
    return text if ":" in text else f"{host}:{text}"


def _read_ready(path: Path) -> dict[str, object] | None:
    """The ready file's content, or None while it is absent or half written."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class ServerProcess:
    """``raresignal server`` on a SQLite file, in a child process that can be stopped
    gracefully, killed like a crashed pod, and started again on the same file and port."""

    def __init__(self, db_path: Path, work_dir: Path, host: str = "127.0.0.1",
                 grpc_port: int = 0) -> None:
        self.db_path = db_path
        self.host = host
        self.grpc_port = grpc_port
        self.ready_file = work_dir / "server-ready.json"
        self.log_path = work_dir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.grpc_target = ""
        self.metrics_url = ""

    def start(self, timeout: float = READY_TIMEOUT_SECONDS) -> ServerProcess:
        """Starts the server and waits until it listens; raises with its log if it fails."""
        self.ready_file.unlink(missing_ok=True)
        command = [
            sys.executable, "-m", "raresignal.server.cli", "server",
            "--db", str(self.db_path), "--host", self.host,
            "--grpc-port", str(self.grpc_port), "--metrics-port", "0", "--health-port", "0",
            "--ready-file", str(self.ready_file),
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while (ready := _read_ready(self.ready_file)) is None:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode}; "
                                   f"its log:\n{self.log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"the server did not become ready in {timeout} s; its "
                                   f"log:\n{self.log_path.read_text()[-4000:]}")
            time.sleep(0.05)
        self.grpc_target = _address(ready["grpc"], self.host)
        self.metrics_url = f"http://{_address(ready['metrics'], self.host)}/metrics"
        self.grpc_port = int(self.grpc_target.rsplit(":", 1)[1])  # a restart keeps the port
        return self

    def stop(self) -> None:
        """Asks the server to shut down (SIGTERM: it flushes) and waits; kills it if it hangs."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, no flush — as a crashed or evicted pod."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
