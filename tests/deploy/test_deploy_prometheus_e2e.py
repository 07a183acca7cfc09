"""End to end through real processes: a raresignal server on loopback fed over the real
gRPC Ingest API with a run whose rare-signal probe collapses, a real Prometheus scraping its
/metrics every second and evaluating the chart's rules, and the dashboard's queries run
against that Prometheus."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import yaml
from deploy_support import RULES_FILE, PrometheusServer, dashboard_queries

from raresignal.protos.transport import client_channel_options
from raresignal.protos.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc
from raresignal.server.serving.app import ServerConfig, start_in_thread

RUN = "e2e-collapse"
HEALTHY_STEPS = 16
COLLAPSED_STEPS = 8  # RareProbeLossRise fires within the first collapsed steps
DEADLINE_SECONDS = 90.0


def _values_at(step: int) -> list[tuple[str, dict[str, str], float]]:
    """What a run reports at one step: healthy, then the rare probe loses its retention,
    its Fisher mass and its accuracy while the common probe stays as it was."""
    collapsed = step >= HEALTHY_STEPS
    rare = {"probe": "rare"}
    common = {"probe": "common"}
    return [
        ("step", {}, step),
        ("loss", {}, 2.0 / (1 + 0.05 * step)),
        ("grad_norm", {}, 1.5),
        ("nonfinite_values", {}, 0),
        ("gradient_noise_scale", {}, 120.0),
        ("sharpness", {}, 18.0),
        ("preconditioned_sharpness", {}, 18.0),
        ("sharpness_threshold", {}, 20.0),
        ("sharpness_ratio", {}, 0.9),
        ("subspace_overlap", {}, 0.8),
        ("fisher_effective_rank", {}, 12.0),
        ("agent_overhead_ratio", {}, 0.02),
        ("probe_fisher_mass_ratio", rare, 0.04 if collapsed else 1.0),
        ("probe_fisher_mass_ratio", common, 1.0),
        ("probe_absorption", rare, 0.9 if collapsed else 0.3),
        ("probe_bulk_residual", rare, 0.3 if collapsed else 0.6),
        ("probe_retention", rare, 0.1 if collapsed else 1.0),
        ("probe_retention", common, 1.0),
        ("probe_interference", rare, -0.05),
        ("probe_accuracy", rare, 0.4 if collapsed else 0.95),
        ("probe_accuracy", common, 0.99),
        # Learned (from 2.0 down to 0.2), then lost.
        ("probe_loss", rare, 1.4 if collapsed else max(0.2, 2.0 - 0.3 * step)),
    ]


def _batches(run_id: str) -> Iterator[ingest_pb2.ReportBatch]:
    for step in range(HEALTHY_STEPS + COLLAPSED_STEPS):
        samples = [common_pb2.Sample(metric=metric, labels=labels, step=step, value=value,
                                     wall_time=time.time())
                   for metric, labels, value in _values_at(step)]
        yield ingest_pb2.ReportBatch(run_id=run_id, sender_id="rank0-e2e", sequence=step + 1,
                                     samples=samples)


def _report_run(grpc_target: str) -> list[ingest_pb2.ReportAck]:
    with grpc.insecure_channel(grpc_target, options=client_channel_options()) as channel:
        stub = ingest_pb2_grpc.IngestStub(channel)
        opened = stub.OpenRun(ingest_pb2.OpenRunRequest(
            run_name=RUN, world_size=1, report_interval_seconds=60.0), timeout=10)
        return list(stub.Report(_batches(opened.run_id), timeout=30))


def _rules_every_second(tmp_path: Path) -> Path:
    """The chart's rules file with its groups evaluated every second instead of every 30 s,
    so the test need not wait for a production evaluation interval."""
    document = yaml.safe_load(RULES_FILE.read_text())
    for group in document["groups"]:
        group["interval"] = "1s"
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def scraping_prometheus(start_prometheus: Callable[[dict[str, Any]], PrometheusServer],
                        metrics_url: str, tmp_path: Path) -> PrometheusServer:
    """A Prometheus scraping ``metrics_url`` every second with the chart's rules loaded,
    returned once its first scrape succeeded."""
    target = metrics_url.split("://", 1)[1].split("/", 1)[0]
    prometheus = start_prometheus({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(_rules_every_second(tmp_path))],
        "scrape_configs": [{"job_name": "raresignal", "static_configs": [
            {"targets": [target]}]}],
    })
    assert _poll(prometheus, 'up{job="raresignal"} == 1'), "the server is not scraped"
    return prometheus


def _poll(prometheus: PrometheusServer, expr: str) -> list[dict[str, Any]]:
    """The query's result once it is non-empty; [] if it stays empty until the deadline."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        answer = prometheus.query(expr)
        assert answer["status"] == "success", answer
        if answer["data"]["result"] or time.monotonic() > deadline:
            return answer["data"]["result"]
        time.sleep(0.5)


def test_collapse_reaches_prometheus_alerts_and_the_dashboard(
        start_prometheus: Callable[[dict[str, Any]], PrometheusServer],
        tmp_path: Path) -> None:
    config = ServerConfig(db_path=str(tmp_path / "raresignal.db"), host="127.0.0.1",
                          grpc_port=0, metrics_port=0, health_port=0)
    with start_in_thread(config) as server:
        prometheus = scraping_prometheus(start_prometheus, server.metrics_url, tmp_path)

        acks = _report_run(server.grpc_target)
        assert [a.outcome for a in acks] == [ingest_pb2.ReportAck.OUTCOME_APPLIED] * len(acks)
        assert len(acks) == HEALTHY_STEPS + COLLAPSED_STEPS

        # The server's alert, as Prometheus scraped it.
        firing = _poll(prometheus, f'raresignal_alert_firing{{run="{RUN}", '
                                   'alert="RareProbeLossRise"} == 1')
        assert [s["metric"]["probe"] for s in firing] == ["rare"]
        assert firing[0]["metric"]["severity"] == "critical"

        # The chart's mirroring rule turns it into a Prometheus alert.
        alerts = _poll(prometheus, 'ALERTS{alertname="RareProbeLossRise", '
                                   f'alertstate="firing", run="{RUN}"}}')
        assert [a["metric"]["probe"] for a in alerts] == ["rare"]

        # Only the collapsed probe fires; the healthy common probe does not.
        common = prometheus.query(f'raresignal_alert_firing{{run="{RUN}", probe="common"}}')
        assert common["data"]["result"] == []

        # Every dashboard query returns data for the run.
        empty = [name for name, expr in dashboard_queries().items()
                 if not _poll(prometheus, expr)]
        assert empty == []
        ratio = prometheus.query(f'raresignal_probe_fisher_mass_ratio{{run="{RUN}", '
                                 'probe="rare"}')
        assert float(ratio["data"]["result"][0]["value"][1]) == 0.04

