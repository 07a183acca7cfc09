"""Fixtures every test folder may use; a folder's own conftest may override them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from raresignal.server.serving.app import ServerConfig, ServerHandle, start_in_thread


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerHandle]:
    """The real raresignal server (gRPC, SQLite file, /metrics) on free loopback ports."""
    handle = start_in_thread(ServerConfig(db_path=str(tmp_path / "raresignal.db"),
                                          host="127.0.0.1", grpc_port=0, metrics_port=0,
                                          health_port=0))
    try:
        yield handle
    finally:
        handle.stop()
