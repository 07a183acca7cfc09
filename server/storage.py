"""What the server keeps, behind one small interface.

SQLite is the default backend (server.sqlite_store); the interface is narrow enough that a
PostgreSQL backend serving several replicas can implement it later without touching the
ingest path or the alert engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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

    def latest_values(self) -> list[LatestValue]: ...

    def get_series(self, run_id: str, metric: str, labels_key: str,
                   since_step: int) -> list[SeriesPoint]: ...

    def sample_count(self, run_id: str | None = None) -> int: ...

    def rule_states(self) -> list[tuple[str, str, dict[str, Any]]]: ...

    def alerts(self, run_id: str = "", states: Sequence[int] = (), rule: str = "",
               limit: int = 1000) -> list[AlertRecord]: ...

    def alert_history(self, alert_id: str) -> list[tuple[int, int, float]]: ...

    def close(self) -> None: ...
