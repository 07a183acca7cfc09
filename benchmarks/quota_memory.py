"""What one token can make the server keep in memory, with and without quotas.

Starts ``raresignal server`` in its own process (SQLite in a temporary directory, one
token), then, as one abusive client, opens runs one after another, each asking for
``--series`` series, leaves them open, and finally opens runs with 256 config entries of
4 KiB. Reports the server's RSS growth, the size and time of one /metrics scrape, and
the RSS after a restart on the same file. Quota flags go to the server as they are
(``--no-quotas`` lifts them all).

    python benchmarks/quota_memory.py                      # default quotas
    python benchmarks/quota_memory.py --no-quotas
    python benchmarks/quota_memory.py --runs 40 --series 10000 --max-series-per-token 20000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from raresignal.client.channels import auth_metadata
from raresignal.protos.transport import client_channel_options
from raresignal.protos.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc
from raresignal.server.process import ServerProcess
from raresignal.server.serving.quotas import Quotas

TOKEN = "bench-token"
UNLIMITED = 10**9


def rss_mib(server: ServerProcess) -> float:
    assert server.process is not None
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def scrape(url: str) -> tuple[int, float]:
    started = time.perf_counter()
    size = len(urllib.request.urlopen(url, timeout=120).read())
    return size, time.perf_counter() - started


def drive(target: str, runs: int, series: int, batch: int, metadata_opens: int
          ) -> dict[str, int]:
    """The abuse; the refusals it met, by status code."""
    channel = grpc.insecure_channel(target, client_channel_options())
    ingest = ingest_pb2_grpc.IngestStub(channel)
    metadata = auth_metadata(TOKEN)
    refused: dict[str, int] = {}

    def call(method: object, *args: object) -> object | None:
        try:
            return method(*args, metadata=metadata, timeout=120)  # type: ignore[operator]
        except grpc.RpcError as error:
            refused[error.code().name] = refused.get(error.code().name, 0) + 1
            return None

    def report(batch: ingest_pb2.ReportBatch, **kwargs: object) -> list[object]:
        return list(ingest.Report(iter([batch]), **kwargs))  # type: ignore[arg-type]

    for index in range(runs):
        opened = call(ingest.OpenRun, ingest_pb2.OpenRunRequest(
            run_name=f"abuse-{index}", world_size=1))
        if opened is None:
            continue
        run_id = opened.run_id  # type: ignore[attr-defined]
        for sequence, start in enumerate(range(0, series, batch), 1):
            samples = [common_pb2.Sample(metric="probe_loss", step=1, value=1.0,
                                         labels={"probe": f"p{index}-{i}"}, wall_time=1.0)
                       for i in range(start, min(start + batch, series))]
            call(report, ingest_pb2.ReportBatch(run_id=run_id, sender_id="rank0",
                                                sequence=sequence, samples=samples))
    big = {f"k{i}": "v" * 4096 for i in range(256)}
    for index in range(metadata_opens):
        call(ingest.OpenRun, ingest_pb2.OpenRunRequest(
            run_name=f"abuse-meta-{index}", world_size=1, config=big, tags=big))
    channel.close()
    return refused


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--series", type=int, default=10_000, help="asked for per run")
    parser.add_argument("--batch", type=int, default=5_000, help="samples per batch")
    parser.add_argument("--metadata-opens", type=int, default=150)
    parser.add_argument("--no-quotas", action="store_true")
    for name, value in vars(Quotas()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    args = parser.parse_args()
    os.environ["RARESIGNAL_TOKENS"] = f"{TOKEN}=abuse-*"
    for name in vars(Quotas()):
        value = UNLIMITED if args.no_quotas else getattr(args, name)
        os.environ[f"RARESIGNAL_{name.upper()}"] = str(value)
    with (tempfile.TemporaryDirectory() as work,
          ServerProcess(Path(work) / "bench.db", Path(work)) as server):
        server.start()
        baseline = rss_mib(server)
        started = time.perf_counter()
        refused = drive(server.grpc_target, args.runs, args.series, args.batch,
                        args.metadata_opens)
        driven = time.perf_counter() - started
        after = rss_mib(server)
        size, seconds = scrape(server.metrics_url)
        scraped = rss_mib(server)
        server.stop()
        server.start()
        restarted = rss_mib(server)
    quotas = "off" if args.no_quotas else ", ".join(
        f"{name}={getattr(args, name)}" for name in vars(Quotas()))
    print(f"quotas: {quotas}")
    print(f"drove {args.runs} runs x {args.series} series and {args.metadata_opens} big "
          f"OpenRun in {driven:.1f} s; refused: {refused or 'none'}")
    print(f"RSS MiB: start {baseline:.0f}, after {after:.0f}, after a scrape {scraped:.0f}, "
          f"after a restart {restarted:.0f}")
    print(f"/metrics: {size / 2**20:.2f} MiB in {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
