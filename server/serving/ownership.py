"""Which runs this replica evaluates: its leases, and when to renew them.

Only for a shared backend (PostgreSQL): each run's alert evaluation belongs to the one
replica holding its lease. The owner renews every ``heartbeat_seconds``; a lease not
renewed for ``ttl_seconds`` (its replica died or lost the database) is taken by the next
replica that renews its own. Alerts of a dead replica's runs therefore flow again at most
``ttl_seconds + heartbeat_seconds`` after its last renewal, plus one clock interval for the
new owner's first evaluation.

A renewal takes at most this replica's share of the runs, ceil(runs / live replicas), so
runs opened while several replicas are live spread over them; leases held are never
handed over to even the shares out, so a replica started next to busy ones gets runs as
new ones open and old leases expire.

Alertmanager hears each transition from the owner that stored it. An owner that dies
between storing a transition and posting it leaves Alertmanager behind, so a new owner
posts the taken run's firing alerts at once and its alerts resolved within
``undelivered_seconds`` again; Alertmanager deduplicates by labels, so a second post of
an alert it has heard is the same alert, not a new one.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field


def new_replica_id() -> str:
    """A name unique to this process, readable in the lease table: host, pid, random."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass
class Ownership:
    """This replica's name, lease settings and the runs it owns now."""

    replica_id: str
    ttl_seconds: float
    heartbeat_seconds: float
    clock: Callable[[], float] = time.monotonic
    owned: set[str] = field(default_factory=set)
    _renewed_at: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_seconds < self.ttl_seconds:
            raise ValueError("the lease heartbeat must be shorter than the lease TTL, or a "
                             "live replica's leases expire between two renewals")

    @property
    def undelivered_seconds(self) -> float:
        """How far back a taken-over run's resolutions are posted again. A dead owner
        stored its last one at most a TTL and a heartbeat (and a clock tick) before the
        successor's takeover; twice that also covers skew between the replicas' clocks,
        which stamp the resolution and the takeover, and a post too many is harmless."""
        return 2.0 * (self.ttl_seconds + self.heartbeat_seconds)

    def renewal_due(self) -> bool:
        return self._renewed_at is None or self.clock() - self._renewed_at >= self.heartbeat_seconds

    def renewed(self) -> None:
        self._renewed_at = self.clock()
