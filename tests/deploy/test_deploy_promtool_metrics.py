"""The server's /metrics, scraped from a real server that holds a run reporting every
catalogue metric with a firing alert (and the freshness series beside them), passes
``promtool check metrics``: Prometheus' own linter of exposition format and naming
conventions."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_deploy_prometheus_e2e import HEALTHY_STEPS, _batches

from raresignal.client.channels import open_channel
from raresignal.protos.catalog import (
    CATALOG,
    LABEL_ESTIMATOR,
    LABEL_GROUP,
    LABEL_LAYER,
    LABEL_PROBE,
    Kind,
    MetricSpec,
)
from raresignal.protos.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc
from raresignal.server.serving.app import ServerConfig, ServerHandle, start_in_thread

RUN = "promtool-lint"
# Two values per label key, so every family has more than one series.
LABEL_VALUES = {LABEL_PROBE: ("rare", "common"), LABEL_GROUP: ("embedding", "head"),
                LABEL_LAYER: ("block0", "block1"),
                LABEL_ESTIMATOR: ("sharpness", "fisher")}
DEADLINE_SECONDS = 60.0
# What the server adds beside the run series to say how old they are.
FRESHNESS_SERIES = ("raresignal_series_last_step",
                    "raresignal_series_last_measured_timestamp_seconds",
                    "raresignal_run_last_step", "raresignal_run_last_report_timestamp_seconds")


def _catalogue_samples(spec: MetricSpec, step: int) -> list[common_pb2.Sample]:
    """One sample of ``spec`` per combination of its labels' values (at most two)."""
    label_sets: list[dict[str, str]] = [{}]
    for key in spec.labels:
        label_sets = [{**labels, key: value} for labels in label_sets
                      for value in LABEL_VALUES[key]]
    value = float(step) if spec.kind is Kind.COUNTER else 0.5
    return [common_pb2.Sample(metric=spec.name, labels=labels, step=step, value=value,
                              wall_time=time.time()) for labels in label_sets]


def _every_catalogue_metric(run_id: str, sequence: int, step: int) -> ingest_pb2.ReportBatch:
    samples = [sample for spec in CATALOG.values() for sample in _catalogue_samples(spec, step)]
    return ingest_pb2.ReportBatch(run_id=run_id, sender_id="rank0-e2e", sequence=sequence,
                                  samples=samples)


def _report(target: str) -> None:
    """A run whose rare probe collapses (so an alert fires), then one batch with every
    catalogue metric."""
    with open_channel(target) as channel:
        stub = ingest_pb2_grpc.IngestStub(channel)
        opened = stub.OpenRun(ingest_pb2.OpenRunRequest(
            run_name=RUN, world_size=1, report_interval_seconds=60.0), timeout=10)
        batches = list(_batches(opened.run_id))
        last = batches[-1]
        batches.append(_every_catalogue_metric(opened.run_id, last.sequence + 1,
                                               HEALTHY_STEPS * 2))
        acks = list(stub.Report(iter(batches), timeout=30))
    assert [a.outcome for a in acks] == [ingest_pb2.ReportAck.OUTCOME_APPLIED] * len(batches)


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _scrape_with_firing_alert(url: str) -> str:
    """The exposition once it shows the firing alert (applied and evaluated by then)."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        text = _scrape(url)
        if "\nraresignal_alert_firing{" in text or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerHandle]:
    config = ServerConfig(db_path=str(tmp_path / "raresignal.db"), host="127.0.0.1",
                          grpc_port=0, metrics_port=0, health_port=0)
    with start_in_thread(config) as handle:
        yield handle


def _promtool_check(promtool: str, exposition: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, "check", "metrics"], input=exposition,
                          capture_output=True, text=True, timeout=60)


def test_scraped_metrics_pass_promtool(promtool_binary: str, server: ServerHandle) -> None:
    _report(server.grpc_target)
    exposition = _scrape_with_firing_alert(server.metrics_url)

    # The scrape holds what the check is meant to cover: every catalogue family with
    # samples, and the server's own families with a firing alert.
    assert "\nraresignal_alert_firing{" in exposition
    for spec in CATALOG.values():
        assert f"\n{spec.prometheus_name}{{" in exposition, spec.name
    for freshness in FRESHNESS_SERIES:
        assert f"\n{freshness}{{" in exposition, freshness

    result = _promtool_check(promtool_binary, exposition)
    problems = result.stdout + result.stderr
    assert result.returncode == 0, problems
    assert problems == ""


def test_promtool_reports_a_convention_break(promtool_binary: str,
                                             server: ServerHandle) -> None:
    """Guards the check: the same promtool flags a gauge named like a counter's sample."""
    exposition = _scrape(server.metrics_url) + (
        "# HELP raresignal_probe_count Probes.\n# TYPE raresignal_probe_count gauge\n"
        "raresignal_probe_count 2\n")
    result = _promtool_check(promtool_binary, exposition)
    assert result.returncode != 0
    assert "raresignal_probe_count" in result.stdout + result.stderr
