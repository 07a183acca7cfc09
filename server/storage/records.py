"""What the server stores, as plain records every storage backend reads and writes.

Nothing here knows how a backend keeps them; the alert engine and the serving code build
and read these records without depending on any backend.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class CheckedSample(NamedTuple):
    """A sample that passed validation, with its label set in canonical text form."""

    metric: str
    labels_key: str  # canonical JSON of the sorted label mapping, "{}" when unlabelled
    step: int
    value: float
    wall_time: float


def labels_key(labels: Mapping[str, str]) -> str:
    """The canonical text of a label set: the key a series is stored and looked up by."""
    return json.dumps(labels, sort_keys=True, separators=(",", ":")) if labels else "{}"


SeriesKey = tuple[str, str]  # (metric, canonical labels key)
Newest = tuple[int, float, float]  # (step, value, wall_time)


def newest_by_series(samples: Iterable[CheckedSample]) -> dict[SeriesKey, Newest]:
    """The newest sample of each series in ``samples`` (the later one wins a tied step).

    Computed once per batch and shared by the series-limit check, the stored latest
    values and the live state, which then cost O(series) rather than O(samples) each.
    """
    newest: dict[SeriesKey, Newest] = {}
    get = newest.get
    for metric, key, step, value, wall_time in samples:
        current = get((metric, key))
        if current is None or step >= current[0]:
            newest[(metric, key)] = (step, value, wall_time)
    return newest


def samples_to_evaluate(samples: Sequence[CheckedSample], newest: Mapping[SeriesKey, Newest],
                        metrics: Set[str]) -> list[CheckedSample]:
    """What a run's owner needs of a report it did not receive: every sample of the
    ``metrics`` its rules read, in the report's order (the engine evaluates each step),
    then the newest sample of each other series (what ``/metrics`` shows).

    Its newest sample per series, and its highest step, are the report's own.
    """
    kept = [sample for sample in samples if sample.metric in metrics]
    kept.extend(CheckedSample(metric, key, *value) for (metric, key), value in newest.items()
                if metric not in metrics)
    return kept


@dataclass
class RunRecord:
    run_id: str
    run_name: str
    state: int
    world_size: int
    created_at: float
    updated_at: float
    last_step: int
    report_interval_seconds: float
    config: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    agent_version: str = ""
    finished_at: float = 0.0


@dataclass
class AlertRecord:
    alert_id: str
    run_id: str
    run_name: str
    rule: str
    labels: dict[str, str]
    state: int
    severity: str
    summary: str
    value: float
    threshold: float
    step: int
    started_at: float
    fired_at: float = 0.0
    resolved_at: float = 0.0


@dataclass(frozen=True)
class AlertChange:
    """One alert state transition, as the history records it."""

    alert: AlertRecord
    previous_state: int
    at: float


@dataclass(frozen=True)
class SeriesPoint:
    step: int
    value: float
    wall_time: float


@dataclass(frozen=True)
class LatestValue:
    """The newest value of one series, what the Prometheus collector exposes."""

    run_id: str
    metric: str
    labels_key: str
    step: int
    value: float
    wall_time: float


@dataclass
class EngineWrites:
    """Alert-engine state that must be stored in the same transaction as the samples that
    changed it, so a restart never sees samples without their effect (or the reverse)."""

    rule_states: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    alerts: list[AlertRecord] = field(default_factory=list)
    changes: list[AlertChange] = field(default_factory=list)

    def extend(self, other: EngineWrites) -> None:
        """Appends ``other``'s writes after these; a later write of the same key wins."""
        self.rule_states += other.rule_states
        self.alerts += other.alerts
        self.changes += other.changes


REPORT = 1
HEARTBEAT = 2
CLOSE = 3


@dataclass(frozen=True)
class Evaluation:
    """Something a run's alert engine must see: a report's samples (those the owner needs:
    ``samples_to_evaluate``), a heartbeat at a step, or the run's close. Replicas queue
    them in the database for the run's owner."""

    run_id: str
    kind: int  # REPORT, HEARTBEAT or CLOSE
    received_at: float  # server time the receiving replica applied it
    step: int
    samples: Sequence[CheckedSample] = ()


@dataclass(frozen=True)
class BatchWrite:
    """One accepted report batch, ready to store."""

    run: RunRecord  # the run as it stands once the batch is applied
    sender_id: str
    sequence: int
    samples: Sequence[CheckedSample]
    engine_writes: EngineWrites
    newest: Mapping[SeriesKey, Newest]  # newest_by_series(samples)


@dataclass
class BatchGroup:
    """Batches stored together in one transaction (a group commit).

    Each batch is checked against what the earlier batches of the group decided, as if
    they were already committed: the sender's last sequence, the run's position and the
    series the group creates. The storage then writes the group as a whole.
    """

    batches: list[BatchWrite] = field(default_factory=list)
    runs: dict[str, RunRecord] = field(default_factory=dict)  # each run after the group
    sequences: dict[tuple[str, str], int] = field(default_factory=dict)  # (run, sender)
    new_series: dict[str, set[SeriesKey]] = field(default_factory=dict)  # per run
    new_senders: dict[str, set[str]] = field(default_factory=dict)  # per run, first batch
    engine_writes: EngineWrites = field(default_factory=EngineWrites)
    # Left for the runs' owners to evaluate (replicas on a shared database only).
    evaluations: list[Evaluation] = field(default_factory=list)

    def add(self, write: BatchWrite, new_series: Iterable[SeriesKey],
            new_sender: bool = False) -> None:
        run_id = write.run.run_id
        if new_sender:
            self.new_senders.setdefault(run_id, set()).add(write.sender_id)
        self.batches.append(write)
        self.runs[run_id] = write.run
        self.sequences[(run_id, write.sender_id)] = write.sequence
        self.new_series.setdefault(run_id, set()).update(new_series)
        self.engine_writes.extend(write.engine_writes)
