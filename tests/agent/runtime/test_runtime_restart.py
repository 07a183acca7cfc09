"""The server is killed mid-run and restarted on the same SQLite file: training never
waits on it, and afterwards the server holds every report exactly once."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import torch
from ports import free_port
from runtime_server import stored_series
from runtime_toys import (
    GradNormEstimator,
    LossEstimator,
    classification_data,
    small_classifier,
)
from torch import nn

from raresignal.agent import Monitor, MonitorConfig
from raresignal.server.process import ServerProcess

NETWORK_TIMEOUT = 2.0


def test_killed_and_restarted_server_ends_with_every_report_exactly_once(
        tmp_path: Path) -> None:
    torch.set_num_threads(1)
    server = ServerProcess(tmp_path / "rs.db", tmp_path, grpc_port=free_port())
    server.start()
    try:
        model = small_classifier()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        inputs, targets = classification_data()
        monitor = Monitor(
            model, optimizer, server=server.grpc_target, run_name="restart",
            estimators=[LossEstimator(), GradNormEstimator()],
            config=MonitorConfig(spool_dir=str(tmp_path / "spool"),
                                 report_interval_seconds=0.05,
                                 network_timeout_seconds=NETWORK_TIMEOUT,
                                 reconnect_initial_seconds=0.05, reconnect_max_seconds=0.5,
                                 close_timeout_seconds=30.0,
                                 # Every step reported, whatever the budget would say: this
                                 # test is about delivery.
                                 max_interval_factor=1))
        losses: dict[int, float] = {}
        longest_step_while_down = 0.0
        for step in range(150):
            if step == 50:
                server.kill()
            if step == 100:
                server.start()
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs), targets)
            loss.backward()
            started = time.perf_counter()
            monitor.step(loss=loss, batch=(inputs, targets))
            if 50 <= step < 100:
                longest_step_while_down = max(longest_step_while_down,
                                              time.perf_counter() - started)
            optimizer.step()
            losses[step] = loss.item()
            time.sleep(0.01)  # batches form and leave throughout, including mid-kill
        sender = monitor.sender
        assert sender is not None
        assert sender.send_failures > 0, "the kill went unnoticed: the test proves nothing"
        assert monitor.close() is True
        run_id = monitor.run_id
        assert run_id is not None

        # Every step's loss is stored, with the exact float the loop saw.
        assert stored_series(server.grpc_target, run_id) == losses
        assert set(stored_series(server.grpc_target, run_id, "grad_norm")) == set(range(150))
        # Exactly once: each sequence number 1..N was APPLIED once (a batch applied just
        # before the kill and replayed after comes back DUPLICATE), and the server's own
        # record of the sender stops at N.
        batches = sender.next_sequence - 1
        assert sender.applied_batches == batches
        server.stop()
        with sqlite3.connect(tmp_path / "rs.db") as db:
            (last_sequence,) = db.execute(
                "SELECT last_sequence FROM sender_sequences WHERE run_id = ? AND "
                "sender_id = ?", (run_id, sender.sender_id)).fetchone()
        assert last_sequence == batches
    finally:
        server.stop()

    # step() never waited on the dead server (loose bound: the network timeout).
    assert longest_step_while_down < NETWORK_TIMEOUT
