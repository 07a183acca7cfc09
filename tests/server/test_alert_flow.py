"""A scripted metric series drives a rule through pending, firing and resolved, seen the
three ways alerts leave the server: ListAlerts, WatchAlerts and /metrics. The rules are
this file's own (the shipped thresholds follow the detection benchmark; the flow must not)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_support import Client, batch, config, find, sample, scrape, wait_for

from raresignal.client.cli import main as cli_main
from raresignal.protos.v1 import alerts_pb2, common_pb2
from raresignal.server.serving.app import ServerHandle, start_in_thread

PENDING = common_pb2.ALERT_STATE_PENDING
FIRING = common_pb2.ALERT_STATE_FIRING
RESOLVED = common_pb2.ALERT_STATE_RESOLVED

# A retention rule with a `for` of 2, so an alert is pending before it fires.
FLOW_RULES = """
rules:
  - alert: RareSignalRetentionLoss
    metric: probe_retention
    op: "<"
    threshold: 0.3
    resolve_threshold: 0.4
    for: 2
    severity: critical
    summary: "Probe {probe} of run {run}: retention {value:.3g} below {threshold:g}"
  - alert: NonFiniteGradients
    metric: nonfinite_values
    op: ">"
    threshold: 0
    severity: critical
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerHandle]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(FLOW_RULES)
    with start_in_thread(config(tmp_path, rules_path=str(rules))) as handle:
        yield handle


def retention(run_id: str, seq: int, value: float) -> object:
    return batch(run_id, seq, [sample("probe_retention", seq, value, probe="rare"),
                               sample("loss", seq, 1.0)])


def test_retention_loss_fires_and_resolves(server: ServerHandle, client: Client) -> None:
    run_id = client.open_run("flow").run_id
    other_id = client.open_run("bystander").run_id
    client.report([retention(run_id, 1, 0.9), retention(run_id, 2, 0.1)])
    (pending,) = client.list_alerts(run_id=run_id)
    assert (pending.rule, pending.state, dict(pending.labels)) == (
        "RareSignalRetentionLoss", PENDING, {"probe": "rare"})
    assert not find(scrape(server.metrics_url), "raresignal_alert_firing", run="flow")

    events: list[alerts_pb2.AlertEvent] = []
    watch = client.alerts.WatchAlerts(alerts_pb2.WatchAlertsRequest(
        filter=alerts_pb2.AlertFilter(run_id=run_id)))

    def collect() -> None:
        for event in watch:
            events.append(event)
            if len(events) == 3:
                watch.cancel()
                return

    watcher = threading.Thread(target=collect)
    watcher.start()
    wait_for(lambda: events)  # the snapshot: the pending alert, sent first
    client.report([batch(other_id, 1, [sample("probe_retention", 1, 0.0, probe="rare")])])
    client.report([retention(run_id, 3, 0.1)])

    (firing,) = client.list_alerts(run_id=run_id)
    assert (firing.state, firing.alert_id, firing.value, firing.threshold, firing.step) == (
        FIRING, pending.alert_id, 0.1, 0.3, 3)
    assert "retention 0.1 below 0.3" in firing.summary
    scraped = scrape(server.metrics_url)
    assert find(scraped, "raresignal_alert_firing", run="flow", run_id=run_id,
                alert="RareSignalRetentionLoss", severity="critical", probe="rare") == [1.0]
    assert find(scraped, "raresignal_alerts_fired_total",
                alert="RareSignalRetentionLoss") == [1.0]
    assert find(scraped, "raresignal_probe_retention", run="flow", probe="rare") == [0.1]

    # 0.35 is above the fire threshold but below the resolve threshold: still firing.
    client.report([retention(run_id, 4, 0.35)])
    assert [a.state for a in client.list_alerts(run_id=run_id)] == [FIRING]
    client.report([retention(run_id, 5, 0.8)])
    (resolved,) = client.list_alerts(run_id=run_id)
    assert (resolved.state, resolved.alert_id, resolved.step) == (RESOLVED, pending.alert_id,
                                                                  5)
    assert resolved.resolved_at >= resolved.fired_at > 0
    assert not find(scrape(server.metrics_url), "raresignal_alert_firing", run="flow")

    watcher.join(10)
    assert [(e.alert.state, e.previous_state) for e in events] == [
        (PENDING, common_pb2.ALERT_STATE_UNSPECIFIED), (FIRING, PENDING), (RESOLVED, FIRING)]
    assert {e.alert.run_id for e in events} == {run_id}  # the filter held


def test_list_alerts_filters_by_state_and_rule(server: ServerHandle, client: Client) -> None:
    run_id = client.open_run("filters").run_id
    client.report([batch(run_id, 1, [sample("nonfinite_values", 1, 3.0),
                                     sample("probe_retention", 1, 0.1, probe="a")])])
    firing = client.list_alerts(states=[FIRING])
    assert [a.rule for a in firing] == ["NonFiniteGradients"]
    assert [a.rule for a in client.list_alerts(rule="RareSignalRetentionLoss")] == [
        "RareSignalRetentionLoss"]


def test_closing_a_run_resolves_its_alerts_and_expires_its_series(
        server: ServerHandle, client: Client) -> None:
    run_id = client.open_run("closing").run_id
    client.report([batch(run_id, 1, [sample("nonfinite_values", 1, 1.0)])])
    assert find(scrape(server.metrics_url), "raresignal_alert_firing", run="closing")
    closed = client.close_run(run_id, common_pb2.RUN_STATE_FAILED)
    assert closed.run.state == common_pb2.RUN_STATE_FAILED
    assert [a.state for a in client.list_alerts(run_id=run_id)] == [RESOLVED]
    scraped = scrape(server.metrics_url)
    assert not find(scraped, "raresignal_alert_firing", run="closing")
    # Within the TTL the finished run's last values are still exposed.
    assert find(scraped, "raresignal_nonfinite_values", run="closing") == [1.0]
    assert find(scraped, "raresignal_runs", state="finished") == [1.0]


def test_finished_runs_leave_metrics_after_the_ttl(tmp_path: Path) -> None:
    with start_in_thread(config(tmp_path, finished_run_ttl_seconds=0.2)) as handle:
        c = Client(handle.grpc_target)
        gone, kept = c.open_run("gone").run_id, c.open_run("kept").run_id
        for run_id in (gone, kept):
            c.report([batch(run_id, 1, [sample("loss", 1, 2.0)])])
        c.close_run(gone)
        assert find(scrape(handle.metrics_url), "raresignal_loss", run="gone") == [2.0]
        wait_for(lambda: not find(scrape(handle.metrics_url), "raresignal_loss", run="gone"))
        assert find(scrape(handle.metrics_url), "raresignal_loss", run="kept") == [2.0]
        c.close()


def test_a_relapse_within_the_hold_is_the_same_alert_everywhere(
        server: ServerHandle, client: Client, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="raresignal.server")
    run_id = client.open_run("relapsing").run_id
    # Fires (for: 2), resolves, then relapses for two evaluations within the hold.
    client.report([retention(run_id, seq, value)
                   for seq, value in enumerate([0.1, 0.1, 0.8, 0.1, 0.1], start=1)])
    (alert,) = client.list_alerts(run_id=run_id)
    assert (alert.state, alert.step, alert.resolved_at) == (FIRING, 5, 0.0)
    scraped = scrape(server.metrics_url)
    assert find(scraped, "raresignal_alert_firing", run="relapsing") == [1.0]
    assert find(scraped, "raresignal_alerts_fired_total",
                alert="RareSignalRetentionLoss") == [1.0]  # one episode, counted once

    assert cli_main(["alerts", "--run", run_id, "--server", server.grpc_target]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines()
              if "RareSignalRetentionLoss" in line]
    assert len(listed) == 1 and "firing" in listed[0]

    def logged() -> list[str]:
        return [r.getMessage().split(":")[0] for r in caplog.records
                if "(run relapsing," in r.getMessage()]

    wait_for(lambda: len(logged()) == 4)
    assert logged() == ["alert pending", "alert firing", "alert resolved", "alert firing"]
