"""The agent's defaults as the README states them agree with the dataclasses that define
them."""

from __future__ import annotations

from pathlib import Path

from raresignal.agent import MonitorConfig
from raresignal.agent.estimators import EstimatorConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_states_the_sketch_size_and_overhead_target_the_agent_uses() -> None:
    readme = README.read_text()
    assert f"(d = {EstimatorConfig().sketch_dim})" in readme
    target = f"{MonitorConfig().target_overhead:.0%}"
    assert f"held under {target} of step time" in readme
    assert f"≤ {target} of step time" in readme
