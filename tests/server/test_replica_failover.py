"""Two replicas of ``raresignal server`` on one PostgreSQL database, eight agents reaching
them by one target, and one replica killed (SIGKILL) while alerts are firing: every
sample is stored once, every alert transition is written once (none lost, none doubled),
and the survivor owns and exports every run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from postgres_cluster import Cluster
from rule_snippets import LOSS_HIGH_RULES
from server_support import scrape, wait_for

from raresignal.agent.config import MonitorConfig
from raresignal.agent.sender import Sender
from raresignal.protos.v1 import common_pb2
from raresignal.server.process import ServerProcess

pytest.importorskip("psycopg_pool")

FIRING = common_pb2.ALERT_STATE_FIRING
RESOLVED = common_pb2.ALERT_STATE_RESOLVED
RUNS = 8
STEPS = 120
KILL_AT = 30  # the first alert of every run fires at step 20 and is still firing here
HIGH = (range(20, 40), range(80, 100))  # the steps whose loss crosses the threshold



def loss(step: int) -> float:
    return 500.0 if any(step in window for window in HIGH) else step / 4


@pytest.fixture
def replicas(postgres_cluster: Cluster, postgres_db: str, password_file: Path,
             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[ServerProcess]]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(LOSS_HIGH_RULES)
    # The children read their settings from the environment: short leases, so the
    # takeover happens within the test's deadlines on two busy cores.
    for name, value in (("RULES", str(rules)), ("LEASE_TTL", "3"),
                        ("LEASE_HEARTBEAT", "0.5"), ("CLOCK_INTERVAL", "0.2")):
        monkeypatch.setenv("RARESIGNAL_" + name, value)
    servers = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        servers.append(ServerProcess(postgres_cluster.url(postgres_db),  # type: ignore[arg-type]
                                     tmp_path / name))
    try:
        for name, server in zip(("a", "b"), servers, strict=True):
            monkeypatch.setenv("RARESIGNAL_REPLICA_ID", name)  # read when the child starts
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def _query(cluster: Cluster, db: str, sql: str, *params: object) -> list[tuple]:
    with psycopg.connect(cluster.admin_conninfo(db)) as conn:
        return conn.execute(sql, params).fetchall()


def _owners(cluster: Cluster, db: str) -> dict[str, str]:
    return dict(_query(cluster, db, "SELECT run_id, owner FROM run_leases "
                                    "WHERE expires_at > clock_timestamp()"))


def _transitions(cluster: Cluster, db: str, run_ids: list[str]) -> int:
    return _query(cluster, db, "SELECT count(*) FROM alert_history h JOIN alerts a "
                               "USING (alert_id) WHERE a.run_id = ANY(%s)", run_ids)[0][0]


def _exported(metrics_url: str) -> list[str]:
    """The run ids of the ``raresignal_loss`` series a replica's /metrics shows."""
    return sorted(dict(labels)["run_id"] for name, labels in scrape(metrics_url)
                  if name == "raresignal_loss")


@pytest.mark.slow
def test_a_replica_killed_mid_run_loses_and_doubles_nothing(
        replicas: list[ServerProcess], postgres_cluster: Cluster, postgres_db: str,
        tmp_path: Path) -> None:
    ports = [server.grpc_port for server in replicas]
    config = MonitorConfig(batch_size=4, report_interval_seconds=0.05,
                           network_timeout_seconds=2.0, reconnect_initial_seconds=0.05,
                           reconnect_max_seconds=0.3, close_timeout_seconds=60.0)
    senders = []
    for index in range(RUNS):
        # One name for the service: both addresses, in an order that sends half of the
        # agents to each replica first.
        first, second = ports if index % 2 == 0 else ports[::-1]
        target = f"ipv4:127.0.0.1:{first},127.0.0.1:{second}"
        sender = Sender(target, f"job-{index}", config, tmp_path / f"spool-{index}",
                        f"rank0-{index}")
        sender.start()
        senders.append(sender)

    def train(steps: range) -> None:
        for step in steps:
            for sender in senders:
                assert sender.submit([("loss", (), step, loss(step), 1.7e9 + step)])

    def firing() -> int:
        return _query(postgres_cluster, postgres_db,
                      "SELECT count(*) FROM alerts WHERE state = %s", FIRING)[0][0]

    train(range(KILL_AT))
    wait_for(lambda: firing() == RUNS, timeout=120)
    run_ids = [sender.run_id for sender in senders]
    assert all(run_ids)
    owners = _owners(postgres_cluster, postgres_db)
    assert set(owners) == set(run_ids)
    # The victim: the replica owning the most runs, so the kill hands runs over.
    names = {"a": replicas[0], "b": replicas[1]}
    victim_name = max(names, key=lambda name: list(owners.values()).count(name))
    victim = names[victim_name]
    survivor_name = "b" if victim_name == "a" else "a"
    survivor = names[survivor_name]
    victim_runs = [run for run, owner in owners.items() if owner == victim_name]
    assert victim_runs
    before = _transitions(postgres_cluster, postgres_db, victim_runs)

    # Scraping every replica, Prometheus sees each run's series once.
    wait_for(lambda: sorted(_exported(replicas[0].metrics_url)
                            + _exported(replicas[1].metrics_url)) == sorted(run_ids))

    victim.kill()
    killed_at = time.monotonic()
    train(range(KILL_AT, STEPS))
    taken_over: list[float] = []

    def all_transitions_written() -> bool:
        written = _transitions(postgres_cluster, postgres_db, run_ids)  # type: ignore[arg-type]
        if not taken_over and _transitions(postgres_cluster, postgres_db, victim_runs) > before:
            taken_over.append(time.monotonic() - killed_at)
        return written >= 4 * RUNS

    wait_for(all_transitions_written, timeout=180)
    print(f"takeover: the survivor wrote its first transition of the victim's runs "
          f"{taken_over[0]:.1f} s after the kill")
    assert _owners(postgres_cluster, postgres_db) == dict.fromkeys(run_ids, survivor_name)
    wait_for(lambda: _exported(survivor.metrics_url) == sorted(run_ids))  # type: ignore[arg-type]

    for sender in senders:
        assert sender.close("completed", timeout=60) is True

    # Every sample once: each run's loss at every step, no step twice.
    for sender in senders:
        rows = _query(postgres_cluster, postgres_db,
                      "SELECT step, value FROM samples JOIN series USING (series_id) "
                      "WHERE run_id = %s AND metric = 'loss' ORDER BY step", sender.run_id)
        assert rows == [(step, loss(step)) for step in range(STEPS)]
        # Each sequence applied once, by one replica or the other.
        assert sender.applied_batches == sender.next_sequence - 1
    # Every transition once: two episodes per run, each fired and resolved once, at the
    # steps the loss crossed the threshold, whoever owned the run then.
    for run_id in run_ids:
        history = _query(postgres_cluster, postgres_db,
                         "SELECT a.started_at, h.previous_state, h.state, h.step "
                         "FROM alert_history h JOIN alerts a USING (alert_id) "
                         "WHERE a.run_id = %s ORDER BY a.started_at, h.at, h.state", run_id)
        assert [row[1:] for row in history] == [
            (0, FIRING, 20), (FIRING, RESOLVED, 40), (0, FIRING, 80), (FIRING, RESOLVED, 100)]
        states = _query(postgres_cluster, postgres_db,
                        "SELECT state FROM alerts WHERE run_id = %s", run_id)
        assert states == [(RESOLVED,), (RESOLVED,)]
    # The closes are evaluated too, and nothing is left on the queue.
    wait_for(lambda: _query(postgres_cluster, postgres_db,
                            "SELECT count(*) FROM evaluation_queue") == [(0,)])
