"""The latest state of every run, shared with the Prometheus scrape thread.

The storage thread updates it after each committed batch; a scrape copies it under a lock
and never reads storage, so a scrape cannot slow the write path (and works for an
in-memory database, which only its own connection can see).

A replica on a shared database shows only the runs it owns (``set_owned``), so Prometheus
scraping every replica sees each run's series once.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from raresignal.protos.v1 import common_pb2
from raresignal.server.storage.records import (
    AlertChange,
    AlertRecord,
    LatestValue,
    Newest,
    RunRecord,
    SeriesKey,
)


@dataclass(frozen=True)
class RunView:
    run_id: str
    run_name: str
    finished_at: float  # 0 while active
    last_step: int = 0
    reported_at: float = 0.0  # server time of the last applied report (or of the opening)


class SeriesValue(NamedTuple):
    """One series' newest value and when it was measured."""

    metric: str
    labels: dict[str, str]
    value: float
    step: int
    measured_at: float  # the sample's wall time, on the agent's clock (0: not sent)


@dataclass
class Snapshot:
    """What one scrape exposes."""

    runs: list[RunView] = field(default_factory=list)
    active_runs: int = 0
    finished_runs: int = 0
    values: dict[str, list[SeriesValue]] = field(default_factory=dict)  # by run_id
    firing: list[AlertRecord] = field(default_factory=list)


class LiveState:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, RunView] = {}
        # run_id -> (metric, labels_key) -> (step, value, wall_time)
        self._values: dict[str, dict[SeriesKey, Newest]] = {}
        self._firing: dict[str, AlertRecord] = {}
        # Finished runs past the TTL: counted among the finished runs, their series not held.
        self._expired: set[str] = set()
        # The runs this replica owns (None: it owns every run, a single server).
        self._owned: frozenset[str] | None = None

    def set_owned(self, run_ids: Iterable[str]) -> None:
        """Shows only these runs from now on: those whose lease this replica holds."""
        with self._lock:
            self._owned = frozenset(run_ids)

    def forget_alerts(self, run_id: str) -> None:
        """Drops a run's firing alerts, before its owner's engine state is loaded again."""
        with self._lock:
            for alert_id in [a for a, alert in self._firing.items() if alert.run_id == run_id]:
                del self._firing[alert_id]

    def set_run(self, run: RunRecord) -> None:
        """Takes a run as it stands: opened, after an applied batch, or closed."""
        with self._lock:
            self._expired.discard(run.run_id)
            previous = self._runs.get(run.run_id)
            # Closing moves updated_at to the close time; the last report stays what it was.
            reported_at = (previous.reported_at if run.finished_at and previous
                           else run.updated_at)
            self._runs[run.run_id] = RunView(run.run_id, run.run_name, run.finished_at,
                                             run.last_step, reported_at)
            self._values.setdefault(run.run_id, {})

    def expire_run(self, run: RunRecord) -> None:
        """Forgets a finished run's series and alerts; it still counts as a finished run."""
        with self._lock:
            self._runs.pop(run.run_id, None)
            self._values.pop(run.run_id, None)
            for alert_id in [a for a, alert in self._firing.items()
                             if alert.run_id == run.run_id]:
                del self._firing[alert_id]
            self._expired.add(run.run_id)

    def load_values(self, values: Iterable[LatestValue]) -> None:
        with self._lock:
            for v in values:
                self._values.setdefault(v.run_id, {})[(v.metric, v.labels_key)] = (
                    v.step, v.value, v.wall_time)

    def record_newest(self, run_id: str, newest: Mapping[SeriesKey, Newest]) -> None:
        """Takes the newest sample per series of a batch: O(series), not O(samples)."""
        with self._lock:
            series = self._values.setdefault(run_id, {})
            for key, sample in newest.items():
                current = series.get(key)
                if current is None or sample[0] >= current[0]:
                    series[key] = sample

    def apply_changes(self, changes: Iterable[AlertChange]) -> None:
        with self._lock:
            for change in changes:
                alert = change.alert
                if alert.state == common_pb2.ALERT_STATE_FIRING:
                    self._firing[alert.alert_id] = replace(alert, labels=dict(alert.labels))
                else:
                    self._firing.pop(alert.alert_id, None)

    def load_firing(self, alerts: Iterable[AlertRecord]) -> None:
        with self._lock:
            for alert in alerts:
                if alert.state == common_pb2.ALERT_STATE_FIRING:
                    self._firing[alert.alert_id] = alert

    def snapshot(self, now: float, finished_ttl_seconds: float) -> Snapshot:
        """The exposed state; finished runs older than the TTL are left out."""
        snap = Snapshot()
        with self._lock:
            owned = self._owned
            snap.finished_runs = len(self._expired if owned is None else self._expired & owned)
            for run in self._runs.values():
                if owned is not None and run.run_id not in owned:
                    continue
                if run.finished_at:
                    snap.finished_runs += 1
                    if now - run.finished_at > finished_ttl_seconds:
                        continue
                else:
                    snap.active_runs += 1
                snap.runs.append(run)
                snap.values[run.run_id] = [
                    SeriesValue(metric, json.loads(labels_key), value, step, wall_time)
                    for (metric, labels_key), (step, value, wall_time)
                    in self._values.get(run.run_id, {}).items()
                ]
            shown = {run.run_id for run in snap.runs}
            snap.firing = [a for a in self._firing.values() if a.run_id in shown]
        return snap
