"""The Lightning callback, written once for both Lightning packages.

``lightning.pytorch`` and ``pytorch_lightning`` ship distinct ``Callback`` classes and a
Trainer accepts only callbacks of its own package, so the behaviour lives in
:class:`LightningMonitorHooks`, which imports neither; :func:`callback_class` mixes it
into the ``Callback`` base of one package. ``raresignal.integrations.lightning`` and
``raresignal.integrations.pytorch_lightning`` each apply it to their own package.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from raresignal.agent import Monitor, MonitorConfig, default_forward
from raresignal.agent.api import Estimator, Probe, parse_series_key
from raresignal.integrations.torch import (
    DEFAULT_MAX_PROBE_EXAMPLES,
    ProbeSource,
    move_to,
    split_batch,
    to_probe,
    to_probes,
)


def planned_steps(trainer: Any) -> int | None:
    """The optimizer steps the Trainer plans (``estimated_stepping_batches``), or None when
    it cannot tell (an infinite or unknown length)."""
    try:
        estimate = float(trainer.estimated_stepping_batches)
    except Exception:  # some loops cannot size themselves before they start
        return None
    return int(estimate) if math.isfinite(estimate) and estimate >= 1 else None


# The series the callback also logs through the framework (its loggers, the metrics its
# callbacks monitor): the ones a person reads first.
HEADLINE_METRICS = (
    "probe_accuracy",
    "probe_fisher_mass_ratio",
    "probe_bulk_residual",
    "sharpness_ratio",
    "subspace_overlap",
    "agent_overhead_ratio",
)
# Short names for the progress bar, where width is scarce.
PROGRESS_BAR_NAMES = {
    "probe_accuracy": "acc",
    "probe_fisher_mass_ratio": "mass",
    "probe_bulk_residual": "resid",
    "sharpness_ratio": "sharp",
    "subspace_overlap": "overlap",
    "agent_overhead_ratio": "overhead",
}
LOGGER_PREFIX = "raresignal"


def headline_metrics(latest: Mapping[str, float]) -> dict[str, float]:
    """The headline series of ``Monitor.latest()``, named for loggers:
    ``raresignal/probe_accuracy/rare``, ``raresignal/sharpness_ratio``."""
    named: dict[str, float] = {}
    for key, value in latest.items():
        metric, labels = parse_series_key(key)
        if metric in HEADLINE_METRICS:
            named["/".join([LOGGER_PREFIX, metric, *labels.values()])] = float(value)
    return named


def progress_bar_metrics(latest: Mapping[str, float]) -> dict[str, float]:
    """The headline series under short names (``acc/rare``, ``sharp``) for a progress bar."""
    named: dict[str, float] = {}
    for key, value in latest.items():
        metric, labels = parse_series_key(key)
        if metric in PROGRESS_BAR_NAMES:
            named["/".join([PROGRESS_BAR_NAMES[metric], *labels.values()])] = float(value)
    return named


class LightningMonitorHooks:
    """Runs a :class:`raresignal.agent.Monitor` from Lightning's training hooks.

    Gradients are read in ``on_before_optimizer_step``: Lightning calls it after the
    closure's backward, after AMP unscaling and after all accumulated micro-batches, so
    the monitor sees the gradient the optimizer is about to apply. The loss is summed
    from ``on_before_backward`` (Lightning hands it over already divided by the number of
    accumulated micro-batches), the batch is the last micro-batch of the step.

    Logits come from ``forward(pl_module, inputs)`` when given, else from the overridable
    :meth:`forward_logits` (``pl_module(inputs)``); batches are split into
    ``(inputs, targets)`` by the overridable :meth:`split_batch`.

    At the first step the run's name, server and how to look at it are printed once
    through Lightning's ``rank_zero_info`` (the run id when the server has assigned it),
    and a one-line summary at the end. ``monitor`` and :meth:`latest` stay readable after
    ``fit`` returns.
    """

    # Lightning's rank-zero INFO printer of the package the class is built for.
    _announce: Callable[[str], None] | None = None

    def __init__(
        self,
        server: str | None = None,
        run_name: str = "lightning",
        probes: Mapping[str, ProbeSource] | None = None,
        common_probe: ProbeSource | None = None,
        forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        task: str = "classification",
        config: MonitorConfig | None = None,
        token: str | None = None,
        estimators: Sequence[Estimator] | None = None,
        log_to_loggers: bool = True,
        progress_bar: bool = False,
        max_probe_examples: int = DEFAULT_MAX_PROBE_EXAMPLES,
    ) -> None:
        super().__init__()
        self.server = server
        self.run_name = run_name
        self.task = task
        self.config = config
        self.token = token
        self.estimators = estimators  # None: the monitor's default set
        self.log_to_loggers = log_to_loggers
        self.progress_bar = progress_bar
        self._forward = forward
        # Probes are materialised now: a DataLoader given here must not be consumed later,
        # after the Trainer has forked its workers or moved the model.
        self._probes = to_probes(probes, max_probe_examples)
        self._common_probe = (to_probe(common_probe, max_probe_examples)
                              if common_probe is not None else None)
        self.monitor: Monitor | None = None  # the running one, then the last one closed
        self._running = False
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict[str, Any] | None = None  # from a checkpoint, not yet applied
        self._final_state: dict[str, Any] = {}  # of the last closed run
        self._batch: Any = None
        self._loss: torch.Tensor | None = None

    # Overridable conversions ------------------------------------------------------------

    def forward_logits(self, pl_module: nn.Module, inputs: Any) -> torch.Tensor:
        """Logits of ``inputs``; by default ``pl_module(inputs)`` (``pl_module(**inputs)``
        for a dict, ``.logits`` of a Hugging Face output). Override, or pass ``forward=``,
        when the module's ``forward`` returns something else."""
        if self._forward is not None:
            return self._forward(pl_module, inputs)
        return default_forward(pl_module, inputs)

    def split_batch(self, batch: Any) -> tuple[Any, torch.Tensor]:
        """``(inputs, targets)`` of a training batch; see
        :func:`raresignal.integrations.torch.split_batch` for the shapes understood."""
        return split_batch(batch)

    @property
    def run_id(self) -> str | None:
        """The server's id of the current (or last closed) run."""
        return self.monitor.run_id if self.monitor is not None else None

    def latest(self) -> dict[str, float]:
        """The last value of every series of the current (or last closed) run."""
        return self.monitor.latest() if self.monitor is not None else {}

    # Checkpointing ----------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return f"{type(self).__qualname__}[run_name={self.run_name}]"

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state (run id, baselines, sketches), saved with the checkpoint."""
        if self._running and self.monitor is not None:
            return dict(self.monitor.state_dict())
        return dict(self._pending_state or self._final_state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Kept until the monitor starts, so a resumed fit continues the same run."""
        if self._running and self.monitor is not None:
            self.monitor.load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict)

    # Training hooks -----------------------------------------------------------------------

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        if self._running:
            return
        if not trainer.optimizers:
            raise ValueError("raresignal needs an optimizer: configure_optimizers returned none")
        self._optimizer = trainer.optimizers[0]
        device = next(pl_module.parameters()).device
        probes = {name: move_to(probe, device) for name, probe in self._probes.items()}
        common: Probe | None = (move_to(self._common_probe, device)
                                if self._common_probe is not None else None)
        self.monitor = Monitor(
            pl_module,
            self._optimizer,
            server=self.server,
            run_name=self.run_name,
            probes=probes,
            common_probe=common,
            forward=self.forward_logits,
            task=self.task,
            config=self.config,
            token=self.token,
            estimators=self.estimators,
            announce=type(self)._announce,
            total_steps=planned_steps(trainer),
        )
        self._running = True
        if self._pending_state is not None:
            self.monitor.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any,
                             batch_idx: int) -> None:
        self._batch = batch

    def on_before_backward(self, trainer: Any, pl_module: nn.Module,
                           loss: torch.Tensor) -> None:
        detached = loss.detach()
        self._loss = detached if self._loss is None else self._loss + detached

    def on_before_optimizer_step(self, trainer: Any, pl_module: nn.Module,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self._running or self.monitor is None or not self._is_monitored(optimizer):
            return
        batch = self.split_batch(self._batch) if self._batch is not None else None
        # Every rank calls step() every optimizer step: the monitor's collectives rely on it.
        self.monitor.step(loss=self._loss, batch=batch)
        self._loss = None
        self._publish(trainer, pl_module)

    def _is_monitored(self, optimizer: Any) -> bool:
        inner = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps it
        return inner is self._optimizer or optimizer is self._optimizer

    def _publish(self, trainer: Any, pl_module: Any) -> None:
        """Logs the headline values through ``pl_module.log``, so they land in
        ``trainer.callback_metrics`` every step (EarlyStopping and ModelCheckpoint can
        monitor them) and reach the loggers at the Trainer's ``log_every_n_steps``.

        Every rank logs: a callback that monitors a metric looks it up on each rank, and
        Lightning's loggers write on rank zero only."""
        assert self.monitor is not None
        latest = self.monitor.latest()
        # Lightning warns for each metric logged to loggers when the Trainer has none.
        to_loggers = self.log_to_loggers and bool(trainer.loggers)
        for name, value in headline_metrics(latest).items():
            pl_module.log(name, value, logger=to_loggers, on_step=True, on_epoch=False)
        if self.progress_bar:
            for name, value in progress_bar_metrics(latest).items():
                pl_module.log(name, value, prog_bar=True, logger=False, on_step=True,
                              on_epoch=False)

    # Shutdown -------------------------------------------------------------------------------

    def teardown(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        if stage == "fit":
            self._close("completed")

    def on_exception(self, trainer: Any, pl_module: nn.Module,
                     exception: BaseException) -> None:
        self._close("aborted" if isinstance(exception, KeyboardInterrupt) else "failed")

    def _close(self, state: str) -> None:
        """Flushes what is left to send and closes the run; a later state_dict() still
        returns the final state so a checkpoint written afterwards can resume it."""
        if not self._running or self.monitor is None:
            return
        self._running = False
        self.monitor.close(state=state)
        # Taken after close(): closing sends a last report, which advances the numbering.
        self._final_state = dict(self.monitor.state_dict())


def callback_class(base: type, module: str, announce: Callable[[str], None]) -> type:
    """``RaresignalCallback`` for the Lightning package whose ``Callback`` is ``base``;
    ``announce`` is that package's ``rank_zero_info``."""
    return type(
        "RaresignalCallback",
        (LightningMonitorHooks, base),
        {"__module__": module, "__doc__": LightningMonitorHooks.__doc__,
         "_announce": staticmethod(announce)},
    )
