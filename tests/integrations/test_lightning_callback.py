"""The Lightning callback in a real ``Trainer.fit`` against a real server, for both
Lightning packages, plus checkpoint/resume."""

from __future__ import annotations

import csv
import importlib
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from storage_reads import get_series, list_runs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from toy_estimators import RareEstimator

from raresignal.agent import MonitorConfig
from raresignal.agent.cadence import plan_cadence
from raresignal.protos.v1 import common_pb2

FLAVOURS = {
    "lightning.pytorch": "raresignal.integrations.lightning",
    "pytorch_lightning": "raresignal.integrations.pytorch_lightning",
}
STEPS = 6


def _data(seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(count, 6, generator=generator)
    return inputs, (inputs[:, 0] > 0).long() + (inputs[:, 1] > 1).long()


def _module_class(flavour: Any) -> type:
    """A tiny classifier of the given Lightning package that remembers, per step, its
    weights and loss, so the test can recompute what the monitor measured."""

    class Classifier(flavour.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
            self.weights_at: dict[int, dict[str, torch.Tensor]] = {}
            self.loss_at: dict[int, float] = {}

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.net(inputs)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inputs, targets = batch
            self.weights_at[self.trainer.global_step] = {
                k: v.detach().clone() for k, v in self.state_dict().items()}
            loss = nn.functional.cross_entropy(self(inputs), targets)
            self.loss_at[self.trainer.global_step] = loss.item()
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Classifier


def _config() -> MonitorConfig:
    return MonitorConfig(report_interval_seconds=0.1)


def _fit(flavour_name: str, server: Any, tmp_path: Path, steps: int,
         ckpt_path: str | None = None, extra: tuple[Any, ...] = (),
         log_every_n_steps: int = 1, max_epochs: int | None = None,
         csv_logger: bool = True) -> tuple[Any, Any, Any]:
    """Fits the classifier for at most ``steps`` optimizer steps (4 per epoch), logging to
    a CSV logger (or none), with the ``extra`` callbacks after raresignal's."""
    flavour = importlib.import_module(flavour_name)
    callback_module = importlib.import_module(FLAVOURS[flavour_name])
    torch.manual_seed(0)
    model = _module_class(flavour)()
    callback = callback_module.RaresignalCallback(
        server=server.grpc_target, run_name=f"fit-{flavour_name}",
        probes={"rare": _data(1, 32)},
        common_probe=DataLoader(TensorDataset(*_data(2, 32)), batch_size=8),
        config=_config())
    loggers = flavour.loggers.CSVLogger(str(tmp_path), name="csv") if csv_logger else False
    checkpointing = any(isinstance(c, flavour.callbacks.ModelCheckpoint) for c in extra)
    trainer = flavour.Trainer(max_steps=steps, max_epochs=max_epochs,
                              callbacks=[callback, *extra], logger=loggers,
                              accelerator="cpu", devices=1, enable_progress_bar=False,
                              enable_model_summary=False, log_every_n_steps=log_every_n_steps,
                              default_root_dir=str(tmp_path),
                              enable_checkpointing=checkpointing)
    loader = DataLoader(TensorDataset(*_data(0, 64)), batch_size=16)
    trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer, callback, model


@pytest.mark.parametrize("flavour_name", list(FLAVOURS))
def test_fit_reports_every_step_and_probe_accuracy_to_the_server_and_loggers(
        flavour_name: str, server: Any, tmp_path: Path) -> None:
    flavour = importlib.import_module(flavour_name)
    callback_class = importlib.import_module(FLAVOURS[flavour_name]).RaresignalCallback
    assert issubclass(callback_class, flavour.Callback)
    other = next(importlib.import_module(n) for n in FLAVOURS if n != flavour_name)
    assert not issubclass(callback_class, other.Callback)

    trainer, callback, model = _fit(flavour_name, server, tmp_path, STEPS)
    run_id = callback.run_id
    assert run_id

    # The loss of every optimizer step reached the server's storage, at its step.
    losses = get_series(server.grpc_target, run_id, "loss")
    assert [step for step, _ in losses] == list(range(STEPS))
    for step, value in losses:
        # The monitor sends float(loss) of the very tensor Lightning computed: float32
        # rounding of the recorded .item() is the only difference allowed.
        assert value == pytest.approx(model.loss_at[step], rel=1e-6)

    # Probe accuracy as stored equals the accuracy of the weights of that step, exactly
    # (a count over 32 examples has no rounding).
    rare_x, rare_y = _data(1, 32)
    accuracy = get_series(server.grpc_target, run_id, "probe_accuracy", {"probe": "rare"})
    assert accuracy, "no probe accuracy was stored"
    reference = type(model)()
    for step, value in accuracy:
        reference.load_state_dict(model.weights_at[step])
        with torch.no_grad():
            expected = (reference(rare_x).argmax(-1) == rare_y).float().mean().item()
        assert value == expected, step

    # The run closed as completed when fit ended.
    run = next(r for r in list_runs(server.grpc_target) if r.run_id == run_id)
    assert run.state == common_pb2.RUN_STATE_COMPLETED

    # The headline values went to the Lightning logger as well: every step here, from the
    # probe's first measurement on.
    rows = _accuracy_rows(trainer)
    assert [int(r["step"]) for r in rows] == list(range(accuracy[0][0], STEPS))
    _assert_rows_hold_the_latest_value(rows, accuracy)


def test_resume_from_checkpoint_keeps_run_id_baselines_and_step_numbering(
        server: Any, tmp_path: Path) -> None:
    flavour_name = "lightning.pytorch"
    trainer, first, _ = _fit(flavour_name, server, tmp_path, 4)
    checkpoint = tmp_path / "resume.ckpt"
    trainer.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=False)["callbacks"][first.state_key]
    assert saved["run_id"] == first.run_id and saved["step"] == 4

    import lightning.pytorch as pl

    class LoadedState(pl.Callback):
        """Reads the monitor's state right after it started, before its first step."""

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.state = trainer.callbacks[0].monitor.state_dict()

    loaded = LoadedState()
    _, second, _ = _fit(flavour_name, server, tmp_path, 8, ckpt_path=str(checkpoint),
                        extra=(loaded,))
    _assert_same_state(loaded.state["estimators"], saved["estimators"])
    assert loaded.state["step"] == 4 and loaded.state["run_id"] == first.run_id
    assert second.run_id == first.run_id
    losses = get_series(server.grpc_target, first.run_id, "loss")
    # One run, numbered on across the resume, every step exactly once.
    assert [step for step, _ in losses] == list(range(8))
    final = second.state_dict()
    assert final["step"] == 8 and final["sender_id"] == saved["sender_id"]
    assert len([r for r in list_runs(server.grpc_target)
                if r.run_name == f"fit-{flavour_name}"]) == 1


def _assert_same_state(actual: Any, expected: Any) -> None:
    """Estimator state (baselines, warm starts, sketches) equal, tensors element by element."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert set(actual) == set(expected)
        for key in expected:
            _assert_same_state(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            _assert_same_state(a, e)
    else:
        assert actual == expected or (actual != actual and expected != expected)


def _accuracy_rows(trainer: Any) -> list[dict[str, str]]:
    """The CSV logger's rows that hold the rare probe's accuracy."""
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        return [row for row in csv.DictReader(handle)
                if row.get("raresignal/probe_accuracy/rare")]


def _assert_rows_hold_the_latest_value(rows: list[dict[str, str]],
                                       stored: list[tuple[int, float]]) -> None:
    """Each row holds the value the monitor had measured last by its step (probes are
    measured at their own cadence, the logger writes at the Trainer's)."""
    for row in rows:
        latest = [value for step, value in stored if step <= int(row["step"])][-1]
        assert float(row["raresignal/probe_accuracy/rare"]) == latest, row["step"]


@pytest.mark.parametrize("flavour_name", list(FLAVOURS))
def test_loggers_get_headline_values_at_the_trainers_logging_cadence(
        flavour_name: str, server: Any, tmp_path: Path) -> None:
    steps, every = 12, 4
    trainer, callback, _ = _fit(flavour_name, server, tmp_path, steps,
                                log_every_n_steps=every)
    stored = get_series(server.grpc_target, callback.run_id, "probe_accuracy",
                        {"probe": "rare"})
    rows = _accuracy_rows(trainer)
    # Lightning writes on the optimizer steps that complete a logging interval.
    assert [int(r["step"]) for r in rows] == [
        s for s in range(stored[0][0], steps) if (s + 1) % every == 0]
    assert len(rows) >= 2
    _assert_rows_hold_the_latest_value(rows, stored)


@pytest.mark.parametrize("flavour_name", list(FLAVOURS))
def test_early_stopping_and_checkpointing_monitor_a_raresignal_metric(
        flavour_name: str, server: Any, tmp_path: Path) -> None:
    flavour = importlib.import_module(flavour_name)
    monitored = "raresignal/probe_accuracy/rare"
    # Accuracy cannot rise by a whole 1.0, so after the first epoch sets the best value the
    # next one is no improvement and, with patience 1, training stops.
    stopping = flavour.callbacks.EarlyStopping(monitor=monitored, mode="max", patience=1,
                                               min_delta=1.0, check_on_train_epoch_end=True)
    checkpoint = flavour.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"),
                                                   monitor=monitored, mode="max")
    trainer, callback, _ = _fit(flavour_name, server, tmp_path, steps=40, max_epochs=10,
                                extra=(stopping, checkpoint))

    assert trainer.current_epoch == 2 and stopping.stopped_epoch == 1
    assert trainer.global_step == 8
    assert float(trainer.callback_metrics[monitored]) == pytest.approx(
        get_series(server.grpc_target, callback.run_id, "probe_accuracy",
                   {"probe": "rare"})[-1][1])
    assert checkpoint.best_model_score is not None
    assert Path(checkpoint.best_model_path).is_file()


def test_a_trainer_without_loggers_still_gets_the_metrics_and_no_warnings(
        server: Any, tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _, _ = _fit("lightning.pytorch", server, tmp_path, STEPS,
                             csv_logger=False)
    assert "raresignal/probe_accuracy/rare" in trainer.callback_metrics
    assert not [w for w in caught if "raresignal/" in str(w.message)]


def test_the_trainers_estimated_steps_set_the_cadences(tmp_path: Path) -> None:
    flavour = importlib.import_module("lightning.pytorch")
    callback = importlib.import_module(FLAVOURS["lightning.pytorch"]).RaresignalCallback(
        server=None, run_name="planned", estimators=[RareEstimator()])
    trainer = flavour.Trainer(max_epochs=3, callbacks=[callback], logger=False,
                              accelerator="cpu", devices=1, enable_progress_bar=False,
                              enable_model_summary=False, enable_checkpointing=False,
                              default_root_dir=str(tmp_path))
    loader = DataLoader(TensorDataset(*_data(0, 64)), batch_size=16)
    trainer.fit(_module_class(flavour)(), train_dataloaders=loader)

    assert callback.monitor is not None
    assert callback.monitor.total_steps == trainer.estimated_stepping_batches == 12
    expected = plan_cadence(RareEstimator.default_interval, True, 12)
    assert callback.monitor.intervals == {"toy_rare": expected.interval}
    assert callback.latest()["agent_estimator_floor_interval_steps{estimator=toy_rare}"] == (
        expected.floor)
