"""A replica that takes a run over posts to Alertmanager what the run's previous owner may
have stored but never posted: the firing alerts at once, and the recent resolutions
again. Two servers on one real PostgreSQL database; a small HTTP server on loopback stands
in for Alertmanager and keeps every alert posted to it."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from postgres_cluster import Cluster
from rule_snippets import LOSS_HIGH_RULES
from server_support import Client, batch, config, sample, wait_for

from raresignal.protos.v1 import common_pb2
from raresignal.server.serving.app import start_in_thread

pytest.importorskip("psycopg_pool")


class PostedAlerts:
    """Every alert POSTed to the fake Alertmanager, as its JSON."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.alerts: list[dict[str, Any]] = []

    def of_run(self, run_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [a for a in self.alerts if a["labels"]["run_id"] == run_id]


@pytest.fixture
def alertmanager() -> Iterator[tuple[str, PostedAlerts]]:
    posted = PostedAlerts()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with posted.lock:
                posted.alerts.extend(body)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", posted
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def _states(conninfo: str, run_id: str) -> list[int]:
    with psycopg.connect(conninfo) as conn:
        return [row[0] for row in conn.execute(
            "SELECT h.state FROM alert_history h JOIN alerts a USING (alert_id) "
            "WHERE a.run_id = %s ORDER BY h.at", (run_id,))]


def test_a_takeover_posts_what_the_previous_owner_never_did(
        postgres_cluster: Cluster, postgres_db: str, password_file: Path, tmp_path: Path,
        alertmanager: tuple[str, PostedAlerts]) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(LOSS_HIGH_RULES)
    settings = dict(db_path=postgres_cluster.url(postgres_db), rules_path=str(rules),
                    # Resolutions of the last 2 x (TTL + heartbeat) are posted again: a TTL
                    # that outlasts a slow start of "b" ("a" gives its leases up anyway).
                    lease_ttl_seconds=15.0, lease_heartbeat_seconds=0.5,
                    # No periodic re-post within the test: only a takeover posts.
                    alertmanager_resend_seconds=3600.0)
    conninfo = postgres_cluster.admin_conninfo(postgres_db)
    # "a" stores every transition but posts none, as an owner that dies after each commit.
    first = start_in_thread(config(tmp_path, replica_id="a", **settings))
    try:
        client = Client(first.grpc_target)
        resolved = client.open_run("resolved").run_id
        firing = client.open_run("firing").run_id
        client.report([batch(resolved, 1, [sample("loss", 1, 500.0)]),
                       batch(firing, 1, [sample("loss", 1, 500.0)])])
        firing_state, resolved_state = common_pb2.ALERT_STATE_FIRING, \
            common_pb2.ALERT_STATE_RESOLVED
        wait_for(lambda: _states(conninfo, resolved) == [firing_state]
                 and _states(conninfo, firing) == [firing_state])
        client.report([batch(resolved, 2, [sample("loss", 2, 1.0)])])
        wait_for(lambda: _states(conninfo, resolved) == [firing_state, resolved_state])
        client.close()
    finally:
        first.stop()  # gives its leases up

    url, posted = alertmanager
    second = start_in_thread(config(tmp_path, replica_id="b", alertmanager_url=url,
                                    **settings))
    try:
        wait_for(lambda: posted.of_run(resolved) and posted.of_run(firing))
        (was_resolved,) = posted.of_run(resolved)
        assert was_resolved["labels"]["alertname"] == "LossHigh"
        assert "endsAt" in was_resolved  # posted as resolved
        (still_firing,) = posted.of_run(firing)
        assert "endsAt" not in still_firing
    finally:
        second.stop()
