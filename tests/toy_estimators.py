"""The smallest estimator, shared by tests in every folder that need a real Monitor whose
reports are easy to predict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from raresignal.agent.api import Measurement, StepContext


class LossEstimator:
    """Reports the step's training loss, every step."""

    name = "toy_loss"
    default_interval = 1
    expensive = False

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        assert ctx.loss is not None
        return [Measurement("loss", float(ctx.loss))]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class RareEstimator(LossEstimator):
    """An expensive estimator with a long default cadence, like the probes: its interval
    shows whether the monitor learned the run's planned length."""

    name = "toy_rare"
    default_interval = 200
    expensive = True
