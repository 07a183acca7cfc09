"""The subspace drift estimator: how far the dominant subspace moved since last time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from raresignal.agent.api import Measurement, StepContext
from raresignal.agent.estimators.shared import DefaultEstimator, SharedState, finite
from raresignal.agent.estimators.subspace import chance_corrected_overlap, principal_angles


class SubspaceDriftEstimator(DefaultEstimator):
    """Chance-corrected overlap and largest principal angle of U_dom now vs last run."""

    name = "subspace_drift"
    expensive = False

    def __init__(self, shared: SharedState) -> None:
        super().__init__(shared, shared.config.drift_interval)
        self.previous: torch.Tensor | None = None

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        if not self.shared.dominant.ready:
            return []
        current = self.shared.dominant.basis().clone()
        previous, self.previous = self.previous, current
        if previous is None or previous.shape != current.shape:
            return []
        angles = principal_angles(current, previous)
        return finite([
            Measurement("subspace_overlap", chance_corrected_overlap(current, previous)),
            Measurement("subspace_max_angle_radians", float(angles[0])),
        ])

    def state_dict(self) -> dict[str, Any]:
        return {"previous": None if self.previous is None else self.previous.cpu()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        previous = state.get("previous")
        self.previous = None if previous is None else previous.to(self.shared.parameters.device)
