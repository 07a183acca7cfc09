"""A training process for the fault-injection tests and ``benchmarks/faults.py``: it
measures the loss ``step / 4`` at every step, checkpoints the monitor every
``--checkpoint-every`` steps (atomically), resumes from the checkpoint when one exists,
and kills itself with SIGKILL at ``--die-at`` (no cleanup of any kind, as the kernel
would end it). ``--disk-full-at`` makes every fsync fail with ENOSPC from that step on;
``--read-only-spool`` makes every write under the spool folder fail with EROFS (what a
read-only mount gives, even to root, whom permission bits do not stop)."""

from __future__ import annotations

import argparse
import builtins
import errno
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parents[2]))  # tests/, as pytest's pythonpath
from toy_estimators import LossEstimator

from raresignal.agent import Monitor, MonitorConfig


def fill_disk() -> None:
    """From now on, every fsync fails as on a full disk."""
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    os.fsync = fsync


def make_read_only(folder: str) -> None:
    """Every open for writing under ``folder`` fails as on a read-only mount."""
    root = os.path.abspath(folder)
    real_open, real_os_open = builtins.open, os.open

    def refused(path: object) -> OSError:
        return OSError(errno.EROFS, "Read-only file system", str(path))

    def inside(path: object) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(
            os.fspath(path)).startswith(root)  # type: ignore[arg-type]

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if inside(file) and any(flag in mode for flag in "wax+"):
            raise refused(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise refused(path)
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = open_
    os.open = os_open


def hold(cue: Path, timeout_seconds: float = 120.0) -> None:
    """Waits until ``cue`` exists, so a test can act while this process is mid-run."""
    deadline = time.monotonic() + timeout_seconds
    while not cue.exists():
        if time.monotonic() > deadline:
            sys.exit(f"{cue} did not appear within {timeout_seconds} s")
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--spool-dir", required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--die-at", type=int, default=-1)
    parser.add_argument("--disk-full-at", type=int, default=-1)
    parser.add_argument("--read-only-spool", action="store_true")
    parser.add_argument("--run-name", default="faults")
    parser.add_argument("--hold-at", type=int, default=-1,
                        help="wait at this step until --hold-file exists (a test's cue)")
    parser.add_argument("--hold-file", type=Path)
    parser.add_argument("--step-seconds", type=float, default=0.0,
                        help="time each step takes, so faults can land mid-run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.read_only_spool:
        make_read_only(args.spool_dir)
        print("fault: read-only-spool", flush=True)
    monitor = Monitor(torch.nn.Linear(2, 2), None, server=args.server, run_name=args.run_name,
                      estimators=[LossEstimator()],
                      config=MonitorConfig(spool_dir=args.spool_dir,
                                           report_interval_seconds=0.05,
                                           reconnect_initial_seconds=0.05,
                                           reconnect_max_seconds=0.3,
                                           network_timeout_seconds=2.0,
                                           close_timeout_seconds=30.0,
                                           max_interval_factor=1))
    if args.checkpoint.exists():
        monitor.load_state_dict(torch.load(args.checkpoint, weights_only=False))
    for step in range(monitor.step_count, args.steps):
        if step == args.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == args.hold_at:
            hold(args.hold_file)
        if step == args.disk_full_at:
            fill_disk()
            print("fault: disk-full", flush=True)
        time.sleep(args.step_seconds)
        monitor.step(loss=torch.tensor(step / 4, dtype=torch.float64))
        if (step + 1) % args.checkpoint_every == 0:
            tmp = args.checkpoint.with_suffix(".tmp")
            torch.save(monitor.state_dict(), tmp)
            os.replace(tmp, args.checkpoint)
    print("delivered" if monitor.close() else "not delivered", flush=True)


if __name__ == "__main__":
    main()
