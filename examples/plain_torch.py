"""raresignal in a plain PyTorch training loop.

A small classifier learns four classes of synthetic points; class 3 is rare (2% of the
training data). A probe of held-out rare examples tells raresignal which slice to watch,
a probe of common examples is its reference.

    raresignal server                          # in another terminal, then:
    python examples/plain_torch.py
    python examples/plain_torch.py --start-server   # or let the script start one
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from raresignal.agent import Monitor, Probe

CLASSES, RARE_CLASS, FEATURES = 4, 3, 16


def points(count: int, rare_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs, one per class, with ``rare_fraction`` of them in the rare class."""
    centres = 2 * torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, RARE_CLASS, (count,), generator=generator)
    labels[torch.rand(count, generator=generator) < rare_fraction] = RARE_CLASS
    return centres[labels] + torch.randn(count, FEATURES, generator=generator), labels


@contextmanager
def raresignal_server(args: argparse.Namespace) -> Iterator[str]:
    """The server address: ``--server``, or a server this script starts and stops."""
    if not args.start_server:
        yield args.server
        return
    from raresignal.server.process import ServerProcess

    with tempfile.TemporaryDirectory() as work_dir:
        db_path = Path(args.db) if args.db else Path(work_dir) / "raresignal.db"
        with ServerProcess(db_path, Path(work_dir)).start() as server:
            yield server.grpc_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="localhost:50051", help="the raresignal server")
    parser.add_argument("--start-server", action="store_true",
                        help="start a server for this run (stopped at the end)")
    parser.add_argument("--db", help="with --start-server: keep its data in this file")
    parser.add_argument("--run-name", default="example-plain-torch")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the monitor's messages

    torch.manual_seed(0)
    inputs, labels = points(32 * args.steps, rare_fraction=0.02, seed=1)
    model = nn.Sequential(nn.Linear(FEATURES, 64), nn.Tanh(), nn.Linear(64, CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with raresignal_server(args) as server:
        monitor = Monitor(model, optimizer, server=server, run_name=args.run_name,
                          probes={"rare_class": Probe(*points(128, rare_fraction=1.0, seed=2))},
                          common_probe=Probe(*points(128, rare_fraction=0.0, seed=3)),
                          # The planned length: cadences follow it, so a short run gets
                          # every signal several times (the defaults suit long runs).
                          total_steps=args.steps)
        with monitor:  # closes the run at the end, as failed if training raises
            for step in range(args.steps):
                batch = (inputs[32 * step:32 * (step + 1)], labels[32 * step:32 * (step + 1)])
                loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
                optimizer.zero_grad()
                loss.backward()
                monitor.step(loss=loss, batch=batch)  # after backward, before step
                optimizer.step()
        print("last rare-class probe accuracy:",
              monitor.latest().get("probe_accuracy{probe=rare_class}"))


if __name__ == "__main__":
    main()
