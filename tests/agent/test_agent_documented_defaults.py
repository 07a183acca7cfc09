"""The agent's defaults as the README states them agree with the dataclasses that define
them."""

from __future__ import annotations

from pathlib import Path

from raresignal.agent import MonitorConfig
from raresignal.agent.cadence import plan_cadence
from raresignal.agent.estimators import EstimatorConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_states_the_sketch_size_and_overhead_target_the_agent_uses() -> None:
    readme = README.read_text()
    assert f"(d = {EstimatorConfig().sketch_dim})" in readme
    target = f"{MonitorConfig().target_overhead:.0%}"
    assert f"held near {target} of step time" in readme
    assert f"at about {target} of step time" in readme


def test_readme_states_the_overhead_window_and_the_curvature_unit_size() -> None:
    readme = README.read_text()
    window = MonitorConfig().overhead_window_steps
    assert f"the last {window} steps (`MonitorConfig.overhead_window_steps`)" in readme
    vectors = EstimatorConfig().curvature_unit_vectors
    assert f"`EstimatorConfig.curvature_unit_vectors` = {vectors} stored vectors" in readme


def test_readme_states_the_cadence_rule_the_agent_uses() -> None:
    readme = README.read_text()
    config = MonitorConfig()
    interval = (f"`min(d, max({config.min_planned_interval}, "
                f"n // {config.planned_measurements}))`")
    floor = (f"`min({config.max_interval_factor}·d, "
             f"max(interval, n // {config.floor_measurements}))`")
    assert interval in readme and floor in readme
    assert f"{config.planned_measurements} measurements" in readme
    assert f"at least {config.floor_measurements} measurements" in readme
    assert "at least a\nquarter" in readme and config.min_effort == 0.25
    # The table's example column: the probes' default cadence over 500 and 4000 steps.
    probes = EstimatorConfig().probes_interval
    assert f"probes (`d` = {probes})" in readme
    short, long = plan_cadence(probes, True, 500), plan_cadence(probes, True, 4000)
    assert f"| {short.interval} | {long.interval} | `d` |" in readme
    assert f"| {short.floor} | {long.floor} | `{config.max_interval_factor}·d` |" in readme
