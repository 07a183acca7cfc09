"""raresignal for ``lightning.pytorch`` Trainers (``import lightning``).

>>> from raresignal.integrations.lightning import RaresignalCallback
>>> trainer = lightning.pytorch.Trainer(callbacks=[RaresignalCallback(server="host:50051")])

Users of the standalone ``pytorch_lightning`` package import the same class from
``raresignal.integrations.pytorch_lightning``.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from raresignal.integrations.lightning_callback import LightningMonitorHooks, callback_class

RaresignalCallback: type[LightningMonitorHooks] = callback_class(Callback, __name__, rank_zero_info)

__all__ = ["RaresignalCallback"]
