"""Sustained ingest load on the raresignal server, over loopback gRPC.

Starts ``raresignal server`` in a separate process (its own SQLite file in a temporary
directory), then for each concurrency level drives that many senders, each streaming
report batches on its own run, from one or more client processes. Two ways to load it:

* closed loop (default): each sender keeps one batch in flight and sends the next as
  soon as the ack comes, so the server runs flat out. Latency then follows from
  throughput (Little's law: p50 ≈ senders × batch size ÷ samples/s), so this mode
  measures capacity.
* paced (``--rate``): the senders together offer a fixed number of samples per second,
  each on its own schedule, as training processes do. Latency is measured from the
  moment a batch was due, not when it went out, so a server that falls behind cannot
  hide it (no coordinated omission). This mode measures ack latency at a given load.

``--null-server`` replaces the raresignal server by one that acks every batch unread:
what it measures is the ceiling of this client harness on this machine.

``--compare-backends`` runs the same load against three set-ups in turn: SQLite (one
server), PostgreSQL with one replica, and PostgreSQL with two replicas (the senders split
between them), on a throwaway cluster; beside samples/s it reports the CPU seconds per
1,000 stored samples of the replica processes and, separately, of PostgreSQL's processes
(the postmaster and its children), and how busy each side was.

    python benchmarks/ingest.py                        # 1, 16 and 128 senders, 5 s each
    python benchmarks/ingest.py --senders 16 --rate 100000
    python benchmarks/ingest.py --senders 16 --null-server
    python benchmarks/ingest.py --senders 16 --compare-backends
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from raresignal.client.channels import open_aio_channel
from raresignal.protos.transport import server_options
from raresignal.protos.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc

# Ten series per step, four of them under default alert rules, so the rule engine works.
SERIES: tuple[tuple[str, dict[str, str]], ...] = (
    ("loss", {}), ("grad_norm", {}), ("learning_rate", {}), ("update_to_weight_ratio", {}),
    ("step_duration_seconds", {}), ("sharpness_ratio", {}),
    ("probe_retention", {"probe": "rare"}), ("probe_retention", {"probe": "common"}),
    ("probe_fisher_mass_ratio", {"probe": "rare"}), ("probe_loss", {"probe": "rare"}),
)
REPORT_METHOD = "/raresignal.v1.Ingest/Report"
# Closed loop: batches built ahead per second of measurement, above what this server
# reaches on a small machine (more are built on demand, on the clock).
CLOSED_LOOP_BATCHES_PER_SECOND = 1000


@dataclass
class LevelResult:
    senders: int
    seconds: float
    batches: int = 0
    samples: int = 0
    latencies: list[float] = field(default_factory=list)

    def merge(self, other: LevelResult) -> None:
        self.seconds = max(self.seconds, other.seconds)
        self.batches += other.batches
        self.samples += other.samples
        self.latencies += other.latencies

    def row(self) -> str:
        ordered = sorted(self.latencies) or [float("nan")]
        p50 = statistics.median(ordered) * 1e3
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3
        return (f"{self.senders:>7}  {self.samples / self.seconds:>12,.0f}  "
                f"{self.batches / self.seconds:>10,.1f}  {p50:>8.2f}  {p99:>8.2f}")


def start_process(directory: Path, command: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    """Starts a server process that writes its endpoints to a ready file; its target."""
    ready = directory / "ready.json"
    ready.unlink(missing_ok=True)
    process = subprocess.Popen([*command, "--ready-file", str(ready)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("server did not start: " + process.stderr.read().decode()[-2000:])
        time.sleep(0.05)
    return process, json.loads(ready.read_text())["grpc"]


def raresignal_server_command(directory: Path, db: str | None = None) -> list[str]:
    return [sys.executable, "-m", "raresignal.server.cli", "server", "--db",
            db or str(directory / "bench.db"), "--host", "127.0.0.1", "--grpc-port", "0",
            "--metrics-port", "0", "--health-port", "0", "--log-level", "WARNING",
            # Every level's runs stay open under the one (absent) token: no quota applies.
            "--max-runs-per-token", "1000000", "--max-open-runs-per-token", "1000000"]


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
        # Later batches rewrite the numbers of this one: much faster than building anew.
        self._template = make_batch(run_id, sender_id, 1, steps)
        self.blobs = [self._build(seq) for seq in range(1, prebuilt + 1)]

    def _build(self, sequence: int) -> bytes:
        batch = self._template
        batch.sequence = sequence
        first = (sequence - 1) * self.steps
        now = time.time()
        for index, sample in enumerate(batch.samples):
            step = first + index // len(SERIES)
            sample.step = step
            sample.value = 0.5 + 0.001 * (step % 100)
            sample.wall_time = now
        return batch.SerializeToString()

    def get(self, sequence: int) -> bytes:
        while len(self.blobs) < sequence:
            self.blobs.append(self._build(len(self.blobs) + 1))
        return self.blobs[sequence - 1]


def open_report(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
    report = channel.stream_stream(REPORT_METHOD,
                                   request_serializer=None,  # bytes as they are
                                   response_deserializer=ingest_pb2.ReportAck.FromString)
    return report()


def _check_ack(ack: ingest_pb2.ReportAck, source: BatchSource) -> None:
    if ack.outcome != ingest_pb2.ReportAck.OUTCOME_APPLIED:
        raise RuntimeError(f"batch {ack.sequence} of {source.sender_id} not applied: {ack}")


async def closed_loop_sender(channel: grpc.aio.Channel, source: BatchSource, until: float,
                             result: LevelResult) -> None:
    """One batch in flight: the next goes out when the previous one is acknowledged."""
    call = open_report(channel)
    sequence = 0
    while time.perf_counter() < until:
        sequence += 1
        blob = source.get(sequence)
        started = time.perf_counter()
        await call.write(blob)
        ack = await call.read()
        result.latencies.append(time.perf_counter() - started)
        _check_ack(ack, source)
        result.batches += 1
        result.samples += ack.samples_applied
    await call.done_writing()


async def paced_sender(channel: grpc.aio.Channel, source: BatchSource, first_due: float,
                       until: float, interval: float, result: LevelResult) -> None:
    """Sends a batch every ``interval`` seconds whatever the acks do; latency counts from
    when each batch was due."""
    call = open_report(channel)
    due: dict[int, float] = {}

    async def read_acks(acks: AsyncIterator[ingest_pb2.ReportAck]) -> None:
        async for ack in acks:
            result.latencies.append(time.perf_counter() - due.pop(ack.sequence))
            _check_ack(ack, source)
            result.batches += 1
            result.samples += ack.samples_applied

    reader = asyncio.create_task(read_acks(call.__aiter__()))
    sequence, when = 0, first_due
    while when < until:
        await asyncio.sleep(max(0.0, when - time.perf_counter()))
        sequence += 1
        due[sequence] = when
        await call.write(source.get(sequence))
        when += interval
    await call.done_writing()
    await reader


async def open_runs(target: str, names: list[str]) -> list[str]:
    async with open_aio_channel(target) as channel:
        stub = ingest_pb2_grpc.IngestStub(channel)
        return [(await stub.OpenRun(ingest_pb2.OpenRunRequest(
            run_name=name, world_size=1, report_interval_seconds=60.0))).run_id
            for name in names]


@dataclass(frozen=True)
class ClientPlan:
    """What one client process does: its senders' runs, and when and how fast."""

    target: str
    run_ids: list[str]
    sender_names: list[str]
    steps: int
    seconds: float
    rate_per_sender: float  # batches/s; 0: closed loop
    stagger: list[float]  # paced: each sender's first send, after the common start
    start_at: float  # time.time() at which every process starts sending


def run_client(plan: ClientPlan) -> LevelResult:
    return asyncio.run(_run_client(plan))


async def _run_client(plan: ClientPlan) -> LevelResult:
    senders = len(plan.run_ids)
    if plan.rate_per_sender:
        prebuilt = int(plan.rate_per_sender * plan.seconds) + 2
    else:
        prebuilt = int(CLOSED_LOOP_BATCHES_PER_SECOND * plan.seconds / max(1, senders)) + 2
    sources = [BatchSource(run_id, name, plan.steps, prebuilt)
               for run_id, name in zip(plan.run_ids, plan.sender_names, strict=True)]
    channels = [open_aio_channel(plan.target) for _ in range(min(senders, 8))]
    result = LevelResult(senders, plan.seconds)
    await asyncio.sleep(max(0.0, plan.start_at - time.time()))
    started = time.perf_counter()
    until = started + plan.seconds
    if plan.rate_per_sender:
        interval = 1.0 / plan.rate_per_sender
        tasks = [paced_sender(channels[i % len(channels)], source, started + plan.stagger[i],
                              until, interval, result) for i, source in enumerate(sources)]
    else:
        tasks = [closed_loop_sender(channels[i % len(channels)], source, until, result)
                 for i, source in enumerate(sources)]
    await asyncio.gather(*tasks)
    result.seconds = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    return result


def run_level(targets: list[str], senders: int, args: argparse.Namespace,
              level: int) -> LevelResult:
    """One level: ``senders`` senders split round-robin over ``targets`` (replicas)."""
    steps = max(1, args.batch_size // len(SERIES))
    names = [f"bench-{level}-{i}" for i in range(senders)]
    # Each sender's run is opened on the replica it will report to.
    by_target = {target: asyncio.run(open_runs(target, names[t::len(targets)]))
                 for t, target in enumerate(targets)}
    run_ids = [by_target[targets[i % len(targets)]][i // len(targets)] for i in range(senders)]
    sender_targets = [targets[i % len(targets)] for i in range(senders)]
    rate_per_sender = args.rate / (steps * len(SERIES)) / senders if args.rate else 0.0
    interval = 1.0 / rate_per_sender if rate_per_sender else 0.0
    processes = max(len(targets), min(args.client_processes, senders))
    processes -= processes % len(targets)  # each process reports to one replica
    # Every process builds its batches first, then all start sending at the same moment.
    if rate_per_sender:
        per_process = (int(rate_per_sender * args.seconds) + 2) * senders / processes
    else:
        per_process = CLOSED_LOOP_BATCHES_PER_SECOND * args.seconds / processes
    build_started = time.perf_counter()
    BatchSource("r", "s", steps, 20)
    build_seconds = (time.perf_counter() - build_started) / 20 * per_process
    start_at = time.time() + 1.0 + 2.0 * build_seconds
    plans = [ClientPlan(sender_targets[p], run_ids[p::processes],
                        [f"{n}-s" for n in names[p::processes]],
                        steps, args.seconds, rate_per_sender,
                        [interval * i / senders for i in range(p, senders, processes)],
                        start_at)
             for p in range(processes)]
    if processes == 1:
        results = [run_client(plans[0])]
    else:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            results = pool.map(run_client, plans)
    total = LevelResult(senders, 0.0)
    for result in results:
        total.merge(result)
    return total


def serve_null(ready_file: str) -> None:
    """A server that acks every report batch without reading it (the harness ceiling)."""

    async def open_run(request: ingest_pb2.OpenRunRequest,
                       context: grpc.aio.ServicerContext) -> ingest_pb2.OpenRunResponse:
        return ingest_pb2.OpenRunResponse(run_id=request.run_name)

    async def report(requests: AsyncIterator[bytes],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        sequence = 0  # the harness numbers each stream's batches from 1
        async for _ in requests:
            sequence += 1
            yield ingest_pb2.ReportAck(sequence=sequence,
                                       outcome=ingest_pb2.ReportAck.OUTCOME_APPLIED,
                                       samples_applied=500).SerializeToString()

    async def main() -> None:
        server = grpc.aio.server(options=server_options())
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "raresignal.v1.Ingest", {
                "OpenRun": grpc.unary_unary_rpc_method_handler(
                    open_run, request_deserializer=ingest_pb2.OpenRunRequest.FromString,
                    response_serializer=ingest_pb2.OpenRunResponse.SerializeToString),
                "Report": grpc.stream_stream_rpc_method_handler(report),
            })])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        Path(ready_file).write_text(json.dumps({"grpc": f"127.0.0.1:{port}"}))
        await server.wait_for_termination()

    asyncio.run(main())


@dataclass
class SetupResult:
    """One set-up's level: throughput, and CPU seconds of the replicas and of PostgreSQL."""

    name: str
    level: LevelResult
    replica_cpu: float
    database_cpu: float

    def row(self, baseline: SetupResult) -> str:
        rate = self.level.samples / self.level.seconds
        per_k = 1000 / max(1, self.level.samples)
        replica, database = self.replica_cpu * per_k, self.database_cpu * per_k
        base_total = (baseline.replica_cpu + baseline.database_cpu) * 1000 / max(
            1, baseline.level.samples)
        base_rate = baseline.level.samples / baseline.level.seconds
        return (f"{self.name:<16} {rate:>10,.0f}  {rate / base_rate:>5.2f}x"
                f"  {replica * 1e3:>8.1f}  {database * 1e3:>8.1f}  "
                f"{(replica + database) / base_total:>5.2f}x  "
                f"{self.replica_cpu / self.level.seconds:>5.2f}  "
                f"{self.database_cpu / self.level.seconds:>5.2f}  "
                f"{self.level.row().split()[-2]:>7}  {self.level.row().split()[-1]:>7}")


def measure_setup(name: str, targets: list[str], replica_pids: list[int],
                  postmaster: int | None, senders: int, args: argparse.Namespace,
                  level: int) -> SetupResult:
    from server_processes import cpu_seconds, cpu_used, family

    database_before = cpu_seconds(family(postmaster)) if postmaster else {}
    replicas_before = cpu_seconds(replica_pids)
    result = run_level(targets, senders, args, level)
    replicas = cpu_used(replicas_before, cpu_seconds(replica_pids))
    database = (cpu_used(database_before, cpu_seconds(family(postmaster)))
                if postmaster else 0.0)
    return SetupResult(name, result, replicas, database)


def compare_backends(args: argparse.Namespace) -> int:
    """The same load on SQLite, on PostgreSQL with one replica and with two."""
    from server_processes import password_file, postmaster_pid, start_cluster

    cluster = start_cluster()
    try:
        with tempfile.TemporaryDirectory(prefix="raresignal-bench-") as tmp:
            directory = Path(tmp)
            os.environ["RARESIGNAL_DB_PASSWORD_FILE"] = str(password_file(directory))
            postmaster = postmaster_pid(cluster)
            print(f"{os.cpu_count()} CPUs, batches of "
                  f"{max(1, args.batch_size // len(SERIES)) * len(SERIES)} samples, "
                  f"{args.seconds:g} s per set-up, "
                  f"{f'paced at {args.rate:,.0f} samples/s' if args.rate else 'closed loop'}, "
                  f"{args.client_processes} client process(es) per replica; CPU in ms per "
                  f"1,000 samples, busy in cores")
            for level, senders in enumerate(args.senders):
                print(f"\n{senders} senders\n{'set-up':<16} {'samples/s':>10}  {'ratio':>6}"
                      f"  {'replica':>8}  {'postgres':>8}  {'CPU/x':>6}  {'rbusy':>5}  "
                      f"{'pbusy':>5}  {'p50 ms':>7}  {'p99 ms':>7}")
                results: list[SetupResult] = []
                for name, replicas, db in (
                        ("sqlite", 1, None),
                        ("postgres x1", 1, cluster.url(cluster.create_database())),
                        ("postgres x2", 2, "")):
                    if db == "":
                        db = cluster.url(cluster.create_database())
                    processes = []
                    try:
                        targets = []
                        for replica in range(replicas):
                            folder = directory / f"{level}-{name.replace(' ', '')}-{replica}"
                            folder.mkdir()
                            process, target = start_process(
                                folder, raresignal_server_command(folder, db))
                            processes.append(process)
                            targets.append(target)
                        results.append(measure_setup(
                            name, targets, [p.pid for p in processes],
                            postmaster if db else None, senders, args, level))
                        print(results[-1].row(results[0]), flush=True)
                    finally:
                        for process in processes:
                            process.terminate()
                        for process in processes:
                            process.wait(30)
    finally:
        cluster.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Sustained ingest throughput and ack latency of the raresignal server "
                    "(separate process, loopback gRPC, SQLite in WAL mode).",
        epilog="examples:\n  python benchmarks/ingest.py --senders 1 16 128 --seconds 5\n"
               "  python benchmarks/ingest.py --senders 16 --rate 100000",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 16, 128],
                        help="concurrency levels to measure (default: 1 16 128)")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each level")
    parser.add_argument("--batch-size", type=int, default=500,
                        help="samples per batch (default 500: 50 steps x 10 series)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="paced mode: samples/s offered by all senders together "
                             "(default: closed loop, as fast as acks come)")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="spread the senders over this many client processes")
    parser.add_argument("--null-server", action="store_true",
                        help="ack without storing anything: the ceiling of this harness")
    parser.add_argument("--compare-backends", action="store_true",
                        help="SQLite, PostgreSQL with one replica and with two, same load, "
                             "with server CPU per sample (needs initdb and pg_ctl)")
    parser.add_argument("--serve-null", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_null:
        serve_null(args.ready_file)
        return 0
    if args.compare_backends:
        return compare_backends(args)

    with tempfile.TemporaryDirectory(prefix="raresignal-bench-") as tmp:
        directory = Path(tmp)
        if args.null_server:
            command = [sys.executable, str(Path(__file__).resolve()), "--serve-null"]
            process, target = start_process(directory, command)
        else:
            process, target = start_process(directory, raresignal_server_command(directory))
        try:
            mode = (f"paced at {args.rate:,.0f} samples/s" if args.rate
                    else "closed loop, one batch in flight per sender")
            print(f"{'null server' if args.null_server else 'server'} {target} "
                  f"(pid {process.pid}), {os.cpu_count()} CPUs, batches of "
                  f"{max(1, args.batch_size // len(SERIES)) * len(SERIES)} samples, "
                  f"{args.seconds:g} s per level, {mode}, "
                  f"{args.client_processes} client process(es)")
            print(f"{'senders':>7}  {'samples/s':>12}  {'batches/s':>10}  {'p50 ms':>8}  "
                  f"{'p99 ms':>8}")
            for level, senders in enumerate(args.senders):
                print(run_level([target], senders, args, level).row(), flush=True)
        finally:
            process.terminate()
            process.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
