"""Runs the raresignal server as a background process for the demo.

The demo starts the server exactly as an operator would, through its command line, so
what the demo shows is the real service: its own process, its own SQLite file, its own
/metrics endpoint. Ports are picked by the server (0) and read back from its ready file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT_SECONDS = 60.0


@dataclass
class ServerProcess:
    """A running server: where to reach it and how to stop it."""

    process: subprocess.Popen[bytes]
    grpc_target: str
    metrics_url: str
    log_path: Path

    def stop(self) -> None:
        """Asks the server to shut down (SIGTERM) and waits; kills it if it hangs."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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


def start_server(db_path: Path, work_dir: Path, host: str = "127.0.0.1") -> ServerProcess:
    """Starts ``raresignal.server.cli server`` on free ports and waits until it listens."""
    ready_file = work_dir / "server-ready.json"
    ready_file.unlink(missing_ok=True)
    log_path = work_dir / "server.log"
    command = [
        sys.executable, "-m", "raresignal.server.cli", "server",
        "--db", str(db_path), "--host", host,
        "--grpc-port", "0", "--metrics-port", "0", "--health-port", "0",
        "--ready-file", str(ready_file),
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while (ready := _read_ready(ready_file)) is None:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}; "
                               f"its log:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"the server did not become ready in {READY_TIMEOUT_SECONDS} s; "
                               f"its log:\n{log_path.read_text()}")
        time.sleep(0.1)
    metrics = _address(ready["metrics"], host)
    return ServerProcess(process, _address(ready["grpc"], host), f"http://{metrics}/metrics",
                         log_path)
