"""Settings of the monitor runtime: overhead budget, reporting, spool and transport.

The estimator settings live in ``raresignal.agent.estimators.EstimatorConfig``; they are
imported only when the monitor builds its default estimators, so reading this module
stays cheap.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from raresignal.protos.transport import TlsConfig

if TYPE_CHECKING:
    from raresignal.agent.estimators import EstimatorConfig


@dataclass
class MonitorConfig:
    """Everything the runtime needs besides the model: budget, reporting and transport."""

    enabled: bool = True
    # Overhead budget: monitor wall time over training step time.
    target_overhead: float = 0.03
    # Settings of the default estimators; None builds EstimatorConfig() when needed.
    estimator_config: EstimatorConfig | None = None
    # The scheduler may stretch an estimator's interval up to this multiple of its default
    # (its floor cadence when the run's planned length is unknown).
    max_interval_factor: int = 64
    # Cadences from the planned length (see raresignal.agent.cadence): each estimator aims
    # at planned_measurements runs over the planned steps, never more often than every
    # min_planned_interval steps nor less often than its default; the budget may stretch
    # it only while floor_measurements runs remain. The floor is what an alert needs: a
    # rule warms up over a few evaluations and confirms over two or three more, so a
    # signal measured fewer than ~40 times in a run cannot warn ahead of a change that
    # unfolds over a tenth of it.
    planned_measurements: int = 80
    floor_measurements: int = 40
    min_planned_interval: int = 10
    # The budget lowers an estimator's effort (work per run) by halves down to this before
    # it stretches any interval.
    min_effort: float = 0.25
    # Steps between two budget decisions (a fixed cadence so every rank decides together).
    budget_adjust_every_steps: int = 10
    # Steps over which the reported overhead ratio (agent_overhead_ratio: the monitor's
    # time over training time, each estimator's first, cold, run left out) is measured.
    overhead_window_steps: int = 500
    # An expensive estimator that can be resumed (sharpness, Fisher, probes) runs over
    # several steps, each step giving the measurements in flight a slice of this fraction
    # of the smoothed training step time, at least resumable_slice_min_seconds: no step
    # should be delayed by more than twice the median step time or 50 ms, whichever is
    # larger, and a slice may overrun by one unit.
    resumable_slice_fraction: float = 0.5
    resumable_slice_min_seconds: float = 0.05
    # Reporting: samples go out in batches at least this often, and at most batch_size
    # samples to a batch.
    report_interval_seconds: float = 1.0
    batch_size: int = 512
    # When the sender has sent nothing for this long (validation, a checkpoint, a long
    # probe run, a hung loop) it tells the server the process lives and its step; well
    # under the server's least stall window (the RunStalled rule's floor).
    heartbeat_interval_seconds: float = 10.0
    # Steps of measurements waiting for the sender thread before step() starts dropping.
    queue_size: int = 4096
    # Spool: where unsent batches wait while the server is unreachable (None: a per-run
    # folder under the user's cache directory) and how large it may grow.
    spool_dir: str | None = None
    spool_max_bytes: int = 256 * 1024 * 1024
    spool_fsync: bool = True
    # Transport.
    token: str | None = None
    tls: TlsConfig | None = None
    network_timeout_seconds: float = 5.0
    reconnect_initial_seconds: float = 0.5
    reconnect_max_seconds: float = 30.0
    # close() waits at most this long for the spool to drain before giving up.
    close_timeout_seconds: float = 10.0
    # Only this rank talks to the server; every rank measures.
    rank_to_send: int = 0
    # Free-text run metadata sent with OpenRun.
    run_config: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = {
            "target_overhead": 0 < self.target_overhead < 1,
            "max_interval_factor": self.max_interval_factor >= 1,
            "planned_measurements": self.planned_measurements >= 1,
            "floor_measurements": 1 <= self.floor_measurements <= self.planned_measurements,
            "min_planned_interval": self.min_planned_interval >= 1,
            "min_effort": 0 < self.min_effort <= 1,
            "budget_adjust_every_steps": self.budget_adjust_every_steps >= 1,
            "overhead_window_steps": self.overhead_window_steps >= 1,
            "resumable_slice_fraction": self.resumable_slice_fraction > 0,
            "resumable_slice_min_seconds": self.resumable_slice_min_seconds > 0,
            "report_interval_seconds": self.report_interval_seconds > 0,
            "batch_size": self.batch_size >= 1,
            "heartbeat_interval_seconds": self.heartbeat_interval_seconds > 0,
            "queue_size": self.queue_size >= 1,
            "spool_max_bytes": self.spool_max_bytes >= 1024,
            "network_timeout_seconds": self.network_timeout_seconds > 0,
            "reconnect_initial_seconds": self.reconnect_initial_seconds > 0,
            "reconnect_max_seconds": self.reconnect_max_seconds
            >= self.reconnect_initial_seconds,
            "close_timeout_seconds": self.close_timeout_seconds >= 0,
            "rank_to_send": self.rank_to_send >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(f"invalid MonitorConfig: {values}")


def default_spool_root() -> Path:
    """The folder of the per-run spool folders: under the user's cache directory (or the
    temp dir without one)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not os.access(os.path.dirname(base) or ".", os.W_OK):
        base = tempfile.gettempdir()
    return Path(base) / "raresignal" / "spool"


def default_spool_dir(run_name: str) -> Path:
    """A per-run folder under :func:`default_spool_root`."""
    safe_name = re.sub(r"[^A-Za-z0-9_.-]", "_", run_name) or "run"
    return default_spool_root() / safe_name
