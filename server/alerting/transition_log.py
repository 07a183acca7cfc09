"""The log line per alert state change, limited so that a storm cannot flood the log.

Each run may log ``lines_per_window`` changes per window; the rest are counted, and one
line says how many were held back once the window is over (on the next change or clock
tick, whichever comes first). Limits are per run, so a flapping run cannot hide the
alerts of the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from raresignal.protos.v1 import common_pb2
from raresignal.server.storage.records import AlertChange


def alert_state_name(state: int) -> str:
    return common_pb2.AlertState.Name(state).removeprefix("ALERT_STATE_").lower()


@dataclass
class _Window:
    started: float
    run_name: str
    logged: int = 0
    held: int = 0


class TransitionLog:
    """Logs alert state changes at INFO, at most ``lines_per_window`` per run per window."""

    def __init__(self, logger: logging.Logger, lines_per_window: int = 20,
                 window_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._limit = lines_per_window
        self._window_seconds = window_seconds
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def record(self, changes: Sequence[AlertChange]) -> None:
        """Logs ``changes`` within each run's limit; called with none, only flushes."""
        now = self._clock()
        self._close_expired(now)
        for change in changes:
            alert = change.alert
            window = self._windows.get(alert.run_id)
            if window is None:
                window = self._windows[alert.run_id] = _Window(now, alert.run_name)
            if window.logged >= self._limit:
                window.held += 1
                continue
            window.logged += 1
            self._logger.info("alert %s: %s %s (run %s, value %.4g, step %d)",
                              alert_state_name(alert.state), alert.rule, alert.labels or "",
                              alert.run_name, alert.value, alert.step)

    def _close_expired(self, now: float) -> None:
        expired = [run_id for run_id, window in self._windows.items()
                   if now - window.started >= self._window_seconds]
        for run_id in expired:
            window = self._windows.pop(run_id)
            if window.held:
                self._logger.info("alert changes of run %s: %d more in %.0f s not logged "
                                  "(limit %d per run)", window.run_name, window.held,
                                  now - window.started, self._limit)
