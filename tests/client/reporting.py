"""Runs put into a real server as a training job would, for the client tests to read."""

from __future__ import annotations

from collections.abc import Sequence

from raresignal.client.channels import auth_metadata, open_channel
from raresignal.protos.transport import TlsConfig
from raresignal.protos.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc

# (metric, step, value), or (metric, step, value, labels)
SampleSpec = tuple[str, int, float] | tuple[str, int, float, dict[str, str]]


def _sample(spec: SampleSpec) -> common_pb2.Sample:
    metric, step, value = spec[:3]
    labels = spec[3] if len(spec) == 4 else {}
    return common_pb2.Sample(metric=metric, step=step, value=value, labels=labels,
                             wall_time=1_700_000_000.0 + step)


def report_run(target: str, run_name: str, samples: Sequence[SampleSpec],
               token: str | None = None, tls: TlsConfig | None = None,
               finished: bool = False) -> str:
    """Opens a run named ``run_name``, reports ``samples`` in one batch and returns the
    run's id; the run stays open, as a run still training, unless ``finished``."""
    metadata = auth_metadata(token)
    with open_channel(target, tls) as channel:
        ingest = ingest_pb2_grpc.IngestStub(channel)
        run_id = ingest.OpenRun(ingest_pb2.OpenRunRequest(run_name=run_name, world_size=1),
                                metadata=metadata, timeout=10).run_id
        batch = ingest_pb2.ReportBatch(
            run_id=run_id, sender_id="rank0-test", sequence=1,
            samples=[_sample(spec) for spec in samples])
        list(ingest.Report(iter([batch]), metadata=metadata, timeout=20))
        if finished:
            ingest.CloseRun(ingest_pb2.CloseRunRequest(
                run_id=run_id, state=common_pb2.RUN_STATE_COMPLETED),
                metadata=metadata, timeout=10)
    return run_id
