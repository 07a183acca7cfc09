"""What the server exposes to Prometheus: its own counters and every run's latest state.

Run series are built at scrape time by one custom Collector from the live state:
``raresignal_<metric>{run, run_id, <catalogue labels>}`` (without ``run`` where run names
must not leave the server). Label sets stay bounded because
the server accepts only catalogue label keys, bounded values and a bounded number of
series per run, and finished runs disappear after a TTL.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from raresignal.protos.catalog import CATALOG, Kind
from raresignal.server.serving.live import LiveState

BATCH_OUTCOMES = ("applied", "duplicate", "rejected")
NOTIFICATION_OUTCOMES = ("sent", "retried", "failed")


class ServerMetrics:
    """The server's own instruments, on a registry of their own (one per server)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batches = Counter(
            "raresignal_ingest_batches", "Report batches received, by outcome.",
            ["outcome"], registry=registry)
        self.samples = Counter(
            "raresignal_ingest_samples", "Samples applied to storage.", registry=registry)
        self.batch_duration = Histogram(
            "raresignal_ingest_batch_duration_seconds",
            "Time from receiving a report batch to acknowledging it.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5), registry=registry)
        self.alerts_fired = Counter(
            "raresignal_alerts_fired", "Alerts that reached the firing state, by rule.",
            ["alert"], registry=registry)
        self.notifications = Counter(
            "raresignal_alertmanager_notifications",
            "Alertmanager POSTs: sent, retried after a failure, or failed for good.",
            ["outcome"], registry=registry)
        for outcome in BATCH_OUTCOMES:
            self.batches.labels(outcome)
        for outcome in NOTIFICATION_OUTCOMES:
            self.notifications.labels(outcome)


class RunStateCollector(Collector):
    """Builds the per-run families from the live state at each scrape."""

    def __init__(self, live: LiveState, finished_ttl_seconds: float,
                 clock: Callable[[], float] = time.time, *,
                 include_run_names: bool = True) -> None:
        self._live = live
        self._ttl = finished_ttl_seconds
        self._clock = clock
        self._include_run_names = include_run_names

    def _run_labels(self, run_name: str, run_id: str) -> dict[str, str]:
        if self._include_run_names:
            return {"run": run_name, "run_id": run_id}
        return {"run_id": run_id}

    def collect(self) -> Iterator[Metric]:
        snap = self._live.snapshot(self._clock(), self._ttl)
        runs = GaugeMetricFamily("raresignal_runs", "Runs known to the server, by state.",
                                 labels=["state"])
        runs.add_metric(["active"], snap.active_runs)
        runs.add_metric(["finished"], snap.finished_runs)
        yield runs

        names = {run.run_id: run.run_name for run in snap.runs}
        families: dict[str, Metric] = {}
        for run_id, values in snap.values.items():
            for metric, labels, value in values:
                family = families.get(metric)
                if family is None:
                    spec = CATALOG[metric]
                    if spec.kind is Kind.COUNTER:
                        family = CounterMetricFamily(spec.prometheus_name, spec.help)
                    else:
                        family = GaugeMetricFamily(spec.prometheus_name, spec.help)
                    families[metric] = family
                sample_labels = {**self._run_labels(names[run_id], run_id), **labels}
                suffix = "_total" if CATALOG[metric].kind is Kind.COUNTER else ""
                family.add_sample(family.name + suffix, sample_labels, value)
        yield from families.values()

        firing = GaugeMetricFamily(
            "raresignal_alert_firing", "1 while an alert fires; absent otherwise.")
        for alert in snap.firing:
            labels = {**self._run_labels(alert.run_name, alert.run_id),
                      "alert": alert.rule, "severity": alert.severity, **alert.labels}
            firing.add_sample("raresignal_alert_firing", labels, 1.0)
        yield firing
