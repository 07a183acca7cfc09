"""Fixtures for the server tests: a real server on loopback and a plain gRPC client."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# A throwaway PostgreSQL cluster per session (skipped where PostgreSQL is not installed).
from postgres_cluster import password_file, postgres_cluster, postgres_db  # noqa: F401
from server_support import Client, config

from raresignal.server.serving.app import ServerHandle, start_in_thread


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerHandle]:
    with start_in_thread(config(tmp_path)) as handle:
        yield handle


@pytest.fixture
def client(server: ServerHandle) -> Iterator[Client]:
    c = Client(server.grpc_target)
    yield c
    c.close()
