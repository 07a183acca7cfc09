"""What the server tests share: a plain gRPC client, scraping /metrics, waiting on a
condition, and a server configuration on free ports."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from raresignal.client.channels import auth_metadata
from raresignal.client.paging import read_series
from raresignal.protos.transport import client_channel_options
from raresignal.protos.v1 import (
    alerts_pb2,
    alerts_pb2_grpc,
    common_pb2,
    ingest_pb2,
    ingest_pb2_grpc,
)
from raresignal.server.serving.app import ServerConfig

Scrape = dict[tuple[str, frozenset[tuple[str, str]]], float]


def sample(metric: str, step: int, value: float, **labels: str) -> common_pb2.Sample:
    return common_pb2.Sample(metric=metric, step=step, value=value, labels=labels,
                             wall_time=1_700_000_000.0 + step)


def batch(run_id: str, sequence: int, samples: Sequence[common_pb2.Sample],
          sender: str = "rank0-test") -> ingest_pb2.ReportBatch:
    return ingest_pb2.ReportBatch(run_id=run_id, sender_id=sender, sequence=sequence,
                                  samples=samples)


class Client:
    """A thin synchronous client over one channel, as a tool or test would write it."""

    def __init__(self, target: str, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, object]] = ()) -> None:
        all_options = [*client_channel_options(), *options]
        self.channel = (grpc.secure_channel(target, credentials, all_options) if credentials
                        else grpc.insecure_channel(target, all_options))
        self.metadata = auth_metadata(token)
        self.ingest = ingest_pb2_grpc.IngestStub(self.channel)
        self.alerts = alerts_pb2_grpc.AlertsStub(self.channel)
        self.runs = alerts_pb2_grpc.RunsStub(self.channel)

    def open_run(self, name: str, interval: float = 0.0, resume: str = "",
                 world_size: int = 1) -> ingest_pb2.OpenRunResponse:
        return self.ingest.OpenRun(
            ingest_pb2.OpenRunRequest(run_name=name, resume_run_id=resume,
                                      world_size=world_size,
                                      report_interval_seconds=interval),
            metadata=self.metadata, timeout=10)

    def report(self, batches: Sequence[ingest_pb2.ReportBatch]) -> list[ingest_pb2.ReportAck]:
        return list(self.ingest.Report(iter(batches), metadata=self.metadata, timeout=20))

    def close_run(self, run_id: str, state: int = 0) -> ingest_pb2.CloseRunResponse:
        return self.ingest.CloseRun(ingest_pb2.CloseRunRequest(run_id=run_id, state=state),
                                    metadata=self.metadata, timeout=10)

    def list_alerts(self, run_id: str = "", rule: str = "",
                    states: Sequence[int] = ()) -> list[common_pb2.Alert]:
        request = alerts_pb2.ListAlertsRequest(
            filter=alerts_pb2.AlertFilter(run_id=run_id, rule=rule, states=states))
        return list(self.alerts.ListAlerts(request, metadata=self.metadata, timeout=10).alerts)

    def series(self, run_id: str, metric: str, **labels: str) -> list[tuple[int, float]]:
        """Every stored sample of the series, page after page."""
        request = alerts_pb2.GetSeriesRequest(run_id=run_id, metric=metric, labels=labels)
        return [(s.step, s.value) for s in read_series(self.runs, request, self.metadata)]

    def close(self) -> None:
        self.channel.close()


def scrape(url: str) -> Scrape:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def find(scraped: Scrape, name: str, **labels: str) -> list[float]:
    """Values of series named ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return [v for (n, ls), v in scraped.items() if n == name and wanted <= ls]


def wait_for(condition: Callable[[], object], timeout: float = 15.0) -> object:
    """Polls until ``condition()`` is truthy; the value, or AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.05)


def config(tmp_path: Path, **overrides: object) -> ServerConfig:
    values: dict[str, object] = dict(db_path=str(tmp_path / "raresignal.db"),
                                     host="127.0.0.1", grpc_port=0, metrics_port=0,
                                     health_port=0, clock_interval_seconds=0.1)
    values.update(overrides)
    return ServerConfig(**values)  # type: ignore[arg-type]


class FakeClock:
    """The server's wall clock in a test: it stands still until the test sets ``now``."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
