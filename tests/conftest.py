"""Fixtures every test folder may use; a folder's own conftest may override them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from raresignal.server.serving.app import ServerConfig, ServerHandle, start_in_thread

# Property tests are deterministic by default (the same examples on every run, no example
# database), so CI fails only on a change, never on a draw; RARESIGNAL_HYPOTHESIS_PROFILE=deep
# searches far more, randomly, for a local hunt. Tests that set max_examples keep theirs;
# every other setting comes from the profile.
settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True,
                          database=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("RARESIGNAL_HYPOTHESIS_PROFILE", "ci"))


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
