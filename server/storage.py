"""What the server keeps, behind one small interface.

SQLite is the default backend (server.sqlite_store); the interface is narrow enough that a
PostgreSQL backend serving several replicas can implement it later without touching the
ingest path or the alert engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any, Protocol

from raresignal.server.validation import CheckedSample


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


@dataclass
class BatchWrite:
    """One report batch, ready to store: what :meth:`Storage.apply_batches` takes."""

    run: RunRecord  # the run as it stands once the batch is applied
    sender_id: str
    sequence: int
    samples: Sequence[CheckedSample]
    engine_writes: EngineWrites
    newest: Mapping[SeriesKey, Newest] | None = None  # None: computed from ``samples``


class Storage(Protocol):
    """Runs, series, sender sequences, alert-engine state and alerts."""

    def create_run(self, run: RunRecord) -> None: ...

    def get_run(self, run_id: str) -> RunRecord | None: ...

    def update_run(self, run: RunRecord, writes: EngineWrites | None = None) -> None: ...

    def list_runs(self, include_finished: bool) -> list[RunRecord]: ...

    def last_sequence(self, run_id: str, sender_id: str) -> int:
        """Highest sequence applied for the sender (0: none yet)."""
        ...

    def last_sequences(self, run_id: str) -> dict[str, int]: ...

    def series_count(self, run_id: str) -> int: ...

    def new_series_count(self, run_id: str, samples: Iterable[CheckedSample]) -> int:
        """How many distinct series of ``samples`` the run does not have yet."""
        ...

    def series_keys(self, run_id: str) -> Set[SeriesKey]:
        """The (metric, labels key) of every series the run has."""
        ...

    def apply_batch(
        self,
        run: RunRecord,
        sender_id: str,
        sequence: int,
        samples: Sequence[CheckedSample],
        engine_writes: EngineWrites,
    ) -> bool:
        """Stores the batch iff ``sequence`` is above the highest applied for the sender,
        with ``engine_writes`` and the updated run, in one transaction. Returns whether it
        was applied (False: a duplicate, nothing changed)."""
        ...

    def apply_batches(self, writes: Sequence[BatchWrite]) -> list[bool]:
        """Stores several batches in one transaction (group commit), each exactly as
        :meth:`apply_batch` would in this order: whether each was applied. On an error
        nothing of any of them is stored, and the error is raised."""
        ...

    def latest_values(self) -> list[LatestValue]: ...

    def get_series(self, run_id: str, metric: str, labels_key: str,
                   since_step: int) -> list[SeriesPoint]: ...

    def sample_count(self, run_id: str | None = None) -> int: ...

    def rule_states(self) -> list[tuple[str, str, dict[str, Any]]]: ...

    def alerts(self, run_id: str = "", states: Sequence[int] = (), rule: str = "",
               limit: int = 1000) -> list[AlertRecord]: ...

    def alert_history(self, alert_id: str) -> list[tuple[int, int, float]]: ...

    def close(self) -> None: ...
