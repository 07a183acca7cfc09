"""Logging that cannot flood a training log: the first occurrence of each kind of failure
is logged in full, later ones at most once per period, with how many were held back."""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedLog:
    """Logs each key once, then at most once per ``period_seconds``."""

    def __init__(self, logger: logging.Logger, period_seconds: float = 60.0) -> None:
        self._logger = logger
        self._period = period_seconds
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, message: str, *args: object, exc_info: bool = False) -> bool:
        """Logs unless ``key`` was logged within the period; True when it logged."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._period:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            held = self._held.pop(key, 0)
            self._last[key] = now
        if held:
            message += f" ({held} similar messages held back)"
        # Only the first occurrence carries the traceback; repeats would only add noise.
        self._logger.warning(message, *args, exc_info=exc_info and last is None)
        return True
