"""Sustained ingest load on the raresignal server, over loopback gRPC.

Starts ``raresignal server`` in a separate process (its own SQLite file in a temporary
directory), then for each concurrency level drives that many senders from one asyncio
client process. Each sender streams report batches on its own run and keeps one batch in
flight, so the ack latency is the server's time to validate, evaluate rules, commit and
answer. Prints samples/s, batches/s and p50/p99 ack latency per level.

    python benchmarks/ingest.py                       # 1, 16 and 128 senders, 5 s each
    python benchmarks/ingest.py --senders 16 --seconds 20 --batch-size 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from raresignal.protos.transport import client_channel_options
from raresignal.protos.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc

# Ten series per step, four of them under default alert rules, so the rule engine works.
SERIES: tuple[tuple[str, dict[str, str]], ...] = (
    ("loss", {}), ("grad_norm", {}), ("learning_rate", {}), ("update_to_weight_ratio", {}),
    ("step_duration_seconds", {}), ("sharpness_ratio", {}),
    ("probe_retention", {"probe": "rare"}), ("probe_retention", {"probe": "common"}),
    ("probe_fisher_mass_ratio", {"probe": "rare"}), ("probe_loss", {"probe": "rare"}),
)


@dataclass
class LevelResult:
    senders: int
    seconds: float
    batches: int
    samples: int
    latencies: list[float]

    def row(self) -> str:
        ordered = sorted(self.latencies)
        p50 = statistics.median(ordered) * 1e3
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3
        return (f"{self.senders:>7}  {self.samples / self.seconds:>12,.0f}  "
                f"{self.batches / self.seconds:>10,.1f}  {p50:>8.2f}  {p99:>8.2f}")


def start_server(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    ready = directory / "ready.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "raresignal.server.cli", "server", "--db",
         str(directory / "bench.db"), "--host", "127.0.0.1", "--grpc-port", "0",
         "--metrics-port", "0", "--health-port", "0", "--ready-file", str(ready),
         "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("server did not start: " + process.stderr.read().decode()[-2000:])
        time.sleep(0.05)
    return process, json.loads(ready.read_text())["grpc"]


def make_batch(run_id: str, sender: str, sequence: int, steps: int) -> ingest_pb2.ReportBatch:
    first = (sequence - 1) * steps
    now = time.time()
    return ingest_pb2.ReportBatch(run_id=run_id, sender_id=sender, sequence=sequence, samples=[
        common_pb2.Sample(metric=metric, labels=labels, step=step,
                          value=0.5 + 0.001 * (step % 100), wall_time=now)
        for step in range(first, first + steps) for metric, labels in SERIES])


class BatchSource:
    """Serialized batches of one sender, built before the clock starts (and more on
    demand), so the measurement is the server's work, not the client's protobuf encoding."""

    def __init__(self, run_id: str, sender_id: str, steps: int, prebuilt: int) -> None:
        self.run_id, self.sender_id, self.steps = run_id, sender_id, steps
        self.blobs = [self._build(seq) for seq in range(1, prebuilt + 1)]

    def _build(self, sequence: int) -> bytes:
        return make_batch(self.run_id, self.sender_id, sequence, self.steps).SerializeToString()

    def get(self, sequence: int) -> bytes:
        while len(self.blobs) < sequence:
            self.blobs.append(self._build(len(self.blobs) + 1))
        return self.blobs[sequence - 1]


async def open_run(stub: ingest_pb2_grpc.IngestStub, name: str) -> str:
    opened = await stub.OpenRun(ingest_pb2.OpenRunRequest(
        run_name=name, world_size=1, report_interval_seconds=60.0))
    return opened.run_id


async def sender(channel: grpc.aio.Channel, source: BatchSource, until: float,
                 latencies: list[float], counts: list[int]) -> None:
    report = channel.stream_stream("/raresignal.v1.Ingest/Report",
                                   request_serializer=None,  # bytes as they are
                                   response_deserializer=ingest_pb2.ReportAck.FromString)
    call = report()
    sequence = 0
    while time.monotonic() < until:
        sequence += 1
        blob = source.get(sequence)
        started = time.perf_counter()
        await call.write(blob)
        ack = await call.read()
        latencies.append(time.perf_counter() - started)
        if ack.outcome != ingest_pb2.ReportAck.OUTCOME_APPLIED:
            raise RuntimeError(f"batch {sequence} of {source.sender_id} not applied: {ack}")
        counts[0] += 1
        counts[1] += ack.samples_applied
    await call.done_writing()


async def run_level(target: str, senders: int, seconds: float, batch_size: int,
                    level: int) -> LevelResult:
    steps = max(1, batch_size // len(SERIES))
    channels = [grpc.aio.insecure_channel(target, client_channel_options())
                for _ in range(min(senders, 8))]
    stub = ingest_pb2_grpc.IngestStub(channels[0])
    run_ids = [await open_run(stub, f"bench-{level}-{i}") for i in range(senders)]
    # Enough for 500 batches/s in total, more than this server reaches on a small machine.
    prebuilt = int(500 * seconds / senders) + 2
    sources = [BatchSource(run_id, f"bench-{level}-{i}-s", steps, prebuilt)
               for i, run_id in enumerate(run_ids)]
    latencies: list[float] = []
    counts = [0, 0]
    started = time.monotonic()
    until = started + seconds
    await asyncio.gather(*(
        sender(channels[i % len(channels)], source, until, latencies, counts)
        for i, source in enumerate(sources)))
    elapsed = time.monotonic() - started
    for channel in channels:
        await channel.close()
    return LevelResult(senders, elapsed, counts[0], counts[1], latencies)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Sustained ingest throughput and ack latency of the raresignal server "
                    "(separate process, loopback gRPC, SQLite in WAL mode).",
        epilog="example: python benchmarks/ingest.py --senders 1 16 128 --seconds 5",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 16, 128],
                        help="concurrency levels to measure (default: 1 16 128)")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each level")
    parser.add_argument("--batch-size", type=int, default=500,
                        help="samples per batch (default 500: 50 steps x 10 series)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="raresignal-bench-") as tmp:
        process, target = start_server(Path(tmp))
        try:
            print(f"server {target} (pid {process.pid}), {os.cpu_count()} CPUs, batches of "
                  f"{max(1, args.batch_size // len(SERIES)) * len(SERIES)} samples, "
                  f"{args.seconds:g} s per level")
            print(f"{'senders':>7}  {'samples/s':>12}  {'batches/s':>10}  {'p50 ms':>8}  "
                  f"{'p99 ms':>8}")
            for level, senders in enumerate(args.senders):
                result = asyncio.run(run_level(target, senders, args.seconds, args.batch_size,
                                               level))
                print(result.row(), flush=True)
        finally:
            process.terminate()
            process.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
