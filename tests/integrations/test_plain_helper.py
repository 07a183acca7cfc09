"""The plain-PyTorch helper: probes in any shape, and the planned length sets the
cadences."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from toy_estimators import RareEstimator

from raresignal.agent.cadence import plan_cadence
from raresignal.integrations.plain import monitor_for


def _data(seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(count, 6, generator=generator)
    return inputs, (inputs[:, 0] > 0).long()


def test_monitor_for_passes_the_planned_length_and_loads_the_probes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(*_data(0, 64)), batch_size=16)
    epochs = 5
    monitor = monitor_for(model, optimizer,
                          probes={"rare": DataLoader(TensorDataset(*_data(1, 12)),
                                                     batch_size=4)},
                          common_probe=_data(2, 16), total_steps=epochs * len(loader),
                          server=None, run_name="plain")
    assert monitor.total_steps == 20
    for _ in range(epochs):
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs), targets)
            loss.backward()
            monitor.step(loss=loss, batch=(inputs, targets))
            optimizer.step()
    monitor.close()
    expected = plan_cadence(200, True, 20)
    assert monitor.intervals["probes"] == expected.interval == 10
    latest = monitor.latest()
    assert "probe_loss{probe=rare}" in latest and "probe_loss{probe=common}" in latest


def test_monitor_for_takes_estimators_and_learns_the_length_later() -> None:
    model = nn.Linear(6, 2)
    monitor = monitor_for(model, None, estimators=[RareEstimator()])
    assert monitor.total_steps is None and monitor.intervals == {"toy_rare": 200}
    monitor.plan(4000)
    assert monitor.total_steps == 4000 and monitor.intervals == {"toy_rare": 50}
    monitor.close()
