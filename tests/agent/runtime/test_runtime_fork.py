"""DataLoader workers fork while the sender thread holds a live gRPC channel: nothing
hangs, nothing crashes, every report arrives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ports import free_port
from runtime_server import stored_series
from runtime_toys import LossEstimator, small_classifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from raresignal.agent import Monitor, MonitorConfig
from raresignal.server.process import ServerProcess


@pytest.mark.timeout(120)
def test_forked_dataloader_workers_with_a_live_sender(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    server = ServerProcess(tmp_path / "rs.db", tmp_path, grpc_port=free_port())
    server.start()
    try:
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, 8, generator=generator),
                             torch.randint(0, 3, (64,), generator=generator))
        # Not persistent: the workers fork again at every epoch, each time after the
        # sender's channel exists and while batches may be in flight.
        loader = DataLoader(data, batch_size=16, num_workers=2,
                            multiprocessing_context="fork")
        model = small_classifier()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        monitor = Monitor(model, optimizer, server=server.grpc_target, run_name="fork",
                          estimators=[LossEstimator()],
                          config=MonitorConfig(spool_dir=str(tmp_path / "spool"),
                                               report_interval_seconds=0.02,
                                               max_interval_factor=1))
        losses = {}
        step = 0
        for _ in range(3):
            for inputs, targets in loader:
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(inputs), targets)
                loss.backward()
                monitor.step(loss=loss, batch=(inputs, targets))
                optimizer.step()
                losses[step] = loss.item()
                step += 1
        assert monitor.close() is True
        assert monitor.run_id is not None
        assert stored_series(server.grpc_target, monitor.run_id) == losses
        assert len(losses) == 12
    finally:
        server.stop()
