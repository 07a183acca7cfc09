"""Where the data commands read a run from: a server over gRPC, or a server's SQLite file.

Both answer in the wire messages (``RunInfo``, ``SeriesInfo``, ``Sample``, ``Alert``), so
the commands print, export and draw the same way whichever they read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import grpc

from raresignal.client.channels import auth_metadata
from raresignal.client.paging import follow_pages, read_series
from raresignal.protos.v1 import alerts_pb2, alerts_pb2_grpc, common_pb2

REQUEST_TIMEOUT_SECONDS = 30.0


class RunNotFound(LookupError):
    """No run has that id or name."""


class RunSource(Protocol):
    """What the data commands read."""

    def runs(self) -> list[common_pb2.RunInfo]:
        """Every run, finished ones included, oldest first."""

    def series(self, run_id: str) -> list[alerts_pb2.SeriesInfo]:
        """The run's series, by metric then label set."""

    def samples(self, run_id: str, metric: str, labels: Mapping[str, str],
                since_step: int = 0) -> list[common_pb2.Sample]:
        """One series' samples from ``since_step`` on, oldest first."""

    def alerts(self, run_id: str) -> list[common_pb2.Alert]:
        """The run's alerts, newest first."""

    def close(self) -> None: ...


def find_run(source: RunSource, reference: str) -> common_pb2.RunInfo:
    """The run whose id is ``reference``, else the newest run of that name."""
    runs = source.runs()
    for run in runs:
        if run.run_id == reference:
            return run
    named = [run for run in runs if run.run_name == reference]
    if not named:
        raise RunNotFound(f"no run has the id or name {reference!r}")
    return named[-1]


class ServerSource:
    """A server's Runs and Alerts services, every list followed to its last page."""

    def __init__(self, channel: grpc.Channel, token: str | None = None) -> None:
        self._channel = channel
        self._runs = alerts_pb2_grpc.RunsStub(channel)
        self._alerts = alerts_pb2_grpc.AlertsStub(channel)
        self._metadata = auth_metadata(token)

    def runs(self) -> list[common_pb2.RunInfo]:
        def fetch(token: str, page_size: int) -> tuple[Sequence[common_pb2.RunInfo], str]:
            response = self._runs.ListRuns(
                alerts_pb2.ListRunsRequest(include_finished=True, page_size=page_size,
                                           page_token=token),
                metadata=self._metadata, timeout=REQUEST_TIMEOUT_SECONDS)
            return response.runs, response.next_page_token

        return list(follow_pages(fetch))

    def series(self, run_id: str) -> list[alerts_pb2.SeriesInfo]:
        def fetch(token: str, page_size: int) -> tuple[Sequence[alerts_pb2.SeriesInfo], str]:
            response = self._runs.ListSeries(
                alerts_pb2.ListSeriesRequest(run_id=run_id, page_size=page_size,
                                             page_token=token),
                metadata=self._metadata, timeout=REQUEST_TIMEOUT_SECONDS)
            return response.series, response.next_page_token

        return list(follow_pages(fetch))

    def samples(self, run_id: str, metric: str, labels: Mapping[str, str],
                since_step: int = 0) -> list[common_pb2.Sample]:
        request = alerts_pb2.GetSeriesRequest(run_id=run_id, metric=metric, labels=labels,
                                              since_step=since_step)
        return read_series(self._runs, request, self._metadata, REQUEST_TIMEOUT_SECONDS)

    def alerts(self, run_id: str) -> list[common_pb2.Alert]:
        def fetch(token: str, page_size: int) -> tuple[Sequence[common_pb2.Alert], str]:
            response = self._alerts.ListAlerts(
                alerts_pb2.ListAlertsRequest(filter=alerts_pb2.AlertFilter(run_id=run_id),
                                             page_size=page_size, page_token=token),
                metadata=self._metadata, timeout=REQUEST_TIMEOUT_SECONDS)
            return response.alerts, response.next_page_token

        return list(follow_pages(fetch))

    def close(self) -> None:
        self._channel.close()
