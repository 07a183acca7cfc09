"""Fixtures for the server tests: a real server on loopback and a plain gRPC client."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

# A throwaway PostgreSQL cluster per session (skipped where PostgreSQL is not installed).
from postgres_cluster import password_file, postgres_cluster, postgres_db  # noqa: F401
from server_support import Client, config

from raresignal.server.serving.app import ServerHandle, start_in_thread

# Property tests are deterministic by default (the same examples on every run, no example
# database), so CI fails only on a change, never on a draw; RARESIGNAL_HYPOTHESIS_PROFILE=deep
# searches far more, randomly, for a local hunt. Tests that set max_examples keep theirs.
settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True,
                          database=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("RARESIGNAL_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerHandle]:
    with start_in_thread(config(tmp_path)) as handle:
        yield handle


@pytest.fixture
def client(server: ServerHandle) -> Iterator[Client]:
    c = Client(server.grpc_target)
    yield c
    c.close()
