"""raresignal in a Lightning ``Trainer``: one callback.

A small classifier learns four classes of synthetic points; class 3 is rare (2% of the
training data). A probe of held-out rare examples tells raresignal which slice to watch,
a probe of common examples is its reference.

    raresignal server                                  # in another terminal, then:
    python examples/lightning_classifier.py
    python examples/lightning_classifier.py --start-server   # or let the script start one
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from raresignal.integrations.lightning import RaresignalCallback

CLASSES, RARE_CLASS, FEATURES = 4, 3, 16


def points(count: int, rare_fraction: float, seed: int) -> TensorDataset:
    """Gaussian blobs, one per class, with ``rare_fraction`` of them in the rare class."""
    centres = 2 * torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, RARE_CLASS, (count,), generator=generator)
    labels[torch.rand(count, generator=generator) < rare_fraction] = RARE_CLASS
    return TensorDataset(centres[labels] + torch.randn(count, FEATURES, generator=generator),
                         labels)


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(FEATURES, 64), nn.Tanh(), nn.Linear(64, CLASSES))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)  # logits: what raresignal's probes score

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor],
                      batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        return nn.functional.cross_entropy(self(inputs), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


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
    parser.add_argument("--run-name", default="example-lightning")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()

    torch.manual_seed(0)
    train = DataLoader(points(32 * args.steps, rare_fraction=0.02, seed=1), batch_size=32)
    with raresignal_server(args) as server:
        callback = RaresignalCallback(
            server=server, run_name=args.run_name,
            probes={"rare_class": points(128, rare_fraction=1.0, seed=2)},
            # No settings: the cadences follow the trainer's max_steps.
            common_probe=points(128, rare_fraction=0.0, seed=3))
        trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", callbacks=[callback],
                             logger=False, enable_checkpointing=False)
        trainer.fit(Classifier(), train)
    print("last rare-class probe accuracy:",
          callback.latest().get("probe_accuracy{probe=rare_class}"))


if __name__ == "__main__":
    main()
