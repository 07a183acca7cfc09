"""The gradient subspace estimator: feeds the dominant subspace that others read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from raresignal.agent.api import Measurement, StepContext
from raresignal.agent.estimators.shared import DefaultEstimator, SharedState


class GradientSubspaceEstimator(DefaultEstimator):
    """Feeds the step's gradient sketch into the Frequent Directions sketch (no output)."""

    name = "gradient_subspace"
    expensive = False

    def __init__(self, shared: SharedState) -> None:
        super().__init__(shared, shared.config.subspace_interval)

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        sketch = self.shared.step_gradient_sketch(ctx)
        if sketch is not None and bool(torch.isfinite(sketch).all()):
            self.shared.dominant.insert(sketch)
        return []

    def state_dict(self) -> dict[str, Any]:
        return self.shared.dominant.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.shared.dominant.load_state_dict(dict(state))
