"""The cadence rule: planned length and default cadence -> starting interval and floor."""

from __future__ import annotations

import pytest

from raresignal.agent import MonitorConfig
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


def test_floor_measurements_cannot_exceed_planned_measurements() -> None:
    with pytest.raises(ValueError, match="floor_measurements"):
        MonitorConfig(planned_measurements=10, floor_measurements=20)


def test_a_warm_up_longer_than_a_fifth_of_the_run_is_cut_to_it() -> None:
    assert planned_warmup(1000, None, 0.2) == 1000
    assert planned_warmup(1000, 500, 0.2) == 100
    assert planned_warmup(1000, 100_000, 0.2) == 1000
