"""Where is my data: the line each integration prints at the first step (run name, server,
how to look), the run id once the server assigned it, the summary at the end, each once;
and, without a server, the values still readable after training."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from raresignal.agent import Monitor, MonitorConfig
from raresignal.agent.api import Measurement, StepContext
from raresignal.integrations.hf import RaresignalTrainerCallback

STEPS = 6
RUN_ID_DEADLINE_SECONDS = 30.0
LIGHTNING = {
    "lightning.pytorch": "raresignal.integrations.lightning",
    "pytorch_lightning": "raresignal.integrations.pytorch_lightning",
}


class LossOnly:
    """Reports the step's loss: the smallest estimator, so the tests measure the printing."""

    name = "loss_only"
    default_interval = 1
    expensive = False

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        return [Measurement("loss", float(ctx.loss))] if ctx.loss is not None else []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class Lines(logging.Handler):
    """The raresignal lines a logger emits, as text."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("raresignal: run "):
            self.lines.append(message)


@contextmanager
def collecting(logger_name: str) -> Iterator[Lines]:
    logger = logging.getLogger(logger_name)
    handler = Lines()
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


@pytest.fixture
def monitor_lines() -> Iterator[Lines]:
    with collecting("raresignal.agent.monitor") as lines:
        yield lines


def _matching(lines: list[str], fragment: str) -> list[str]:
    return [line for line in lines if fragment in line]


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, monitor: Monitor) -> None:
    inputs = torch.randn(8, 4)
    loss = model(inputs).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    monitor.step(loss=loss, batch=(inputs, torch.zeros(8, dtype=torch.long)))
    optimizer.step()


def test_monitor_logs_where_the_run_goes_once_then_its_id_then_a_summary(
        server: Any, monitor_lines: Lines) -> None:
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    target = server.grpc_target
    monitor = Monitor(model, optimizer, server=target, run_name="where-plain",
                      estimators=[LossOnly()], config=MonitorConfig(report_interval_seconds=0.1))
    _train_step(model, optimizer, monitor)
    # The sender opens the run in the background: step until the id has come back.
    deadline = time.monotonic() + RUN_ID_DEADLINE_SECONDS
    while monitor.run_id is None:
        assert time.monotonic() < deadline, "the server never assigned a run id"
        time.sleep(0.02)
    for _ in range(STEPS - 1):
        _train_step(model, optimizer, monitor)
    assert monitor.close()

    run_id = monitor.run_id
    start = _matching(monitor_lines.lines, "reports to")
    assert start == [
        f"raresignal: run 'where-plain' reports to {target} (run id to follow); look with "
        f"`raresignal runs --server {target}`, "
        f"`raresignal alerts --server {target} --run <run id>` "
        "or the raresignal Grafana dashboard (run where-plain)"]
    assert _matching(monitor_lines.lines, "has run id") == [
        f"raresignal: run 'where-plain' has run id {run_id} on {target}; its alerts: "
        f"`raresignal alerts --server {target} --run {run_id}`"]
    assert _matching(monitor_lines.lines, "steps measured") == [
        f"raresignal: run 'where-plain' completed: {STEPS} steps measured, every report "
        f"delivered; its alerts: `raresignal alerts --server {target} --run {run_id}`"]
    assert len(monitor_lines.lines) == 3


def test_monitor_without_server_says_the_values_stay_in_process(monitor_lines: Lines) -> None:
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, optimizer, run_name="where-local", estimators=[LossOnly()]) as monitor:
        for _ in range(STEPS):
            _train_step(model, optimizer, monitor)
    assert monitor_lines.lines == [
        "raresignal: run 'where-local' measures in process only (no server); read the "
        "values with latest()",
        f"raresignal: run 'where-local' completed: {STEPS} steps measured; nothing was sent "
        "(no server), the last values stay in latest()"]
    assert "loss" in monitor.latest()


def test_disabled_monitor_prints_nothing(monitor_lines: Lines) -> None:
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, optimizer, estimators=[LossOnly()],
                 config=MonitorConfig(enabled=False)) as monitor:
        _train_step(model, optimizer, monitor)
    assert monitor_lines.lines == []


# Lightning ------------------------------------------------------------------------------


def rank_zero_logger() -> str:
    """The logger ``rank_zero_info`` writes to: both Lightning packages share the function,
    and the one imported last names its logger."""
    from lightning_utilities.core import rank_zero

    return rank_zero.log.name


def _lightning_fit(flavour_name: str, callback: Any, tmp_path: Path) -> None:
    flavour = importlib.import_module(flavour_name)

    class Classifier(flavour.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 3)

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.net(inputs)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inputs, targets = batch
            return nn.functional.cross_entropy(self(inputs), targets)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    inputs = torch.randn(8 * STEPS, 4)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs, (inputs[:, 0] > 0).long()), batch_size=8)
    trainer = flavour.Trainer(max_steps=STEPS, accelerator="cpu", logger=False,
                              callbacks=[callback], enable_checkpointing=False,
                              enable_progress_bar=False, enable_model_summary=False,
                              default_root_dir=str(tmp_path))
    trainer.fit(Classifier(), data)


def _rare_probe() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(16, 4, generator=generator)
    return inputs, torch.full((16,), 2, dtype=torch.long)


@pytest.mark.parametrize("flavour_name", sorted(LIGHTNING))
def test_lightning_callback_prints_through_rank_zero_info_and_keeps_its_values(
        flavour_name: str, tmp_path: Path) -> None:
    callback = importlib.import_module(LIGHTNING[flavour_name]).RaresignalCallback(
        run_name="where-lightning", probes={"rare": _rare_probe()})
    with collecting(rank_zero_logger()) as lines:
        _lightning_fit(flavour_name, callback, tmp_path)

    assert lines.lines == [
        "raresignal: run 'where-lightning' measures in process only (no server); read the "
        "values with latest()",
        f"raresignal: run 'where-lightning' completed: {STEPS} steps measured; nothing was "
        "sent (no server), the last values stay in latest()"]
    # After fit, the closed run's monitor and its last values are still there.
    assert callback.monitor is not None and callback.monitor.step_count == STEPS
    assert "probe_accuracy{probe=rare}" in callback.latest()
    assert callback.latest() == callback.monitor.latest()


def test_lightning_callback_names_the_run_id_in_its_summary(
        server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from raresignal.integrations.lightning import RaresignalCallback

    callback = RaresignalCallback(server=server.grpc_target, run_name="where-lightning-srv",
                                  probes={"rare": _rare_probe()},
                                  config=MonitorConfig(report_interval_seconds=0.1))
    with collecting(rank_zero_logger()) as lines, caplog.at_level(logging.WARNING):
        _lightning_fit("lightning.pytorch", callback, tmp_path)

    run_id = callback.run_id
    assert run_id
    # The final state, taken after close, has nothing left to flush: no warning about it.
    assert not [r for r in caplog.records
                if r.name == "raresignal.agent.monitor" and r.levelno >= logging.WARNING]
    assert len(_matching(lines.lines, f"reports to {server.grpc_target}")) == 1
    # Printed during training if the id came back before the end, and then only once.
    assert len(_matching(lines.lines, f"has run id {run_id}")) <= 1
    assert _matching(lines.lines, "steps measured") == [
        f"raresignal: run 'where-lightning-srv' completed: {STEPS} steps measured, every "
        f"report delivered; its alerts: `raresignal alerts --server {server.grpc_target} "
        f"--run {run_id}`"]


# Hugging Face ---------------------------------------------------------------------------


class Tokens(torch.utils.data.Dataset):
    def __init__(self, seed: int, count: int) -> None:
        self.ids = torch.randint(0, 16, (count, 6),
                                 generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def _hf_train(callback: RaresignalTrainerCallback, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=6, n_embd=8, n_layer=1,
                                       n_head=2))
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=STEPS,
                             per_device_train_batch_size=4, logging_steps=2,
                             save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=Tokens(0, 32), callbacks=[callback]).train()


def test_hf_callback_prints_on_the_main_process_and_keeps_its_values(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    callback = RaresignalTrainerCallback(run_name="where-hf", probes={"rare": Tokens(1, 8)})
    _hf_train(callback, tmp_path)

    printed = [line for line in capsys.readouterr().out.splitlines()
               if line.startswith("raresignal: run ")]
    assert printed == [
        "raresignal: run 'where-hf' measures in process only (no server); read the values "
        "with latest()",
        f"raresignal: run 'where-hf' completed: {STEPS} steps measured; nothing was sent "
        "(no server), the last values stay in latest()"]
    assert callback.monitor is not None and callback.monitor.step_count == STEPS
    assert "probe_loss{probe=rare}" in callback.latest()


def test_hf_callback_names_the_run_id_in_its_summary(
        server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    callback = RaresignalTrainerCallback(server=server.grpc_target, run_name="where-hf-srv",
                                         probes={"rare": Tokens(1, 8)},
                                         config=MonitorConfig(report_interval_seconds=0.1))
    _hf_train(callback, tmp_path)

    printed = capsys.readouterr().out.splitlines()
    run_id = callback.monitor.run_id if callback.monitor is not None else None
    assert run_id
    assert len(_matching(printed, f"reports to {server.grpc_target}")) == 1
    assert len(_matching(printed, f"has run id {run_id}")) <= 1
    assert _matching(printed, "steps measured") == [
        f"raresignal: run 'where-hf-srv' completed: {STEPS} steps measured, every report "
        f"delivered; its alerts: `raresignal alerts --server {server.grpc_target} "
        f"--run {run_id}`"]
