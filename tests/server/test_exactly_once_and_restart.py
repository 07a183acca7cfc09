"""Each batch is applied once per (run, sender, sequence), and a server restarted on the
same SQLite file carries on where it stopped: runs, sequences, baselines and alerts."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from rule_snippets import FISHER_MASS_RULE, RETENTION_RULE
from server_support import Client, batch, config, find, sample, scrape

from raresignal.protos.v1 import alerts_pb2, common_pb2, ingest_pb2
from raresignal.server.alerting.rules import default_rules_text, load_rules
from raresignal.server.serving.app import start_in_thread

APPLIED = ingest_pb2.ReportAck.OUTCOME_APPLIED
DUPLICATE = ingest_pb2.ReportAck.OUTCOME_DUPLICATE
N = 14


def scripted(run_id: str, sender: str = "rank0-a") -> list[ingest_pb2.ReportBatch]:
    """Fourteen batches: retention falls (its alert fires); the Fisher mass ratio learns its
    baseline (3 warm-up evaluations, then a window of 10)."""
    batches = []
    for seq in range(1, N + 1):
        batches.append(batch(run_id, seq, [
            sample("loss", seq, 3.0 - 0.1 * seq),
            sample("probe_retention", seq, 0.9 if seq < 11 else 0.1, probe="rare"),
            sample("probe_fisher_mass_ratio", seq, 1.0 + 0.01 * seq, probe="rare"),
        ], sender=sender))
    return batches


def table_counts(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("runs", "series", "samples", "sender_sequences", "rule_states",
                              "alerts", "alert_history")}


def alert_view(client: Client, run_id: str) -> list[tuple[str, str, int, float]]:
    return sorted((a.alert_id, a.rule, a.state, a.fired_at)
                  for a in client.list_alerts(run_id=run_id))


def test_replaying_a_series_changes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "raresignal.db"
    with start_in_thread(config(tmp_path, rules_path=rules_with_opt_ins(tmp_path))) as server:
        client = Client(server.grpc_target)
        run_id = client.open_run("replay").run_id
        first = client.report(scripted(run_id))
        assert [a.outcome for a in first] == [APPLIED] * N
        assert [a.samples_applied for a in first] == [3] * N
        counts, alerts = table_counts(db), alert_view(client, run_id)
        before = scrape(server.metrics_url)

        # The sender reconnects and replays its whole spool: every batch is a duplicate.
        again = client.report(scripted(run_id))
        assert [(a.sequence, a.outcome, a.samples_applied) for a in again] == [
            (seq, DUPLICATE, 0) for seq in range(1, N + 1)]
        assert table_counts(db) == counts
        assert alert_view(client, run_id) == alerts
        after = scrape(server.metrics_url)
        assert find(after, "raresignal_ingest_batches_total", outcome="duplicate") == [float(N)]
        assert find(after, "raresignal_ingest_batches_total", outcome="applied") == [float(N)]
        assert (find(after, "raresignal_ingest_samples_total")
                == find(before, "raresignal_ingest_samples_total") == [3.0 * N])
        assert find(after, "raresignal_alerts_fired_total", alert="RareSignalRetentionLoss") == [
            1.0]

        # A second sender of the same run has its own numbering.
        other = client.report(scripted(run_id, sender="rank1-b")[:2])
        assert [a.outcome for a in other] == [APPLIED, APPLIED]
        # A partly new stream: old sequences acknowledged, new ones applied.
        mixed = client.report([*scripted(run_id)[N - 2:],
                               batch(run_id, N + 1, [sample("loss", N + 1, 1.0)])])
        assert [a.outcome for a in mixed] == [DUPLICATE, DUPLICATE, APPLIED]
        assert client.series(run_id, "loss")[-1] == (N + 1, 1.0)
        client.close()


# The shipped rules plus two opt-in rules as default_rules.yaml describes them: retention
# (an absolute threshold) and a baseline-relative rule with a short warm-up (the Fisher
# mass rule, learning its baseline from 3 + 10 evaluations).
def rules_with_opt_ins(tmp_path: Path) -> str:
    path = tmp_path / "rules.yaml"
    path.write_text(default_rules_text().rstrip() + "\n" + FISHER_MASS_RULE + RETENTION_RULE)
    assert {"RareSignalFisherCollapse", "RareSignalRetentionLoss"} <= {
        rule.alert for rule in load_rules(path)}
    return str(path)


def test_restart_on_the_same_file_resumes_everything(tmp_path: Path) -> None:
    db = tmp_path / "raresignal.db"
    settings = config(tmp_path, rules_path=rules_with_opt_ins(tmp_path))
    with start_in_thread(settings) as server:
        client = Client(server.grpc_target)
        opened = client.open_run("durable", interval=3600.0)
        run_id = opened.run_id
        client.report(scripted(run_id))
        alerts_before = alert_view(client, run_id)
        series_before = client.series(run_id, "probe_retention", probe="rare")
        client.close()
    with sqlite3.connect(db) as conn:
        baseline = conn.execute(
            "SELECT state FROM rule_states WHERE state_key LIKE "
            "'RareSignalFisherCollapse/fire/%'").fetchone()[0]
    assert '"median": ' in baseline and '"median": null' not in baseline

    with start_in_thread(settings) as server:
        client = Client(server.grpc_target)
        runs = client.runs.ListRuns(alerts_pb2.ListRunsRequest(), timeout=10).runs
        assert [(r.run_id, r.run_name, r.state, r.last_step) for r in runs] == [
            (run_id, "durable", common_pb2.RUN_STATE_ACTIVE, N)]
        assert alert_view(client, run_id) == alerts_before
        assert client.series(run_id, "probe_retention", probe="rare") == series_before
        # The firing alert is exposed again straight after the restart.
        assert find(scrape(server.metrics_url), "raresignal_alert_firing", run="durable",
                    alert="RareSignalRetentionLoss") == [1.0]

        resumed = client.open_run("durable", interval=3600.0, resume=run_id)
        assert resumed.run_id == run_id
        assert dict(resumed.last_sequences) == {"rank0-a": N}
        assert [a.outcome for a in client.report(scripted(run_id))] == [DUPLICATE] * N

        # The baseline learned before the restart is used after it: median of the smoothed
        # ratios is about 1.1, so 0.1 is below 0.2 x baseline and fires at once (for: 3 ->
        # pending first), while a fresh baseline would still be in its warm-up.
        collapse = [batch(run_id, seq, [sample("probe_fisher_mass_ratio", seq, 0.1,
                                               probe="rare")]) for seq in (N + 1, N + 2, N + 3)]
        client.report(collapse)
        states = {a.rule: a.state for a in client.list_alerts(run_id=run_id)}
        assert states["RareSignalFisherCollapse"] == common_pb2.ALERT_STATE_FIRING
        # The retention alert kept its episode: resolving it resolves the same alert id.
        client.report([batch(run_id, N + 4, [sample("probe_retention", N + 4, 0.9,
                                                    probe="rare")])])
        retention = [a for a in client.list_alerts(run_id=run_id)
                     if a.rule == "RareSignalRetentionLoss"]
        assert [(a.alert_id, a.state) for a in retention] == [
            (next(a[0] for a in alerts_before if a[1] == "RareSignalRetentionLoss"),
             common_pb2.ALERT_STATE_RESOLVED)]
        client.close()


HOLD_RULES = """
rules:
  - alert: RareSignalRetentionLoss
    metric: probe_retention
    op: "<"
    threshold: 0.3
    resolve_threshold: 0.4
    hold: 3
    severity: critical
"""


def test_a_restart_in_the_middle_of_a_hold_keeps_the_episode(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(HOLD_RULES)
    settings = config(tmp_path, rules_path=str(rules))

    def retention(run_id: str, seq: int, value: float) -> ingest_pb2.ReportBatch:
        return batch(run_id, seq, [sample("probe_retention", seq, value, probe="rare")])

    with start_in_thread(settings) as server:
        client = Client(server.grpc_target)
        run_id = client.open_run("held", interval=3600.0).run_id
        # Fires, resolves, and one of the hold's three quiet evaluations passes.
        client.report([retention(run_id, seq, value)
                       for seq, value in enumerate([0.1, 0.9, 0.9], start=1)])
        (resolved,) = client.list_alerts(run_id=run_id)
        assert resolved.state == common_pb2.ALERT_STATE_RESOLVED
        client.close()

    with start_in_thread(settings) as server:
        client = Client(server.grpc_target)
        client.open_run("held", interval=3600.0, resume=run_id)
        # The value relapses after two of the hold's three quiet evaluations: the same
        # alert fires again, though the hold began before the restart.
        client.report([retention(run_id, 4, 0.9), retention(run_id, 5, 0.1)])
        (alert,) = client.list_alerts(run_id=run_id)
        assert (alert.alert_id, alert.state, alert.fired_at, alert.step) == (
            resolved.alert_id, common_pb2.ALERT_STATE_FIRING, resolved.fired_at, 5)
        scraped = scrape(server.metrics_url)
        assert find(scraped, "raresignal_alert_firing", run="held") == [1.0]
        # Resolved again, and the hold runs out across another restart: a new episode.
        client.report([retention(run_id, seq, 0.9) for seq in (6, 7)])
        client.close()

    with start_in_thread(settings) as server:
        client = Client(server.grpc_target)
        client.open_run("held", interval=3600.0, resume=run_id)
        client.report([retention(run_id, seq, value)
                       for seq, value in [(8, 0.9), (9, 0.9), (10, 0.1)]])
        alerts = client.list_alerts(run_id=run_id)
        assert sorted((a.alert_id == resolved.alert_id, a.state) for a in alerts) == [
            (False, common_pb2.ALERT_STATE_FIRING), (True, common_pb2.ALERT_STATE_RESOLVED)]
        client.close()
