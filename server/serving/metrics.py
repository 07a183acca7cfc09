"""What the server exposes to Prometheus: its own counters and every run's latest state.

Run series are built at scrape time by one custom Collector from the live state:
``raresignal_<metric>{run, run_id, <catalogue labels>}`` (without ``run`` where run names
must not leave the server). Label sets stay bounded because
the server accepts only catalogue label keys, bounded values and a bounded number of
series per run, and finished runs disappear after a TTL.

Freshness. A run series holds the newest value the server has, which may be many steps
old (a probe measured every few hundred steps, an estimator that stopped). Each one
therefore has two companions with the same ``run``, ``run_id`` and catalogue labels plus
``metric`` (the catalogue name, e.g. ``probe_accuracy``):

* ``raresignal_series_last_step``: the training step of that value;
* ``raresignal_series_last_measured_timestamp_seconds``: when it was measured, as Unix
  seconds on the agent's clock (left out for a sample sent without a wall time).

With ``raresignal_run_last_step`` and ``raresignal_run_last_report_timestamp_seconds``
(server clock) per run, a query reads the age in steps (``run_last_step - series_last_step``)
or in seconds (``time() - series_last_measured_timestamp_seconds``). These are gauges of
timestamps, the Prometheus convention (like ``process_start_time_seconds``), rather than
ages, which would be stale the moment they are scraped, or explicit sample timestamps in
the exposition: Prometheus drops samples older than its head block accepts, and a series
with explicit timestamps is not marked stale when it disappears, so an old measurement
would either vanish or linger rather than show its age. The companions add two series
per run series (a scrape's run samples triple), bounded like them; they leave with their
run.

Finished runs. ``raresignal_run_finished_timestamp_seconds`` is the server time a run
closed; its series, companions and alerts leave /metrics once the scrape's clock is more
than ``ServerConfig.finished_run_ttl_seconds`` past it.

Replicas. Several servers on one PostgreSQL database each export only the runs whose
lease they hold (``serving.ownership``), so Prometheus scraping every replica sees each
run's series, companions and alerts once; ``raresignal_runs`` counts the runs the
replica owns. For the few seconds of a takeover a dead replica's runs are absent, then
the new owner exports them with the same labels. The server's own counters (batches,
samples, notifications) are each replica's, to be summed across replicas.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from raresignal.protos.catalog import CATALOG, Kind
from raresignal.server.serving.live import LiveState, Snapshot

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
        yield from self._run_positions(snap)
        yield from self._run_series(snap)

        firing = GaugeMetricFamily(
            "raresignal_alert_firing", "1 while an alert fires; absent otherwise.")
        for alert in snap.firing:
            labels = {**self._run_labels(alert.run_name, alert.run_id),
                      "alert": alert.rule, "severity": alert.severity, **alert.labels}
            firing.add_sample("raresignal_alert_firing", labels, 1.0)
        yield firing

    def _run_positions(self, snap: Snapshot) -> Iterator[Metric]:
        """Where each run stands: its last step, when it last reported, when it closed."""
        last_step = GaugeMetricFamily(
            "raresignal_run_last_step", "Highest training step of any sample the run sent.")
        reported = GaugeMetricFamily(
            "raresignal_run_last_report_timestamp_seconds",
            "Unix time (server clock) the server last applied a report of the run, or "
            "opened it.")
        finished = GaugeMetricFamily(
            "raresignal_run_finished_timestamp_seconds",
            "Unix time (server clock) the run closed; its series leave /metrics the "
            "finished-run TTL later. Absent while the run is active.")
        for run in snap.runs:
            labels = self._run_labels(run.run_name, run.run_id)
            last_step.add_sample(last_step.name, labels, run.last_step)
            reported.add_sample(reported.name, labels, run.reported_at)
            if run.finished_at:
                finished.add_sample(finished.name, labels, run.finished_at)
        yield from (last_step, reported, finished)

    def _run_series(self, snap: Snapshot) -> Iterator[Metric]:
        """Each run's catalogue series and, beside each, the step and time it was measured."""
        names = {run.run_id: run.run_name for run in snap.runs}
        families: dict[str, Metric] = {}
        last_step = GaugeMetricFamily(
            "raresignal_series_last_step",
            "Training step of the value a run series shows; metric names its catalogue "
            "entry.")
        measured = GaugeMetricFamily(
            "raresignal_series_last_measured_timestamp_seconds",
            "Unix time (agent clock) the value a run series shows was measured; metric "
            "names its catalogue entry.")
        for run_id, values in snap.values.items():
            run_labels = self._run_labels(names[run_id], run_id)
            for metric, labels, value, step, measured_at in values:
                spec = CATALOG[metric]
                family = families.get(metric)
                if family is None:
                    if spec.kind is Kind.COUNTER:
                        family = CounterMetricFamily(spec.prometheus_name, spec.help)
                    else:
                        family = GaugeMetricFamily(spec.prometheus_name, spec.help)
                    families[metric] = family
                sample_labels = {**run_labels, **labels}
                suffix = "_total" if spec.kind is Kind.COUNTER else ""
                family.add_sample(family.name + suffix, sample_labels, value)
                companion_labels = {**run_labels, "metric": metric, **labels}
                last_step.add_sample(last_step.name, companion_labels, step)
                if measured_at:
                    measured.add_sample(measured.name, companion_labels, measured_at)
        yield from families.values()
        yield from (last_step, measured)
