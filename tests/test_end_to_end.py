"""The thinnest whole path, real at every hop: a plain PyTorch loop with the agent →
gRPC on loopback → the server's SQLite file → Prometheus text scraped over HTTP."""

from __future__ import annotations

import sqlite3
import time
import urllib.request
from pathlib import Path

import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from raresignal.agent import Monitor, MonitorConfig
from raresignal.server.serving.app import ServerConfig, start_in_thread


def _scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(scraped: dict, name: str, run: str) -> float | None:
    for (metric, labels), value in scraped.items():
        if metric == name and ("run", run) in labels:
            return value
    return None


def test_loss_and_grad_norm_travel_from_the_loop_to_prometheus(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = torch.randn(32, 8), torch.randint(0, 3, (32,))
    db = tmp_path / "raresignal.db"
    sent: list[tuple[float, float]] = []

    with start_in_thread(ServerConfig(db_path=str(db), host="127.0.0.1", grpc_port=0,
                                      metrics_port=0, health_port=0)) as server:
        monitor = Monitor(model, optimizer, server=server.grpc_target, run_name="e2e",
                          config=MonitorConfig(report_interval_seconds=0.1))
        for _ in range(5):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs), targets)
            loss.backward()
            grad_norm = torch.linalg.vector_norm(
                torch.cat([p.grad.flatten() for p in model.parameters()])).item()
            monitor.step(loss=loss, batch=(inputs, targets))
            sent.append((loss.item(), grad_norm))
            optimizer.step()
        monitor.close()

        deadline = time.monotonic() + 10
        while True:
            scraped = _scrape(server.metrics_url)
            if _value(scraped, "raresignal_step", "e2e") == 4 or time.monotonic() > deadline:
                break
            time.sleep(0.1)

    last_loss, last_grad_norm = sent[-1]
    assert _value(scraped, "raresignal_loss", "e2e") == last_loss
    assert abs(_value(scraped, "raresignal_grad_norm", "e2e") - last_grad_norm) <= (
        1e-5 * last_grad_norm  # float32 summation order differs between the two norms
    )

    # The same values are in the SQLite file the server wrote.
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("select name from sqlite_master")}
        assert tables, "the server wrote no tables"
        dump = "\n".join(conn.iterdump())
    assert repr(last_loss) in dump or f"{last_loss!r}"[:12] in dump
