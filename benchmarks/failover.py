"""How long a replica's senders and alerts are out after it is killed (SIGKILL).

Two ``raresignal server`` replicas on one PostgreSQL database (a throwaway cluster), N
senders each reporting one step every ``--interval`` seconds on its own run, half of them
to each replica, under a rule that changes state at every step (loss alternates above and
below its threshold). Once every run has a lease, the replica owning the most runs is
killed, and two times are taken from the kill:

* (a) the first sample stored again from a sender that was reporting to the killed
  replica: the sender reconnects to the other replica at once (as a Service would route
  it) and resends its unacknowledged batch; the time is that of the first applied ack;
* (b) the first alert transition written for one of the runs the killed replica owned:
  the survivor must wait for the leases to expire, take them, and evaluate what was
  queued (the database is polled every POLL_SECONDS for it).

Each setting (the default lease TTL and heartbeat, and short ones) is repeated on a fresh
database.

    python benchmarks/failover.py                     # 8 senders, 3 repeats per setting
    python benchmarks/failover.py --senders 16 --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
from ingest import open_report, raresignal_server_command, start_process
from server_processes import LOSS_HIGH_RULES, password_file, start_cluster

from raresignal.client.channels import open_aio_channel
from raresignal.protos.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc
from raresignal.server.serving.app import ServerConfig

RULE = LOSS_HIGH_RULES
POLL_SECONDS = 0.02
# A sender gives up on an ack after this and reconnects (a live replica acks far sooner).
ACK_TIMEOUT_SECONDS = 5.0
SETTINGS = {
    "default": (ServerConfig.lease_ttl_seconds, ServerConfig.lease_heartbeat_seconds),
    "short": (2.0, 0.5),
}


@dataclass
class Trial:
    """One kill: when it happened, and what the harness saw after it."""

    killed_at: float = 0.0
    victim_target: str = ""
    first_ack_after: float | None = None  # (a), absolute time
    first_transition_after: float | None = None  # (b), absolute time
    stop: bool = False
    errors: list[str] = field(default_factory=list)


async def sender(run_id: str, home: int, targets: list[str], interval: float,
                 trial: Trial) -> None:
    """Reports one step per interval; on a broken stream, reconnects to the other replica
    and resends from the first unacknowledged sequence."""
    acked, index = 0, home
    while not trial.stop:
        target = targets[index]
        channel = open_aio_channel(target)
        try:
            call = open_report(channel)
            while not trial.stop:
                sequence = acked + 1
                loss = 500.0 if sequence % 2 else 1.0
                batch = ingest_pb2.ReportBatch(
                    run_id=run_id, sender_id=run_id + "-s", sequence=sequence,
                    samples=[common_pb2.Sample(metric="loss", step=sequence, value=loss,
                                               wall_time=time.time())])
                await asyncio.wait_for(call.write(batch.SerializeToString()),
                                       ACK_TIMEOUT_SECONDS)
                ack = await asyncio.wait_for(call.read(), ACK_TIMEOUT_SECONDS)
                if ack is grpc.aio.EOF:
                    raise ConnectionError("stream ended")
                acked = sequence
                if (trial.killed_at and home_was_victim(targets[home], trial)
                        and trial.first_ack_after is None
                        and ack.outcome == ingest_pb2.ReportAck.OUTCOME_APPLIED):
                    trial.first_ack_after = time.time()
                await asyncio.sleep(interval)
        except Exception as error:  # whatever broke, the other replica is the way on
            trial.errors.append(f"{run_id}: {error!r}"[:200])
            index = 1 - index
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), ACK_TIMEOUT_SECONDS)


def home_was_victim(home_target: str, trial: Trial) -> bool:
    return home_target == trial.victim_target


async def open_runs(target: str, count: int) -> list[str]:
    async with open_aio_channel(target) as channel:
        stub = ingest_pb2_grpc.IngestStub(channel)
        return [(await stub.OpenRun(ingest_pb2.OpenRunRequest(
            run_name=f"failover-{i}", world_size=1, report_interval_seconds=1.0))).run_id
            for i in range(count)]


def owners(conninfo: str) -> dict[str, str]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return dict(conn.execute("SELECT run_id, owner FROM run_leases "
                                 "WHERE expires_at > clock_timestamp()").fetchall())


def transitions_after(conninfo: str, run_ids: list[str], after: float) -> int:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM alert_history h JOIN alerts a "
                           "USING (alert_id) WHERE a.run_id = ANY(%s) AND h.at > %s",
                           (run_ids, after)).fetchone()
        return int(row[0]) if row else 0


async def wait_until(condition: object, deadline_seconds: float, what: str,
                     trial: Trial) -> None:
    deadline = time.monotonic() + deadline_seconds
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}; sender errors: "
                             f"{trial.errors[-5:]}")
        await asyncio.sleep(POLL_SECONDS)


async def one_trial(conninfo: str, targets: list[str], replicas: dict[str, subprocess.Popen],
                    senders: int, interval: float, ttl: float) -> Trial:
    trial = Trial()
    run_ids = await open_runs(targets[0], senders)
    tasks = [asyncio.create_task(sender(run_id, i % 2, targets, interval, trial))
             for i, run_id in enumerate(run_ids)]
    try:
        await wait_until(lambda: len(owners(conninfo)) == senders, 10 * ttl + 30,
                         "every run to have a lease", trial)
        # A transition or two on every run before the kill, so the engines are warm.
        await asyncio.sleep(4 * interval)
        held = owners(conninfo)
        counts = {owner: list(held.values()).count(owner) for owner in set(held.values())}
        victim = max(counts, key=lambda owner: counts[owner])
        victim_runs = [run_id for run_id, owner in held.items() if owner == victim]
        trial.victim_target = targets[int(victim.rsplit("-", 1)[1])]
        trial.killed_at = time.time()
        os.kill(replicas[victim].pid, signal.SIGKILL)

        def transition_seen() -> bool:
            if transitions_after(conninfo, victim_runs, trial.killed_at):
                trial.first_transition_after = time.time()
                return True
            return False

        await wait_until(transition_seen, 10 * ttl + 60, "a transition of the lost runs", trial)
        await wait_until(lambda: trial.first_ack_after is not None, 60,
                         "a sample of the lost senders", trial)
    finally:
        trial.stop = True
        await asyncio.gather(*tasks, return_exceptions=True)
    return trial


def run_setting(cluster: object, directory: Path, name: str, ttl: float, heartbeat: float,
                args: argparse.Namespace) -> list[Trial]:
    trials = []
    for repeat in range(args.repeats):
        db = cluster.url(cluster.create_database())  # type: ignore[attr-defined]
        conninfo = cluster.admin_conninfo(db.rsplit("/", 1)[1])  # type: ignore[attr-defined]
        replicas: dict[str, subprocess.Popen] = {}
        targets = []
        try:
            for index in range(2):
                replica_id = f"{name}-{repeat}-{index}"
                folder = directory / replica_id
                folder.mkdir()
                command = [*raresignal_server_command(folder, db), "--rules",
                           str(directory / "rules.yaml"), "--lease-ttl", str(ttl),
                           "--lease-heartbeat", str(heartbeat), "--replica-id", replica_id]
                process, target = start_process(folder, command)
                replicas[replica_id] = process
                targets.append(target)
            trial = asyncio.run(one_trial(conninfo, targets, replicas, args.senders,
                                          args.interval, ttl))
            trials.append(trial)
            print(f"  {name} #{repeat + 1}: (a) {trial.first_ack_after - trial.killed_at:6.3f} s"
                  f"  (b) {trial.first_transition_after - trial.killed_at:6.3f} s", flush=True)
        finally:
            for process in replicas.values():
                if process.poll() is None:
                    process.terminate()
            for process in replicas.values():
                process.wait(30)
    return trials


def summary(trials: list[Trial]) -> str:
    a = [t.first_ack_after - t.killed_at for t in trials]  # type: ignore[operator]
    b = [t.first_transition_after - t.killed_at for t in trials]  # type: ignore[operator]
    return (f"(a) median {statistics.median(a):.3f} s, max {max(a):.3f} s; "
            f"(b) median {statistics.median(b):.2f} s, max {max(b):.2f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--interval", type=float, default=0.1,
                        help="seconds between one sender's steps (default 0.1)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    cluster = start_cluster()
    try:
        with tempfile.TemporaryDirectory(prefix="raresignal-failover-") as tmp:
            directory = Path(tmp)
            os.environ["RARESIGNAL_DB_PASSWORD_FILE"] = str(password_file(directory))
            (directory / "rules.yaml").write_text(RULE)
            print(f"{os.cpu_count()} CPUs, 2 replicas, {args.senders} senders, one step each "
                  f"every {args.interval:g} s, clock interval "
                  f"{ServerConfig.clock_interval_seconds:g} s")
            for name, (ttl, heartbeat) in SETTINGS.items():
                print(f"{name} leases: TTL {ttl:g} s, heartbeat {heartbeat:g} s")
                trials = run_setting(cluster, directory, name, ttl, heartbeat, args)
                print(f"  {summary(trials)}")
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
