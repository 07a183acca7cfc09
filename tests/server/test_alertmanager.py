"""Alerts reach a real Alertmanager through its v2 API, and resolve there."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from ports import free_port
from server_support import Client, batch, config, find, sample, scrape, wait_for

from raresignal.protos.v1 import common_pb2
from raresignal.server.serving.app import start_in_thread

BINARY = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
pytestmark = [
    pytest.mark.external,
    pytest.mark.skipif(BINARY is None, reason="Alertmanager is not installed (Debian package "
                                              "prometheus-alertmanager; `make tools`)"),
]

CONFIG = """
route:
  receiver: "null"
  group_wait: 0s
  group_interval: 1s
receivers:
  - name: "null"
"""


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    config_file = tmp_path / "alertmanager.yml"
    config_file.write_text(CONFIG)
    url = f"http://127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [BINARY, f"--config.file={config_file}", f"--storage.path={tmp_path / 'am-data'}",
         f"--web.listen-address={url.removeprefix('http://')}", "--cluster.listen-address="],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/-/ready", timeout=1)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("alertmanager did not start: "
                                       + process.stderr.read().decode()[-2000:]) from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def _active_alerts(url: str) -> list[dict]:
    query = "?active=true&silenced=false&inhibited=false"
    return json.loads(urllib.request.urlopen(url + "/api/v2/alerts" + query, timeout=5).read())


def test_alert_is_received_and_resolved_by_alertmanager(tmp_path: Path,
                                                        alertmanager: str) -> None:
    # No periodic re-post during the test, so exactly two POSTs are made: firing, resolved.
    settings = config(tmp_path, alertmanager_url=alertmanager,
                      alertmanager_resend_seconds=3600.0)
    with start_in_thread(settings) as server:
        client = Client(server.grpc_target)
        run_id = client.open_run("am-run").run_id
        client.report([batch(run_id, 1, [sample("nonfinite_values", 7, 3.0)])])

        def received() -> list[dict]:
            return [a for a in _active_alerts(alertmanager)
                    if a["labels"].get("run_id") == run_id]

        (alert,) = wait_for(received)  # type: ignore[misc]
        assert alert["labels"] == {"alertname": "NonFiniteGradients", "run": "am-run",
                                   "run_id": run_id, "severity": "critical",
                                   "service": "raresignal"}
        assert "3 non-finite values" in alert["annotations"]["summary"]
        assert alert["annotations"]["step"] == "7"
        assert alert["generatorURL"] == server.metrics_url
        assert alert["status"]["state"] == "active"

        client.report([batch(run_id, 2, [sample("nonfinite_values", 8, 0.0)])])
        wait_for(lambda: not received())  # resolved: endsAt in the past, no longer active

        def sent() -> list[float]:
            return find(scrape(server.metrics_url),
                        "raresignal_alertmanager_notifications_total", outcome="sent")

        # Alertmanager applies a POST before it answers, and the notifier counts it only
        # once the answer is read: the resolve can be visible there before it is counted.
        wait_for(lambda: sent() >= [2.0])
        assert sent() == [2.0]
        client.close()


def test_unreachable_alertmanager_is_retried_then_counted_as_failed(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    with start_in_thread(config(tmp_path, alertmanager_url=url)) as server:
        client = Client(server.grpc_target)
        run_id = client.open_run("am-down").run_id
        client.report([batch(run_id, 1, [sample("nonfinite_values", 1, 1.0)])])
        # Ingest is not held up by the failing webhook.
        assert find(scrape(server.metrics_url), "raresignal_alert_firing", run="am-down")
        wait_for(lambda: find(scrape(server.metrics_url),
                              "raresignal_alertmanager_notifications_total",
                              outcome="retried") >= [2.0])
        client.close()


def test_a_relapse_within_the_hold_fires_the_same_alert_in_alertmanager(
        tmp_path: Path, alertmanager: str) -> None:
    with start_in_thread(config(tmp_path, alertmanager_url=alertmanager)) as server:
        client = Client(server.grpc_target)
        run_id = client.open_run("relapse").run_id

        def received() -> list[dict]:
            return [a for a in _active_alerts(alertmanager)
                    if a["labels"].get("run_id") == run_id]

        client.report([batch(run_id, 1, [sample("nonfinite_values", 1, 3.0)])])
        (first,) = wait_for(received)  # type: ignore[misc]
        client.report([batch(run_id, 2, [sample("nonfinite_values", 2, 0.0)])])
        wait_for(lambda: not received())
        client.report([batch(run_id, 3, [sample("nonfinite_values", 3, 2.0)])])
        (again,) = wait_for(received)  # type: ignore[misc]
        assert again["labels"] == first["labels"]
        assert again["startsAt"] == first["startsAt"]  # the episode's first firing
        assert again["annotations"]["step"] == "3"
        (listed,) = client.list_alerts(run_id=run_id)
        assert listed.state == common_pb2.ALERT_STATE_FIRING
        client.close()
