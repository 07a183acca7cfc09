"""Pushes alerts to Alertmanager's v2 API, off the event loop, with retry and backoff.

Firing alerts are posted when they fire and re-posted periodically (Alertmanager treats an
alert it has not heard of for its resolve_timeout as resolved); resolved alerts are posted
once with ``endsAt``.
"""

from __future__ import annotations

import json
import logging
import queue
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from prometheus_client import Counter

from raresignal.protos.v1 import common_pb2
from raresignal.server.storage.records import AlertRecord

log = logging.getLogger("raresignal.server")

API_PATH = "/api/v2/alerts"


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def alert_payload(alert: AlertRecord, generator_url: str) -> dict[str, Any]:
    """One alert in Alertmanager's v2 ``postableAlert`` form."""
    payload: dict[str, Any] = {
        "labels": {
            **alert.labels,
            "alertname": alert.rule,
            "run": alert.run_name,
            "run_id": alert.run_id,
            "severity": alert.severity,
            "service": "raresignal",
        },
        "annotations": {
            "summary": alert.summary,
            "value": f"{alert.value:.6g}",
            "threshold": f"{alert.threshold:.6g}",
            "step": str(alert.step),
        },
        "startsAt": _timestamp(alert.fired_at or alert.started_at),
        "generatorURL": generator_url,
    }
    if alert.state == common_pb2.ALERT_STATE_RESOLVED:
        payload["endsAt"] = _timestamp(alert.resolved_at)
    return payload


def alerts_endpoint(url: str) -> str:
    """The POST endpoint for a base URL (``http://am:9093``) or the full API URL."""
    url = url.rstrip("/")
    return url if url.endswith(API_PATH) else url + API_PATH


class AlertmanagerNotifier:
    """A worker thread that posts queued alerts; POSTs are batched and retried."""

    def __init__(self, url: str, counter: Counter, generator_url: str, *,
                 max_attempts: int = 5, initial_backoff_seconds: float = 0.5,
                 timeout_seconds: float = 5.0, headers: Mapping[str, str] | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.endpoint = alerts_endpoint(url)
        # Extra headers (Authorization) and the TLS context an https endpoint is verified
        # with; neither is ever logged.
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        self._ssl_context = ssl_context
        self._counter = counter
        self._generator_url = generator_url
        self._max_attempts = max_attempts
        self._backoff = initial_backoff_seconds
        self._timeout = timeout_seconds
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._work, name="raresignal-alertmanager",
                                        daemon=True)
        self._thread.start()

    def notify(self, alerts: Sequence[AlertRecord]) -> None:
        """Queues firing and resolved alerts (pending ones are not Alertmanager's business)."""
        for alert in alerts:
            if alert.state == common_pb2.ALERT_STATE_FIRING or (
                    alert.state == common_pb2.ALERT_STATE_RESOLVED and alert.fired_at):
                self._queue.put(alert_payload(alert, self._generator_url))

    def close(self, timeout_seconds: float = 10.0) -> None:
        """Sends what is queued (within the timeout), then stops the worker."""
        self._queue.put(None)
        self._thread.join(timeout_seconds)
        self._stopping.set()
        self._thread.join(1.0)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            batch = [] if item is None else [item]
            done = item is None
            while not done:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    done = True
                else:
                    batch.append(more)
            if batch:
                self._post(batch)
            if done:
                return

    def _post(self, batch: list[dict[str, Any]]) -> None:
        body = json.dumps(batch).encode()
        delay = self._backoff
        for attempt in range(1, self._max_attempts + 1):
            request = urllib.request.Request(self.endpoint, data=body, method="POST",
                                             headers=self._headers)
            try:
                with urllib.request.urlopen(request, timeout=self._timeout,
                                            context=self._ssl_context) as response:
                    response.read()
                self._counter.labels("sent").inc()
                return
            except (urllib.error.URLError, OSError) as exc:
                detail = exc
                if isinstance(exc, urllib.error.HTTPError) and 400 <= exc.code < 500:
                    log.error("alertmanager refused %d alert(s): HTTP %d %s", len(batch),
                              exc.code, exc.read()[:200].decode(errors="replace"))
                    break  # a client error will not heal on retry
            if attempt < self._max_attempts:
                self._counter.labels("retried").inc()
                log.warning("alertmanager POST to %s failed (%s); retry %d in %.1f s",
                            self.endpoint, detail, attempt, delay)
                if self._stopping.wait(delay):
                    break
                delay *= 2
        self._counter.labels("failed").inc()
        log.error("alertmanager: gave up sending %d alert(s) to %s", len(batch), self.endpoint)
