"""The demo's Lightning pieces: the data stream, the module and the collapse it induces.

The training data is an endless stream of synthetic batches (see ``raresignal.demo.task``) whose
rare fraction can change mid-run. :class:`CollapseInducer` changes it: at its step the rare
slice leaves the data mix and weight decay jumps tenfold — a data-pipeline change and a
regularisation change landing together, as they do in real runs — and the rare rule,
no longer rehearsed and now taxed, decays while the common rule stays perfect.

Training uses AdamW with the usual modest weight decay. Without any, the logits grow
without bound once a rule is learned, and every confidence-based signal keeps drifting
in a healthy run; with it they settle, as they do in real training.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from raresignal.demo.task import TaskConfig, TinyTransformer, make_batch

LEARNING_RATE = 3e-3
BATCH_SIZE = 64
WEIGHT_DECAY = 0.1
COLLAPSE_WEIGHT_DECAY = 1.0


class TokenStream(IterableDataset):
    """Endless training batches; ``rare_fraction`` is read at every batch, so changing it
    changes the data mix from the next batch on."""

    def __init__(self, task: TaskConfig, batch_size: int = BATCH_SIZE) -> None:
        super().__init__()
        self.rare_fraction = task.rare_fraction
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(task.seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield make_batch(self.batch_size, self.rare_fraction, self.generator)

    def loader(self) -> DataLoader:
        """A loader that passes the stream's batches through as they are."""
        return DataLoader(self, batch_size=None)


class DemoModule(pl.LightningModule):
    """The tiny transformer, trained with AdamW and plain cross-entropy."""

    def __init__(self, learning_rate: float = LEARNING_RATE,
                 weight_decay: float = WEIGHT_DECAY) -> None:
        super().__init__()
        self.model = TinyTransformer()
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor],
                      batch_idx: int) -> torch.Tensor:
        tokens, labels = batch
        loss = nn.functional.cross_entropy(self(tokens), labels)
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.learning_rate,
                                 weight_decay=self.weight_decay)


class CollapseInducer(pl.Callback):
    """At ``step``: drops the rare slice from the data mix and raises weight decay."""

    def __init__(self, stream: TokenStream, step: int,
                 weight_decay: float = COLLAPSE_WEIGHT_DECAY) -> None:
        self.stream = stream
        self.step = step
        self.weight_decay = weight_decay
        self.done = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: object, batch_idx: int) -> None:
        if self.done or trainer.global_step < self.step:
            return
        self.stream.rare_fraction = 0.0
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["weight_decay"] = self.weight_decay
        self.done = True
