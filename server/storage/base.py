"""The storage interface: what the server keeps, and what every backend must implement.

The ledger (the server's single writer) is the only caller. It decides what a batch
means before it reaches storage: the duplicate-sequence check, the series limit and the
alert engine's evaluation all run there, once, for every backend. A backend stores what
it is given atomically and answers the reads below; SQLite (``storage.sqlite``) is the
default.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence, Set
from dataclasses import dataclass
from typing import Any

from raresignal.protos.v1.common_pb2 import ALERT_STATE_RESOLVED
from raresignal.server.storage.records import (
    AlertRecord,
    BatchGroup,
    EngineWrites,
    Evaluation,
    LatestValue,
    RunRecord,
    SeriesKey,
    SeriesPoint,
)

AlertPosition = tuple[float, str]  # (started_at, alert_id) of the last alert a page held


@dataclass(frozen=True)
class RetentionPolicy:
    """Bounds what the server keeps so a month-long run does not grow without end.

    On SQLite, samples are bounded per series. The newest ``full_resolution`` samples of a
    series are kept as they came. Older ones are capped at ``thinned_capacity``: whenever
    they exceed it, every second one is dropped (the oldest always stays), so the
    resolution of old history halves each time and a series never holds more than
    ``full_resolution + thinned_capacity`` samples.

    On PostgreSQL, samples are bounded by age: they are stored in one partition per day,
    and a day's whole partition is dropped once all of it is older than ``max_age_days``
    (0: kept for ever). Rows are never deleted one by one there.

    A run keeps its newest ``alerts_per_run`` resolved alerts with their transitions;
    older resolved ones are deleted as new ones resolve. Open alerts always stay.
    """

    full_resolution: int = 10_000
    thinned_capacity: int = 10_000
    alerts_per_run: int = 10_000
    max_age_days: int = 30

    def __post_init__(self) -> None:
        if (self.full_resolution < 1 or self.thinned_capacity < 2 or self.alerts_per_run < 1
                or self.max_age_days < 0):
            raise ValueError("retention needs full_resolution >= 1, thinned_capacity >= 2, "
                             "alerts_per_run >= 1 and max_age_days >= 0")

    def runs_to_prune(self, alerts: Sequence[AlertRecord]) -> set[str]:
        """The runs whose alert history may have grown past the limit: those with an
        alert that just resolved (only a resolved alert can be deleted)."""
        return {alert.run_id for alert in alerts if alert.state == ALERT_STATE_RESOLVED}

    @property
    def limit(self) -> int:
        return self.full_resolution + self.thinned_capacity


class SequenceConflict(RuntimeError):
    """A sender sequence the group meant to advance is already committed (another writer
    applied the batch); the group was rolled back and nothing of it stored."""


# Feeds a replica's alert engine what it took from the queue, given the runs whose leases it
# still holds; returns the engine's writes.
EvaluateQueued = Callable[[list[Evaluation], set[str]], EngineWrites]


class Storage(ABC):
    """Runs, series, sender sequences, alert-engine state and alerts.

    Exactly-once rests on two promises: :meth:`apply_group` stores a group's samples and
    its senders' new sequences in one transaction (all or nothing), and
    :meth:`last_sequence` answers from what was committed, including after a restart.
    The ledger then drops every batch whose sequence is not above the sender's last.
    """

    @abstractmethod
    def create_run(self, run: RunRecord) -> None: ...

    @abstractmethod
    def update_run(self, run: RunRecord, writes: EngineWrites | None = None) -> None:
        """Stores the run, and ``writes`` with it in the same transaction."""

    @abstractmethod
    def list_runs(self, include_finished: bool) -> list[RunRecord]: ...

    @abstractmethod
    def last_sequence(self, run_id: str, sender_id: str) -> int:
        """Highest sequence committed for the sender (0: none yet)."""

    @abstractmethod
    def last_sequences(self, run_id: str) -> dict[str, int]:
        """:meth:`last_sequence` of every sender of the run."""

    @abstractmethod
    def series_keys(self, run_id: str) -> Set[SeriesKey]:
        """The (metric, labels key) of every series the run has."""

    @abstractmethod
    def apply_group(self, group: BatchGroup) -> None:
        """Stores every batch of the group (its samples, the newest value of each series),
        the runs as they stand after it, its senders' sequences and its engine writes, in
        one transaction. On an error nothing of the group is stored, and it is raised."""

    @abstractmethod
    def latest_values(self, run_id: str | None = None) -> list[LatestValue]:
        """The newest value of every series, or of one run's (by index: a takeover
        reads the run it takes, not every run's)."""

    @abstractmethod
    def get_series(self, run_id: str, metric: str, labels_key: str, since_step: int,
                   limit: int | None = None) -> list[SeriesPoint]:
        """The series' samples from ``since_step`` on, oldest first, at most ``limit``."""

    @abstractmethod
    def rule_states(self, run_id: str | None = None
                    ) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """The alert engine's (run_id, state key, state) rows, of every run or of one, one
        at a time, so a restart never holds them all as raw rows beside the engine's own
        copies."""

    @abstractmethod
    def alerts(self, run_id: str = "", states: Sequence[int] = (), rule: str = "",
               limit: int = 1000, run_ids: Sequence[str] | None = None,
               after: AlertPosition | None = None) -> list[AlertRecord]:
        """Alerts, newest first (by ``started_at``, then ``alert_id``), optionally of one
        run, of the runs in ``run_ids`` (None: every run), in some states, of one rule, and
        only those after ``after`` in that order (the keyset of the next page).

        A backend answers from an index on the order or on the runs, so a caller scoped
        to a few runs reads those runs' alerts only, however many others are stored."""

    @abstractmethod
    def run(self, run_id: str) -> RunRecord | None:
        """The run as stored (None: unknown), whichever writer stored it last."""

    # -- replicas ----------------------------------------------------------------------
    # A backend that several server processes may share says so with ``shared``; the
    # ledger then evaluates alerts only for the runs whose lease it holds, from the queue
    # every replica writes. A backend only one process opens (SQLite) keeps the direct
    # path: the process owns every run and evaluates each batch as it applies it.

    shared: bool = False

    def hold_leases(self, owner: str, ttl_seconds: float,
                    keep_finished_seconds: float = 0.0) -> set[str]:
        """Renews ``owner``'s leases and takes, of those no live replica holds, up to its
        share (the runs open or finished within ``keep_finished_seconds``, by the server
        time they closed against the database's, over the live replicas); returns the runs
        ``owner`` now owns. Unshared: every run not finished."""
        return {run.run_id for run in self.list_runs(include_finished=False)}

    def share_rule_metrics(self, owner: str, metrics: Set[str]) -> frozenset[str]:
        """Records the metrics ``owner``'s alert rules read and returns them together with
        those of the other live replicas: what each replica queues for the runs' owners,
        so an owner whose rules differ (a rules file being rolled out) still gets its
        samples. Unshared: ``metrics``."""
        return frozenset(metrics)

    def resolved_since(self, run_id: str, since: float) -> list[AlertRecord]:
        """The run's alerts resolved at server time ``since`` or later, oldest first."""
        resolved = self.alerts(run_id=run_id, states=(ALERT_STATE_RESOLVED,), limit=1 << 62)
        return sorted((a for a in resolved if a.resolved_at >= since),
                      key=lambda a: (a.resolved_at, a.alert_id))

    def release_leases(self, owner: str) -> None:
        """Gives up ``owner``'s leases (a replica shutting down), so others take its runs
        at their next renewal rather than after the TTL. Unshared: nothing to give up."""
        return None

    def enqueue(self, evaluations: Sequence[Evaluation]) -> None:
        """Queues evaluations for the runs' owners (a shared backend only: the ledger never
        calls it on an unshared one, whose process evaluates each batch as it applies it)."""
        raise TypeError(f"{type(self).__name__} is not shared: it has no evaluation queue")

    def evaluate_queued(self, owner: str, run_ids: Set[str], evaluate: EvaluateQueued,
                        limit: int) -> set[str]:
        """In one transaction: checks ``owner`` still holds the runs' leases, takes (and
        deletes) up to ``limit`` of their queued evaluations in queue order, passes them
        and the runs still held to ``evaluate`` (even with none, so the clock rules run)
        and stores the writes it returns. Returns the runs whose lease ``owner`` no longer
        holds (nothing of them is taken). On an error nothing is taken or stored, and it
        is raised. A shared backend only."""
        raise TypeError(f"{type(self).__name__} is not shared: it has no evaluation queue")

    def maintain(self, now: float) -> object | None:
        """Housekeeping a backend runs on a schedule, at server time ``now`` (PostgreSQL:
        prepares and drops the samples' daily partitions); returns what it did, or None
        when it did nothing. The default (SQLite, which thins as it writes) does nothing."""
        return None

    def ping(self) -> None:
        """Raises when the database cannot be reached. May be called from any thread. An
        embedded file database is always reachable: the default does nothing."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Releases the database; closing it again does nothing."""
