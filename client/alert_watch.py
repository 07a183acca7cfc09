"""Following the server's alerts from a training script.

A background thread holds one ``raresignal.v1.Alerts/WatchAlerts`` stream and hands every
alert state change to a callback, so a script can print alerts the moment they fire
without polling. The stream starts with the alerts already pending or firing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc

from raresignal.client.channels import auth_metadata, open_channel
from raresignal.protos.transport import TlsConfig
from raresignal.protos.v1 import alerts_pb2, alerts_pb2_grpc, common_pb2

AlertCallback = Callable[[alerts_pb2.AlertEvent], None]


class AlertWatcher:
    """Watches the alerts of one run (or every run) on a background thread.

    ``events`` keeps every event received, in order; ``on_event`` is called for each as it
    arrives. ``stop()`` cancels the stream and joins the thread. ``token`` and ``tls`` are
    what the server requires, as for any other client.
    """

    def __init__(self, target: str, run_id: str = "", on_event: AlertCallback | None = None,
                 token: str | None = None, tls: TlsConfig | None = None) -> None:
        self.target = target
        self.run_id = run_id
        self.on_event = on_event
        self.events: list[alerts_pb2.AlertEvent] = []
        self.error: grpc.RpcError | None = None
        self._metadata = auth_metadata(token)
        self._channel = open_channel(target, tls)
        self._call: grpc.Future | None = None
        self._started = threading.Event()
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._watch, name="raresignal-alerts",
                                        daemon=True)

    def start(self, timeout: float = 10.0) -> AlertWatcher:
        """Opens the stream and waits until the server has accepted it."""
        self._thread.start()
        grpc.channel_ready_future(self._channel).result(timeout=timeout)
        self._started.wait(timeout)
        return self

    def _watch(self) -> None:
        stub = alerts_pb2_grpc.AlertsStub(self._channel)
        request = alerts_pb2.WatchAlertsRequest(filter=alerts_pb2.AlertFilter(run_id=self.run_id))
        with self._lock:
            if self._stopping:
                return
            self._call = stub.WatchAlerts(request, metadata=self._metadata)
        self._started.set()
        try:
            for event in self._call:
                self.events.append(event)
                if self.on_event is not None:
                    self.on_event(event)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.error = error

    def fired(self) -> list[alerts_pb2.Alert]:
        """Alerts that reached FIRING, in the order they fired."""
        return [event.alert for event in self.events
                if event.alert.state == common_pb2.ALERT_STATE_FIRING]

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            if self._call is not None:
                self._call.cancel()
        self._thread.join(timeout=10)
        self._channel.close()

    def __enter__(self) -> AlertWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
