"""Fault count: samples delivered against samples measured, across many injected faults.

Starts ``raresignal server`` in its own process (SQLite in a temporary directory) and
runs training runs of ``--steps`` steps (``tests/agent/runtime/fault_trainer.py``: a real
``Monitor`` measuring the loss ``step / 4`` at every step, checkpointing every 5 steps
and resuming from its checkpoint). Each run goes through trainer processes until one
finishes; each process gets faults drawn at random (``--seed``) from five kinds:

* ``trainer-kill``: the trainer kills itself with SIGKILL at a random step;
* ``server-kill``: the server is killed with SIGKILL at a random moment of the
  trainer's life, and started again on the same file and port a moment later;
* ``corrupt-spool``: after a trainer kill, random bytes are written before or after the
  records of the spool it left behind (a torn write, a stray block);
* ``disk-full``: from a random step on, every fsync of the trainer fails with ENOSPC;
* ``read-only-spool``: every write under the spool folder fails with EROFS.

A fault is counted only when it happened (a kill that hit a running process, a disk
that filled before the end). When at least ``--faults`` have happened, the current run
ends and each run is read back: measured steps missing from storage are *lost*; steps
stored with another value, stored twice or never measured are *doubled*. Exit status 1
unless both are zero.

    python benchmarks/faults.py                        # at least 50 faults
    python benchmarks/faults.py --faults 200 --seed 7
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from raresignal.client.paging import read_series
from raresignal.protos.transport import client_channel_options
from raresignal.protos.v1 import alerts_pb2, alerts_pb2_grpc, common_pb2
from raresignal.server.process import ServerProcess

TRAINER = Path(__file__).resolve().parents[1] / "tests/agent/runtime/fault_trainer.py"
KINDS = ("trainer-kill", "server-kill", "corrupt-spool", "disk-full", "read-only-spool")
TRAINER_TIMEOUT_SECONDS = 300.0


@dataclass
class RunResult:
    run_name: str
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    measured: int = 0
    delivered: int = 0
    lost: int = 0
    doubled: int = 0
    completed: bool = False


@dataclass
class Plan:
    """The faults drawn for one trainer process."""

    die_at: int = -1
    disk_full_at: int = -1
    read_only: bool = False
    server_kill_after: float | None = None  # seconds after the trainer starts
    server_down_for: float = 0.0
    corrupt: bool = False


def draw(rng: random.Random, steps: int) -> Plan:
    plan = Plan()
    if rng.random() < 0.6:
        plan.die_at = rng.randrange(1, steps)
        plan.corrupt = rng.random() < 0.5
    if rng.random() < 0.4:
        plan.server_kill_after = rng.uniform(0.5, 6.0)
        plan.server_down_for = rng.uniform(0.1, 2.0)
    if rng.random() < 0.25:
        plan.disk_full_at = rng.randrange(0, steps)
    elif rng.random() < 0.2:
        plan.read_only = True
    return plan


def corrupt_spools(spool_dir: Path, rng: random.Random) -> bool:
    """Random bytes before or after the records of each spool file; whether any was hit."""
    hit = False
    for path in sorted(spool_dir.glob("*.spool")):
        junk = rng.randbytes(rng.randrange(1, 64))
        data = path.read_bytes()
        path.write_bytes(junk + data if rng.random() < 0.5 else data + junk)
        hit = True
    return hit


def kill_server_later(server: ServerProcess, trainer: subprocess.Popen[str], plan: Plan,
                      killed: list[bool]) -> None:
    """Kills the server ``plan.server_kill_after`` seconds in, if the trainer still runs,
    and starts it again ``plan.server_down_for`` seconds later."""
    assert plan.server_kill_after is not None
    try:
        trainer.wait(plan.server_kill_after)
        return  # the trainer ended first: no fault
    except subprocess.TimeoutExpired:
        pass
    server.kill()
    killed.append(True)
    time.sleep(plan.server_down_for)
    server.start()


def run_trainer(server: ServerProcess, work: Path, run_name: str, steps: int,
                step_seconds: float, plan: Plan, rng: random.Random,
                result: RunResult) -> int:
    """One trainer process under ``plan``; its exit status, its faults counted."""
    command = [sys.executable, str(TRAINER), "--server", server.grpc_target,
               "--spool-dir", str(work / "spool"), "--checkpoint", str(work / "ckpt.pt"),
               "--steps", str(steps), "--run-name", run_name,
               "--step-seconds", str(step_seconds), "--die-at", str(plan.die_at),
               "--disk-full-at", str(plan.disk_full_at)]
    if plan.read_only:
        command.append("--read-only-spool")
    trainer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    killed: list[bool] = []
    killer = None
    if plan.server_kill_after is not None:
        killer = threading.Thread(target=kill_server_later,
                                  args=(server, trainer, plan, killed))
        killer.start()
    stdout, stderr = trainer.communicate(timeout=TRAINER_TIMEOUT_SECONDS)
    if killer is not None:
        killer.join()
    if killed:
        result.faults["server-kill"] += 1
    for line in stdout.splitlines():
        if line.startswith("fault: "):  # what the trainer says happened to it
            result.faults[line.removeprefix("fault: ")] += 1
    if trainer.returncode == -9:
        result.faults["trainer-kill"] += 1
        if plan.corrupt and corrupt_spools(work / "spool", rng):
            result.faults["corrupt-spool"] += 1
    elif trainer.returncode != 0:
        print(f"trainer of {run_name} failed ({trainer.returncode}):\n{stderr[-2000:]}",
              file=sys.stderr)
    return trainer.returncode


def read_back(target: str, run_name: str, steps: int, result: RunResult) -> None:
    with grpc.insecure_channel(target, client_channel_options()) as channel:
        runs = alerts_pb2_grpc.RunsStub(channel)
        found = [run for run in runs.ListRuns(alerts_pb2.ListRunsRequest(
            include_finished=True, page_size=1000), timeout=60).runs
            if run.run_name == run_name]
        samples = [] if not found else read_series(
            runs, alerts_pb2.GetSeriesRequest(run_id=found[0].run_id, metric="loss"), ())
    measured = {step: step / 4 for step in range(steps)}
    stored = collections.Counter(sample.step for sample in samples)
    result.measured = len(measured)
    result.delivered = len(samples)
    result.lost = sum(1 for step in measured if step not in stored)
    result.doubled = sum(count - 1 for count in stored.values()) + sum(
        1 for sample in samples
        if sample.step not in measured or sample.value != measured[sample.step])
    result.completed = (len(found) == 1
                        and found[0].state == common_pb2.RUN_STATE_COMPLETED)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--faults", type=int, default=50,
                        help="inject at least this many (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=100, help="steps per training run")
    parser.add_argument("--step-seconds", type=float, default=0.02,
                        help="time each step takes, so faults land mid-run")
    args = parser.parse_args(argv)
    results = run(args.faults, args.seed, args.steps, args.step_seconds)
    total: collections.Counter[str] = collections.Counter()
    print(f"{'run':<12} {'faults':<58} {'measured':>8} {'delivered':>9} {'lost':>5} "
          f"{'doubled':>7}")
    for result in results:
        total.update(result.faults)
        faults = ", ".join(f"{kind} {n}" for kind, n in sorted(result.faults.items()))
        print(f"{result.run_name:<12} {faults:<58} {result.measured:>8} "
              f"{result.delivered:>9} {result.lost:>5} {result.doubled:>7}"
              f"{'' if result.completed else '  (run not completed)'}")
    lost = sum(r.lost for r in results)
    doubled = sum(r.doubled for r in results)
    print(f"\n{sum(total.values())} faults injected ("
          + ", ".join(f"{kind} {total[kind]}" for kind in KINDS) + f") over {len(results)} "
          f"runs; samples measured {sum(r.measured for r in results)}, delivered "
          f"{sum(r.delivered for r in results)}, lost {lost}, doubled {doubled}")
    return 0 if lost == 0 and doubled == 0 and all(r.completed for r in results) else 1


def run(faults: int, seed: int, steps: int, step_seconds: float) -> list[RunResult]:
    """Training runs under random faults until at least ``faults`` have happened."""
    rng = random.Random(seed)
    results: list[RunResult] = []
    with (tempfile.TemporaryDirectory() as folder,
          ServerProcess(Path(folder) / "faults.db", Path(folder)) as server):
        server.start()
        while sum(sum(r.faults.values()) for r in results) < faults:
            result = RunResult(f"faults-{len(results)}")
            work = Path(folder) / result.run_name
            os.makedirs(work)
            for _ in range(faults + 10):  # every process that is not killed finishes
                code = run_trainer(server, work, result.run_name, steps, step_seconds,
                                   draw(rng, steps), rng, result)
                if code != -9:
                    break
            read_back(server.grpc_target, result.run_name, steps, result)
            results.append(result)
    return results


if __name__ == "__main__":
    sys.exit(main())
