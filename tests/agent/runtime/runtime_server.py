"""Reading the real server back for the runtime tests (the server itself runs as
:class:`raresignal.server.process.ServerProcess`, so it can be killed)."""

from __future__ import annotations

from raresignal.client.channels import auth_metadata, open_channel
from raresignal.client.paging import read_series
from raresignal.protos.v1 import alerts_pb2, alerts_pb2_grpc


def stored_series(target: str, run_id: str, metric: str = "loss",
                  token: str | None = None) -> dict[int, float]:
    """step -> value of one unlabelled series, read back with Runs.GetSeries."""
    with open_channel(target) as channel:
        samples = read_series(alerts_pb2_grpc.RunsStub(channel),
                              alerts_pb2.GetSeriesRequest(run_id=run_id, metric=metric),
                              metadata=auth_metadata(token))
    steps = [s.step for s in samples]
    assert len(steps) == len(set(steps)), "a step is stored twice"
    return {s.step: s.value for s in samples}
