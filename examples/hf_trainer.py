"""raresignal in a Hugging Face ``Trainer``: one callback.

A tiny GPT-2 (built from a config, randomly initialised: nothing is downloaded) learns to
continue token sequences: most count up, a rare few (2% of the training data) count down.
A probe of held-out counting-down sequences tells raresignal which slice to watch, a probe
of counting-up ones is its reference.

    raresignal server                         # in another terminal, then:
    python examples/hf_trainer.py
    python examples/hf_trainer.py --start-server   # or let the script start one
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from raresignal.integrations.hf import RaresignalTrainerCallback

VOCAB, LENGTH = 16, 8


class Counting(torch.utils.data.Dataset):
    """Sequences counting up by one (modulo VOCAB) from a random token, or, for
    ``rare_fraction`` of them, counting down; as causal-LM examples (labels = input ids)."""

    def __init__(self, count: int, rare_fraction: float, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (count, 1), generator=generator)
        direction = torch.where(torch.rand(count, 1, generator=generator) < rare_fraction, -1, 1)
        self.ids = (start + direction * torch.arange(LENGTH)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


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
    parser.add_argument("--run-name", default="example-hf-trainer")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32,
                                       n_layer=2, n_head=2))
    with tempfile.TemporaryDirectory() as output_dir, raresignal_server(args) as server:
        callback = RaresignalTrainerCallback(
            server=server, run_name=args.run_name,  # task="causal_lm", the default
            probes={"counting_down": Counting(64, rare_fraction=1.0, seed=2)},
            # No settings: the cadences follow the trainer's max_steps.
            common_probe=Counting(64, rare_fraction=0.0, seed=3))
        training = TrainingArguments(
            output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=32,
            learning_rate=1e-3, logging_steps=50, save_strategy="no", report_to=[],
            use_cpu=True)
        trainer = Trainer(model=model, args=training,
                          train_dataset=Counting(32 * args.steps, rare_fraction=0.02, seed=1))
        callback.attach(trainer)  # its headline values join the Trainer's logs
        trainer.train()
    print("last counting-down probe accuracy:",
          callback.latest().get("probe_accuracy{probe=counting_down}"))


if __name__ == "__main__":
    main()
