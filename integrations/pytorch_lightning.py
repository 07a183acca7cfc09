"""raresignal for ``pytorch_lightning`` Trainers (the standalone package).

>>> from raresignal.integrations.pytorch_lightning import RaresignalCallback
>>> trainer = pytorch_lightning.Trainer(callbacks=[RaresignalCallback(server="host:50051")])

Users of ``lightning.pytorch`` import the same class from
``raresignal.integrations.lightning``.
"""

from __future__ import annotations

from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from raresignal.integrations.lightning_callback import LightningMonitorHooks, callback_class

RaresignalCallback: type[LightningMonitorHooks] = callback_class(Callback, __name__, rank_zero_info)

__all__ = ["RaresignalCallback"]
