"""The cadence rule: planned length and default cadence -> starting interval and floor."""

from __future__ import annotations

import pytest
import torch

from raresignal.agent import Monitor, MonitorConfig, Probe
from raresignal.agent.cadence import Cadence, plan_cadence, planned_warmup


@pytest.mark.parametrize(("default", "expensive", "total", "first", "expected"), [
    # No planned length: the default, stretchable up to 64x.
    (200, True, None, 0, Cadence(200, 12800)),
    (1, True, None, 0, Cadence(1, 64)),
    # The loss and gradient statistics: every step, never stretched, whatever the length.
    (1, False, None, 0, Cadence(1, 1)),
    (1, False, 500, 0, Cadence(1, 1)),
    # A 500-step run: 80 runs aimed at (every 10 steps at most), at least 40 kept.
    (200, True, 500, 0, Cadence(10, 12)),
    (500, False, 500, 0, Cadence(10, 12)),
    # Sharpness waits 100 steps: the rule counts the 400 after them.
    (500, True, 500, 100, Cadence(10, 10)),
    # A cadence already frequent enough stays; its floor still follows the length.
    (4, False, 500, 0, Cadence(4, 12)),
    (10, True, 1200, 0, Cadence(10, 30)),
    # Never more often than every 10 steps, however short the run.
    (200, True, 50, 0, Cadence(10, 10)),
    (500, True, 80, 100, Cadence(10, 10)),
    # The 4000-step run whose rare signals ran once: 80 probe runs aimed at, 40 kept.
    (200, True, 4000, 0, Cadence(50, 100)),
    (100, True, 4000, 0, Cadence(50, 100)),
    # A long run keeps the defaults, and the floor never passes 64x the default.
    (200, True, 100_000, 0, Cadence(200, 2_500)),
    (200, True, 10_000_000, 0, Cadence(200, 12_800)),
])
def test_cadence_table(default: int, expensive: bool, total: int | None, first: int,
                       expected: Cadence) -> None:
    assert plan_cadence(default, expensive, total, first) == expected


def test_the_rule_reads_its_settings_from_the_monitor_config() -> None:
    config = MonitorConfig(planned_measurements=20, floor_measurements=5,
                           min_planned_interval=2, max_interval_factor=8)
    assert plan_cadence(200, True, 100, 0, config) == Cadence(5, 20)
    assert plan_cadence(2, True, 10_000, 0, config) == Cadence(2, 16)


def test_an_estimator_that_needs_more_readings_declares_its_own_floor_count() -> None:
    # The probes' forward-only loss: every 10 steps, and at least 500 readings kept, so a
    # 5000-step run reads it every 10 steps (the default M of 40 would allow 125).
    assert plan_cadence(10, False, 5000, 0, None, 500) == Cadence(10, 10)
    assert plan_cadence(10, False, 20_000, 0, None, 500) == Cadence(10, 40)
    assert plan_cadence(10, False, 5000) == Cadence(10, 125)
    # Never past 64x its default, and never tighter than its starting interval.
    assert plan_cadence(10, False, 10_000_000, 0, None, 500) == Cadence(10, 640)
    assert plan_cadence(10, False, 600, 0, None, 500) == Cadence(10, 10)


def test_the_monitor_keeps_the_rare_probe_loss_dense_and_the_common_one_sparse() -> None:
    model = torch.nn.Linear(4, 3)
    probe = Probe(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    monitor = Monitor(model, torch.optim.SGD(model.parameters(), lr=0.1), server=None,
                      probes={"rare": probe}, common_probe=probe, total_steps=5000)
    try:
        assert (monitor.intervals["probe_loss"], monitor.floors["probe_loss"]) == (10, 10)
        # The common probe's loss, which no default alert reads, goes with the geometry.
        assert monitor.floors["common_probe_loss"] == monitor.floors["probes"] == 125
        assert monitor.intervals["common_probe_loss"] == monitor.intervals["probes"] == 62
    finally:
        monitor.close()


def test_floor_measurements_cannot_exceed_planned_measurements() -> None:
    with pytest.raises(ValueError, match="floor_measurements"):
        MonitorConfig(planned_measurements=10, floor_measurements=20)


def test_a_warm_up_longer_than_a_fifth_of_the_run_is_cut_to_it() -> None:
    assert planned_warmup(1000, None, 0.2) == 1000
    assert planned_warmup(1000, 500, 0.2) == 100
    assert planned_warmup(1000, 100_000, 0.2) == 1000
