"""A training process for the fault-injection tests: it measures the loss ``step / 4`` at
every step, checkpoints the monitor every ``--checkpoint-every`` steps (atomically),
resumes from the checkpoint when one exists, and kills itself with SIGKILL at
``--die-at`` (no cleanup of any kind, as the kernel would end it)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[2]))  # tests/, as pytest's pythonpath
from toy_estimators import LossEstimator

from raresignal.agent import Monitor, MonitorConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--spool-dir", required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--die-at", type=int, default=-1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    monitor = Monitor(torch.nn.Linear(2, 2), None, server=args.server, run_name="faults",
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
        monitor.step(loss=torch.tensor(step / 4, dtype=torch.float64))
        if (step + 1) % args.checkpoint_every == 0:
            tmp = args.checkpoint.with_suffix(".tmp")
            torch.save(monitor.state_dict(), tmp)
            os.replace(tmp, args.checkpoint)
    print("delivered" if monitor.close() else "not delivered", flush=True)


if __name__ == "__main__":
    main()
