"""Reading back what the server stored, through its public Runs API."""

from __future__ import annotations

from raresignal.client.channels import open_channel
from raresignal.client.paging import read_series
from raresignal.protos.v1 import alerts_pb2, alerts_pb2_grpc


def get_series(target: str, run_id: str, metric: str,
               labels: dict[str, str] | None = None) -> list[tuple[int, float]]:
    """(step, value) pairs of one stored series, oldest first, via Runs.GetSeries."""
    with open_channel(target) as channel:
        samples = read_series(alerts_pb2_grpc.RunsStub(channel), alerts_pb2.GetSeriesRequest(
            run_id=run_id, metric=metric, labels=labels or {}))
    return [(int(s.step), float(s.value)) for s in samples]


def list_runs(target: str) -> list[object]:
    with open_channel(target) as channel:
        response = alerts_pb2_grpc.RunsStub(channel).ListRuns(
            alerts_pb2.ListRunsRequest(include_finished=True), timeout=10)
    return list(response.runs)
