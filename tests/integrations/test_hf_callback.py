"""The Transformers callback in a real ``Trainer.train`` of a tiny, randomly initialised
GPT-2 (built from a config: nothing is downloaded) against a real server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from storage_reads import get_series, list_runs
from toy_estimators import RareEstimator
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from raresignal.agent import MonitorConfig
from raresignal.agent.cadence import plan_cadence
from raresignal.integrations.hf import RaresignalTrainerCallback
from raresignal.protos.v1 import common_pb2

STEPS = 4
VOCAB = 24
LENGTH = 8


class TokenDataset(torch.utils.data.Dataset):
    """Causal-LM examples as the Trainer expects them: input_ids, attention_mask, labels."""

    def __init__(self, seed: int, count: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (count, LENGTH), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index],
                "attention_mask": torch.ones(LENGTH, dtype=torch.long),
                "labels": self.ids[index]}


class WeightsPerStep(TrainerCallback):
    """Keeps the weights each optimizer step starts from, to recompute what was measured."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                      **kwargs: Any) -> None:
        self.weights[state.global_step] = {k: v.detach().clone()
                                           for k, v in model.state_dict().items()}


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=16,
                                      n_layer=1, n_head=2))


def test_trainer_train_reports_loss_and_probes_to_the_server(server: Any,
                                                            tmp_path: Path) -> None:
    callback = RaresignalTrainerCallback(
        server=server.grpc_target, run_name="hf-tiny-gpt2",
        probes={"rare": TokenDataset(1, 8)}, common_probe=TokenDataset(2, 8),
        config=MonitorConfig(report_interval_seconds=0.1))
    weights = WeightsPerStep()
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=STEPS,
                             per_device_train_batch_size=4, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, learning_rate=1e-2, max_grad_norm=0.0)
    trainer = Trainer(model=_model(), args=args, train_dataset=TokenDataset(0, 32),
                      callbacks=[weights, callback])
    trainer.train()

    run_id = callback.state_dict()["run_id"]
    assert run_id
    losses = get_series(server.grpc_target, run_id, "loss")
    assert [step for step, _ in losses] == list(range(STEPS))
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    for (_, stored), hf_loss in zip(losses, logged, strict=True):
        # The Trainer's own log rounds the loss to 4 decimals.
        assert stored == pytest.approx(hf_loss, abs=1e-4)

    # The stored probe loss is the model's own causal-LM loss on the probe with the
    # weights of that step (float32 forward passes, identical up to summation order).
    probe = TokenDataset(1, 8)
    reference = _model()
    probe_loss = get_series(server.grpc_target, run_id, "probe_loss", {"probe": "rare"})
    assert probe_loss
    for step, value in probe_loss:
        reference.load_state_dict(weights.weights[step])
        reference.eval()
        with torch.no_grad():
            expected = reference(input_ids=probe.ids, labels=probe.ids).loss.item()
        assert value == pytest.approx(expected, rel=1e-4)

    run = next(r for r in list_runs(server.grpc_target) if r.run_id == run_id)
    assert run.state == common_pb2.RUN_STATE_COMPLETED
    # The headline values joined the Trainer's log history.
    assert any("raresignal/probe_accuracy/rare" in entry
               for entry in trainer.state.log_history)


class LogRecorder(TrainerCallback):
    """What a reporting integration receives: a copy of every log dict."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
               **kwargs: Any) -> None:
        self.logs.append(dict(logs))


def test_headline_values_join_the_training_logs_at_logging_steps(server: Any,
                                                                 tmp_path: Path) -> None:
    steps, every = 8, 2
    callback = RaresignalTrainerCallback(
        server=server.grpc_target, run_name="hf-logging", probes={"rare": TokenDataset(1, 8)},
        common_probe=TokenDataset(2, 8), config=MonitorConfig(report_interval_seconds=0.1))
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=steps,
                             per_device_train_batch_size=4, logging_steps=every,
                             save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, learning_rate=1e-2)
    # Listed before raresignal, as the Trainer places its report_to integrations.
    reporter = LogRecorder()
    trainer = Trainer(model=_model(), args=args, train_dataset=TokenDataset(0, 32),
                      callbacks=[reporter, callback])
    callback.attach(trainer)
    trainer.train()

    key = "raresignal/probe_accuracy/rare"
    stored = get_series(server.grpc_target, callback.state_dict()["run_id"], "probe_accuracy",
                        {"probe": "rare"})
    assert stored
    first_measured = stored[0][0] + 1  # the monitor counts steps from 0, the Trainer from 1
    # The training logs, every logging_steps, carry the latest measured value; the
    # summary at the end of training does not.
    training = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in training] == list(range(every, steps + 1, every))
    with_values = [entry for entry in training if key in entry]
    assert [entry["step"] for entry in with_values] == [
        step for step in range(every, steps + 1, every) if step >= first_measured]
    for entry in with_values:
        latest = [value for step, value in stored if step <= entry["step"] - 1][-1]
        assert entry[key] == latest
    assert not any(key in entry for entry in trainer.state.log_history if "loss" not in entry)
    # Attached ahead of the reporter, the values reached what it logs too.
    assert [logs[key] for logs in reporter.logs if key in logs] == [
        entry[key] for entry in with_values]


def test_the_trainers_planned_steps_set_the_cadences(tmp_path: Path) -> None:
    callback = RaresignalTrainerCallback(server=None, run_name="hf-planned",
                                         estimators=[RareEstimator()])
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), num_train_epochs=2,
                             per_device_train_batch_size=8, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, learning_rate=1e-2)
    trainer = Trainer(model=_model(), args=args, train_dataset=TokenDataset(0, 32))
    trainer.add_callback(callback)
    trainer.train()

    assert callback.monitor is not None
    assert callback.monitor.total_steps == trainer.state.max_steps == 8
    expected = plan_cadence(RareEstimator.default_interval, True, 8)
    assert callback.monitor.intervals == {"toy_rare": expected.interval}
    assert callback.latest()["agent_estimator_floor_interval_steps{estimator=toy_rare}"] == (
        expected.floor)
