"""CPU per stored sample of the server's storage thread, SQLite against PostgreSQL, and
where it goes.

No gRPC and no event loop: one process drives the ledger as the storage thread does,
group by group (``--senders`` batches of ``--batch-size`` samples per group, one run per
sender, the series of ``benchmarks/ingest.py``), and runs a clock tick after each group,
which on PostgreSQL is the owner evaluating what the group queued. On PostgreSQL it is a
replica owning every run (the queue's full path: queued, taken, evaluated, deleted) on a
throwaway cluster. It reports CPU seconds per 1,000 samples of this process and, for
PostgreSQL, of the cluster's processes, each the median of ``--repeats`` rounds taken in
turn, so both backends see the same load of the machine. ``--profile N`` also prints the N
functions with the most CPU time of one more round of each (cProfile on CPU time, so
waiting on PostgreSQL does not count).

    python benchmarks/storage_cpu.py
    python benchmarks/storage_cpu.py --groups 40 --repeats 5 --profile 25
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ingest import SERIES
from server_processes import (
    PASSWORD,
    cpu_seconds,
    cpu_used,
    family,
    postmaster_pid,
    start_cluster,
)

from raresignal.protos.v1 import common_pb2, ingest_pb2
from raresignal.server.alerting.engine import AlertEngine
from raresignal.server.alerting.rules import load_rules
from raresignal.server.serving.auth import EVERYONE
from raresignal.server.serving.ledger import Ledger, ReportRequest
from raresignal.server.serving.live import LiveState
from raresignal.server.serving.ownership import Ownership
from raresignal.server.storage.base import Storage
from raresignal.server.storage.postgres import PostgresStorage
from raresignal.server.storage.sqlite import SQLiteStorage


def make_batch(run_id: str, sequence: int, steps: int) -> ingest_pb2.ReportBatch:
    first = (sequence - 1) * steps
    now = time.time()
    return ingest_pb2.ReportBatch(run_id=run_id, sender_id="rank0", sequence=sequence, samples=[
        common_pb2.Sample(metric=metric, labels=labels, step=step,
                          value=0.5 + 0.001 * (step % 100), wall_time=now)
        for step in range(first, first + steps) for metric, labels in SERIES])


def drive(ledger: Ledger, args: argparse.Namespace, tag: str,
          profile: cProfile.Profile | None = None) -> int:
    """Opens the runs, then applies and evaluates ``args.groups`` groups; returns the
    samples stored. Batches are built before, so only the server's work is measured."""
    runs = [ledger.open_run(ingest_pb2.OpenRunRequest(run_name=f"{tag}-{i}", world_size=1),
                            EVERYONE)[0].run_id for i in range(args.senders)]
    ledger.tick()
    steps = max(1, args.batch_size // len(SERIES))
    batches = [[make_batch(run_id, group + 1, steps) for run_id in runs]
               for group in range(args.groups)]
    if profile is not None:
        profile.enable()
    for group in batches:
        ledger.apply_many([ReportRequest.check(batch, EVERYONE) for batch in group])
        ledger.tick()
    if profile is not None:
        profile.disable()
    return args.groups * args.senders * steps * len(SERIES)


def measure(open_ledger: Callable[[], Ledger], postmaster: int | None,
            args: argparse.Namespace, tag: str,
            profile: cProfile.Profile | None = None) -> tuple[float, float]:
    """(this process, the cluster) CPU milliseconds per 1,000 samples of one round."""
    ledger = open_ledger()
    try:
        database_before = cpu_seconds(family(postmaster)) if postmaster else {}
        started = time.process_time()
        samples = drive(ledger, args, tag, profile)
        process = time.process_time() - started
        database = (cpu_used(database_before, cpu_seconds(family(postmaster)))
                    if postmaster else 0.0)
    finally:
        ledger.close()
    return process * 1e6 / samples, database * 1e6 / samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senders", type=int, default=16, help="batches (runs) per group")
    parser.add_argument("--batch-size", type=int, default=500, help="samples per batch")
    parser.add_argument("--groups", type=int, default=40, help="groups per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per backend")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N functions with the most CPU time of each backend")
    args = parser.parse_args(argv)

    cluster = start_cluster()
    try:
        postmaster = postmaster_pid(cluster)
        with tempfile.TemporaryDirectory(prefix="raresignal-storage-cpu-") as tmp:
            def sqlite() -> Ledger:
                path = Path(tmp) / f"{time.monotonic_ns()}.db"
                return _ledger(SQLiteStorage(str(path)), None)

            def postgres() -> Ledger:
                url = cluster.url(cluster.create_database())
                return _ledger(PostgresStorage(url, password=PASSWORD),
                               Ownership("bench", 10.0, 2.0))

            setups = (("sqlite", sqlite, None), ("postgres", postgres, postmaster))
            rounds: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in setups}
            for repeat in range(args.repeats):
                for name, open_ledger, pid in setups:
                    rounds[name].append(measure(open_ledger, pid, args, f"r{repeat}"))
            print(f"groups of {args.senders} batches of "
                  f"{max(1, args.batch_size // len(SERIES)) * len(SERIES)} samples, "
                  f"{args.groups} groups a round, median of {args.repeats} rounds; "
                  "CPU ms per 1,000 samples")
            base = statistics.median(p + d for p, d in rounds["sqlite"])
            for name, _, _ in setups:
                process = statistics.median(p for p, _ in rounds[name])
                database = statistics.median(d for _, d in rounds[name])
                total = statistics.median(p + d for p, d in rounds[name])
                print(f"{name:<9} process {process:6.2f}  database {database:6.2f}  "
                      f"total {total:6.2f}  ({total / base:.2f}x sqlite)")
            for name, open_ledger, pid in setups[:args.profile and len(setups)]:
                profile = cProfile.Profile(time.process_time)
                measure(open_ledger, pid, args, "profiled", profile)
                print(f"\n{name}: the functions with the most CPU time (cumulative)")
                pstats.Stats(profile).sort_stats("cumulative").print_stats(args.profile)
    finally:
        cluster.stop()
    return 0


def _ledger(storage: Storage, ownership: Ownership | None) -> Ledger:
    return Ledger(storage, AlertEngine(load_rules()), LiveState(), ownership=ownership)


if __name__ == "__main__":
    raise SystemExit(main())
