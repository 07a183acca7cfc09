"""Every way a user may hand over a probe ends as the same fixed Probe."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from raresignal.agent.api import Probe
from raresignal.integrations.torch import move_to, split_batch, to_probe, to_probes

INPUTS = torch.arange(40, dtype=torch.float32).reshape(10, 4)
TARGETS = torch.arange(10) % 3


class DictDataset(Dataset):
    """Hugging Face style examples: a dict with the targets under "labels"."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": INPUTS[index].long(), "attention_mask": torch.ones(4),
                "labels": TARGETS[index]}


@pytest.mark.parametrize("source", [
    (INPUTS, TARGETS),
    Probe(INPUTS, TARGETS),
    TensorDataset(INPUTS, TARGETS),
    DataLoader(TensorDataset(INPUTS, TARGETS), batch_size=3),
    [(INPUTS[:6], TARGETS[:6]), (INPUTS[6:], TARGETS[6:])],
], ids=["pair", "probe", "dataset", "loader", "iterable"])
def test_every_source_gives_the_same_examples_in_order(source: object) -> None:
    probe = to_probe(source)
    assert torch.equal(probe.inputs, INPUTS)
    assert torch.equal(probe.targets, TARGETS)


def test_max_examples_truncates_each_kind_of_source() -> None:
    for source in [(INPUTS, TARGETS), TensorDataset(INPUTS, TARGETS),
                   DataLoader(TensorDataset(INPUTS, TARGETS), batch_size=4)]:
        probe = to_probe(source, max_examples=5)
        assert torch.equal(probe.inputs, INPUTS[:5]) and torch.equal(probe.targets, TARGETS[:5])


def test_dict_dataset_keeps_inputs_as_a_dict_and_labels_as_targets() -> None:
    probe = to_probe(DataLoader(DictDataset(), batch_size=4), max_examples=6)
    assert set(probe.inputs) == {"input_ids", "attention_mask"}
    assert probe.inputs["input_ids"].shape == (6, 4)
    assert torch.equal(probe.targets, TARGETS[:6])
    assert sorted(to_probes({"rare": DictDataset()})) == ["rare"]


def test_split_batch_understands_tuples_and_mappings_and_names_what_is_wrong() -> None:
    inputs, targets = split_batch((INPUTS, TARGETS, "extra"))
    assert inputs is INPUTS and targets is TARGETS
    inputs, targets = split_batch({"x": INPUTS, "labels": TARGETS})
    assert set(inputs) == {"x"} and targets is TARGETS
    with pytest.raises(ValueError, match="labels"):
        split_batch({"x": INPUTS})
    with pytest.raises(ValueError, match="pair"):
        split_batch(INPUTS)


def test_bad_probes_are_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="empty"):
        to_probe(TensorDataset(INPUTS[:0], TARGETS[:0]))
    with pytest.raises(ValueError, match="no batches"):
        to_probe(DataLoader(TensorDataset(INPUTS[:0], TARGETS[:0]), batch_size=2))
    with pytest.raises(TypeError, match="a probe must be"):
        to_probe(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 1"):
        to_probe((INPUTS, TARGETS), max_examples=0)


def test_move_to_reaches_tensors_inside_probes_and_containers() -> None:
    moved = move_to(Probe({"a": INPUTS}, TARGETS), torch.device("meta"))
    assert moved.inputs["a"].device.type == "meta" and moved.targets.device.type == "meta"
