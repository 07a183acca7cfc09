"""A real agent run into ``raresignal server --db postgresql://...``, with the server killed
and started again mid-run: every step is stored once, with its value, and the sender's
sequences carry on across the restart from what PostgreSQL committed."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from postgres_cluster import Cluster
from server_support import Client, scrape, wait_for

from raresignal.server.process import ServerProcess

torch = pytest.importorskip("torch")

from toy_estimators import LossEstimator  # noqa: E402

from raresignal.agent import Monitor, MonitorConfig  # noqa: E402


def _stored(target: str, run_id: str) -> dict[int, float]:
    client = Client(target)
    try:
        points = client.series(run_id, "loss")
    finally:
        client.close()
    assert len(points) == len({step for step, _ in points}), "a step is stored twice"
    return dict(points)


@pytest.mark.slow
def test_a_run_is_stored_once_across_a_server_restart(
        postgres_cluster: Cluster, postgres_db: str, password_file: Path,
        tmp_path: Path) -> None:
    # The child server reads the password from the file RARESIGNAL_DB_PASSWORD_FILE names.
    server = ServerProcess(postgres_cluster.url(postgres_db), tmp_path)  # type: ignore[arg-type]
    server.start()
    try:
        monitor = Monitor(
            torch.nn.Linear(2, 2), None, server=server.grpc_target, run_name="pg-restart",
            estimators=[LossEstimator()],
            config=MonitorConfig(spool_dir=str(tmp_path / "spool"), batch_size=8,
                                 report_interval_seconds=0.05, network_timeout_seconds=2.0,
                                 reconnect_initial_seconds=0.05, reconnect_max_seconds=0.3,
                                 close_timeout_seconds=30.0, max_interval_factor=1))
        expected: dict[int, float] = {}

        def train(steps: range) -> None:
            for step in steps:
                loss = step / 4  # exactly representable, so stored values compare with ==
                monitor.step(loss=torch.tensor(loss, dtype=torch.float64))
                expected[step] = loss

        train(range(0, 60))
        run_id = wait_for(lambda: monitor.run_id)
        assert isinstance(run_id, str)
        wait_for(lambda: _stored(server.grpc_target, run_id) == expected, timeout=30)
        server.kill()  # SIGKILL, as a crashed pod: nothing flushed on the way out
        train(range(60, 120))
        sender = monitor.sender
        assert sender is not None
        wait_for(lambda: sender.send_failures > 0)  # the reports wait in the spool
        server.start()  # same database, same port
        train(range(120, 180))
        assert monitor.close() is True

        assert _stored(server.grpc_target, run_id) == expected
        batches = sender.next_sequence - 1
        assert batches >= 180 // 8
        # Every sequence was applied exactly once, the first server's and the second's.
        assert sender.applied_batches == batches
        with psycopg.connect(postgres_cluster.admin_conninfo(postgres_db)) as conn:
            rows = conn.execute("SELECT sender_id, last_sequence FROM sender_sequences "
                                "WHERE run_id = %s", (run_id,)).fetchall()
        assert rows == [(sender.sender_id, batches)]
        # The restarted server exports the run once the killed one's lease has expired.
        wait_for(lambda: any(name == "raresignal_loss" and ("run_id", run_id) in labels
                             for name, labels in scrape(server.metrics_url)), timeout=60)
    finally:
        server.stop()
