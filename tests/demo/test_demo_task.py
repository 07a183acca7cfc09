"""The demo's task does what the demo claims, before any monitor is put on it: the rare
rule is learned from a few percent of the data, survives in the control run, and decays
after the induced collapse while the common rule stays intact."""

from __future__ import annotations

import torch
from torch import nn

from raresignal.demo.task import (
    TRIGGER,
    TaskConfig,
    TinyTransformer,
    make_batch,
    make_examples,
)
from raresignal.demo.training import (
    BATCH_SIZE,
    COLLAPSE_WEIGHT_DECAY,
    LEARNING_RATE,
    WEIGHT_DECAY,
)


def _accuracy(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(tokens).argmax(-1) == labels).float().mean().item()


def _train(collapse_at: int | None, steps: int = 450) -> list[tuple[int, float, float]]:
    torch.manual_seed(0)
    task = TaskConfig()
    data = torch.Generator().manual_seed(0)
    probes = torch.Generator().manual_seed(99)
    rare_x, rare_y = make_examples(256, True, probes)
    common_x, common_y = make_examples(256, False, probes)
    model = TinyTransformer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE,
                                  weight_decay=WEIGHT_DECAY)
    rare_fraction = task.rare_fraction
    history = []
    for step in range(steps):
        if step == collapse_at:
            rare_fraction = 0.0
            optimizer.param_groups[0]["weight_decay"] = COLLAPSE_WEIGHT_DECAY
        tokens, labels = make_batch(BATCH_SIZE, rare_fraction, data)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tokens), labels).backward()
        optimizer.step()
        if step % 25 == 24:
            history.append((step, _accuracy(model, rare_x, rare_y),
                            _accuracy(model, common_x, common_y)))
    return history


def test_batches_mix_rare_and_common_examples_with_the_right_labels() -> None:
    tokens, labels = make_batch(4000, 0.03, torch.Generator().manual_seed(1))
    rare = tokens[:, 0] == TRIGGER
    assert 0.02 < rare.float().mean().item() < 0.04
    assert torch.equal(labels[rare], tokens[rare, 2])
    assert torch.equal(labels[~rare], tokens[~rare, 1])


def test_rare_rule_is_learned_kept_in_the_control_and_lost_after_the_collapse() -> None:
    torch.set_num_threads(1)
    healthy = _train(collapse_at=None)
    collapsed = _train(collapse_at=250)
    # Before step 250 both runs are the same run.
    assert healthy[:9] == collapsed[:9]
    peak = max(rare for step, rare, _ in healthy if step < 250)
    assert peak >= 0.9
    assert min(rare for step, rare, _ in healthy if step >= 250) >= 0.9
    assert collapsed[-1][1] <= peak / 2, collapsed
    assert all(common >= 0.95 for step, _, common in collapsed if step >= 150)
