"""Shared fixtures of the integration tests: a real server on loopback ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[object]:
    """The real raresignal server (gRPC, SQLite file, /metrics) on free loopback ports."""
    from raresignal.server.serving.app import ServerConfig, start_in_thread

    handle = start_in_thread(ServerConfig(db_path=str(tmp_path / "raresignal.db"),
                                          host="127.0.0.1", grpc_port=0, metrics_port=0,
                                          health_port=0))
    try:
        yield handle
    finally:
        handle.stop()
