"""Fixtures of the deployment tests: the Prometheus tools, skipped only where absent."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_support import PrometheusServer


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian package `prometheus`, `make tools`)")
    return binary


@pytest.fixture(scope="session")
def promtool_binary() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`, `make tools`)")
    return binary


@pytest.fixture
def start_prometheus(prometheus_binary: str, tmp_path: Path
                     ) -> Iterator[Callable[[dict[str, Any]], PrometheusServer]]:
    """Starts Prometheus with a given config; stops every one started when the test ends."""
    started: list[PrometheusServer] = []

    def start(config: dict[str, Any]) -> PrometheusServer:
        work_dir = tmp_path / f"prometheus-{len(started)}"
        work_dir.mkdir()
        server = PrometheusServer(prometheus_binary, work_dir, config)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
