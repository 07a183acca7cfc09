"""Readiness that follows the database: the API services report NOT_SERVING on the health
port while the database cannot be reached, and SERVING again once it can.

Kubernetes' readiness probe asks for the ingest service by name, so a replica that lost
its database leaves the Service's endpoints and agents dial another replica (or spool
until one is back), while the liveness probe asks for the overall status (""), which stays
SERVING: restarting a process whose database is down would not bring the database back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from grpc_health.v1 import health, health_pb2

log = logging.getLogger("raresignal.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class DatabaseReadiness:
    """Pings the database every ``interval_seconds`` (in a worker thread: the ping blocks)
    and sets ``service_names`` on ``servicer`` from the outcome."""

    def __init__(self, ping: Callable[[], None], servicer: health.aio.HealthServicer,
                 service_names: Sequence[str], interval_seconds: float) -> None:
        if interval_seconds <= 0:
            raise ValueError(f"interval_seconds must be positive, got {interval_seconds}")
        self._ping = ping
        self._servicer = servicer
        self._service_names = tuple(service_names)
        self._interval = interval_seconds
        self.reachable = True

    async def check_once(self) -> bool:
        """One ping; updates the health statuses when reachability changed."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._ping)
            reachable, reason = True, ""
        except Exception as error:  # any failure to reach or query the database
            reachable, reason = False, f"{type(error).__name__}: {error}"
        if reachable != self.reachable:
            self.reachable = reachable
            status = SERVING if reachable else NOT_SERVING
            for name in self._service_names:
                await self._servicer.set(name, status)
            if reachable:
                log.warning("database reachable again: ready")
            else:
                log.error("database unreachable, not ready until it is back: %s", reason)
        return reachable

    async def run(self) -> None:
        """Checks until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            await self.check_once()
