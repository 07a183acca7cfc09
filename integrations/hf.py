"""raresignal for the Hugging Face Transformers ``Trainer``.

>>> from raresignal.integrations.hf import RaresignalTrainerCallback
>>> callback = RaresignalTrainerCallback(server="host:50051", probes={"rare": rare_dataset})
>>> trainer = Trainer(model, args, train_dataset=data)
>>> callback.attach(trainer)  # ahead of report_to's integrations, which then log its values

The Trainer hands callbacks neither the batch nor the loss, so the callback watches the
model's own forward calls (a forward hook) for the last training micro-batch and its
``loss``. Gradients are read in ``on_pre_optimizer_step``: after every accumulated
micro-batch's backward and after the Trainer's gradient clipping, right before
``optimizer.step()``. Clipping rescales the whole gradient by one factor, so directions
(subspaces, overlaps, interference) are unaffected; only ``grad_norm`` reports the clipped
norm when ``max_grad_norm`` is set.

The main process prints, once, the run's name, server and how to look at it at the first
step (the run id when the server has assigned it), and a one-line summary at the end;
``callback.monitor`` and ``callback.latest()`` stay readable after ``train`` returns.

Checkpoints: on every save the monitor's state goes into the checkpoint folder
(``raresignal_monitor.pt``); ``Trainer.train(resume_from_checkpoint=...)`` picks it up
again, so the resumed run keeps its run id, baselines and sketches.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    DefaultFlowCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from raresignal.agent import Monitor, MonitorConfig
from raresignal.agent.api import Estimator, Probe
from raresignal.agent.estimators.likelihood import IGNORE_INDEX
from raresignal.integrations.lightning_callback import headline_metrics
from raresignal.integrations.torch import (
    DEFAULT_MAX_PROBE_EXAMPLES,
    ProbeSource,
    move_to,
    split_batch,
    to_probe,
    to_probes,
)

STATE_FILE = "raresignal_monitor.pt"
CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


def aligned_targets(labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face causal-LM labels (the input ids; the model shifts them) aligned with
    the logits, as the monitor scores them: position t holds the token at t + 1, and the
    last position, which predicts nothing, is ignored (``IGNORE_INDEX``)."""
    aligned = torch.full_like(labels, IGNORE_INDEX)
    aligned[:, :-1] = labels[:, 1:]
    return aligned


def main_process_printer(state: TrainerState) -> Callable[[str], None]:
    """Prints on the Trainer's main process only, as its own progress output does; through
    ``tqdm.write``, so a progress bar on screen is not broken."""
    def write(line: str) -> None:
        if state.is_world_process_zero:
            tqdm.write(line)
    return write


def state_path(checkpoint_dir: str, process_index: int) -> str:
    """Where one process keeps the monitor state inside a checkpoint folder."""
    name = STATE_FILE if process_index == 0 else f"raresignal_monitor_rank{process_index}.pt"
    return os.path.join(checkpoint_dir, name)


class RaresignalTrainerCallback(TrainerCallback):
    """Runs a :class:`raresignal.agent.Monitor` inside a Transformers ``Trainer``.

    ``task`` defaults to ``"causal_lm"``: probes are then batches of ``input_ids`` (and
    ``attention_mask``) with ``labels`` as the model takes them (the input ids, -100 where
    not scored); the callback aligns them with the logits (:func:`aligned_targets`).
    ``forward(model, inputs)`` overrides how logits are obtained (default
    ``model(**inputs).logits``). Headline values are added to the Trainer's training logs
    (``raresignal/...`` keys, every ``logging_steps``) when ``log_to_loggers``; call
    :meth:`attach` for the reporting integrations to receive them too.
    """

    def __init__(
        self,
        server: str | None = None,
        run_name: str = "transformers",
        probes: Mapping[str, ProbeSource] | None = None,
        common_probe: ProbeSource | None = None,
        forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        task: str = "causal_lm",
        config: MonitorConfig | None = None,
        token: str | None = None,
        estimators: Sequence[Estimator] | None = None,
        log_to_loggers: bool = True,
        max_probe_examples: int = DEFAULT_MAX_PROBE_EXAMPLES,
    ) -> None:
        self.server = server
        self.run_name = run_name
        self.task = task
        self.config = config
        self.token = token
        self.estimators = estimators  # None: the monitor's default set
        self.log_to_loggers = log_to_loggers
        self.forward = forward  # None: the monitor's default (``model(**inputs).logits``)
        self._probes = {name: self._aligned(probe)
                        for name, probe in to_probes(probes, max_probe_examples).items()}
        self._common_probe = (self._aligned(to_probe(common_probe, max_probe_examples))
                              if common_probe is not None else None)
        self.monitor: Monitor | None = None  # the running one, then the last one closed
        self._running = False
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._total_steps: int | None = None  # the Trainer's max_steps, once it says
        self._measuring = False
        self._batch: tuple[Any, torch.Tensor] | None = None
        self._losses: list[torch.Tensor] = []
        self._losses_add_up = False
        self._final_state: dict[str, Any] = {}

    def _aligned(self, probe: Probe) -> Probe:
        if self.task != "causal_lm":
            return probe
        return Probe(probe.inputs, aligned_targets(probe.targets))

    # Watching the training forward ----------------------------------------------------

    def _capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 output: Any) -> None:
        """Keeps the last training micro-batch and its loss (the Trainer passes neither)."""
        if self._measuring or not module.training or not torch.is_grad_enabled():
            return
        inputs: Any = dict(kwargs) if kwargs else (args[0] if args else None)
        # With num_items_in_batch the model divides its summed loss by the token count of
        # the whole accumulated batch, so micro-batch losses add up to the step's loss;
        # without it each is a mean and the step's loss is their mean.
        self._losses_add_up = isinstance(inputs, Mapping) and (
            inputs.pop("num_items_in_batch", None) is not None)
        if isinstance(inputs, Mapping) and "labels" in inputs:
            batch_inputs, labels = split_batch(inputs)
            if self.task == "causal_lm":
                labels = aligned_targets(labels)
            self._batch = (batch_inputs, labels.detach())
        loss = getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach())

    # Trainer events -----------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model: nn.Module | None = None,
                       **kwargs: Any) -> None:
        if model is not None and self._hook is None:
            self._hook = model.register_forward_hook(self._capture, with_kwargs=True)
        self._total_steps = state.max_steps if state.max_steps > 0 else None
        if self._running and self.monitor is not None and self._total_steps is not None:
            self.monitor.plan(self._total_steps)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState,
                      control: TrainerControl, model: nn.Module | None = None,
                      optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> None:
        # Started here rather than in on_train_begin: only now has a resumed Trainer
        # loaded its state, whose global_step names the checkpoint to resume from.
        if self._running or model is None:
            return
        device = next(model.parameters()).device
        self.monitor = Monitor(
            model,
            optimizer,
            server=self.server,
            run_name=self.run_name,
            probes={name: move_to(p, device) for name, p in self._probes.items()},
            common_probe=(move_to(self._common_probe, device)
                          if self._common_probe is not None else None),
            forward=self.forward,
            task=self.task,
            config=self.config,
            token=self.token,
            estimators=self.estimators,
            announce=main_process_printer(state),
            total_steps=self._total_steps,
        )
        self._running = True
        if state.global_step > 0:
            checkpoint = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")
            for path in (state_path(checkpoint, args.process_index), state_path(checkpoint, 0)):
                if os.path.isfile(path):
                    self.monitor.load_state_dict(torch.load(path, weights_only=False))
                    break

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState,
                              control: TrainerControl, **kwargs: Any) -> None:
        if not self._running or self.monitor is None:
            return
        loss = None
        if self._losses:
            stacked = torch.stack(self._losses)
            loss = stacked.sum() if self._losses_add_up else stacked.mean()
        self._losses = []
        self._measuring = True
        try:
            self.monitor.step(loss=loss, batch=self._batch)
        finally:
            self._measuring = False

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        # The Trainer's log dict is what reaches TensorBoard, W&B and the rest: the headline
        # values join it (reporting callbacks after this one receive them: see attach) and
        # the log history entry the Trainer appended for it just before this event, which
        # it writes into trainer_state.json. Only the training logs, every logging_steps,
        # carry "loss": evaluation and end-of-training summaries are left as they are.
        if (not self.log_to_loggers or not self._running or self.monitor is None or not logs
                or "loss" not in logs):
            return
        headline = headline_metrics(self.monitor.latest())
        logs.update(headline)
        if state.log_history:
            state.log_history[-1].update(headline)

    def attach(self, trainer: Any) -> None:
        """Places this callback in ``trainer`` right after its flow callback, ahead of the
        reporting integrations (``report_to``: TensorBoard, W&B, ...), so they receive the
        headline values. The Trainer puts callbacks passed to it after those integrations,
        which then log before the values join the logs."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        position = next((index + 1 for index, callback in enumerate(callbacks)
                         if isinstance(callback, DefaultFlowCallback)), 0)
        callbacks.insert(position, self)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        if not self._running or self.monitor is None:
            return
        checkpoint = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")
        os.makedirs(checkpoint, exist_ok=True)
        torch.save(self.monitor.state_dict(), state_path(checkpoint, args.process_index))

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._running and self.monitor is not None:
            self._running = False
            self.monitor.close(state="completed")
            # Taken after close(): closing sends a last report, which advances the numbering.
            self._final_state = dict(self.monitor.state_dict())

    def latest(self) -> dict[str, float]:
        """The last value of every series of the current (or last closed) run."""
        return self.monitor.latest() if self.monitor is not None else {}

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state, or the last closed run's."""
        if self._running and self.monitor is not None:
            return dict(self.monitor.state_dict())
        return self._final_state
