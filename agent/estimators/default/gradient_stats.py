"""The gradient stats estimator: the cheap per-step readings a training log already has."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from raresignal.agent.api import Measurement, StepContext
from raresignal.agent.estimators.gradient_stats import (
    UpdateRatioTracker,
    gradient_norm_and_nonfinite,
    ratio_at_peak_learning_rate,
)
from raresignal.agent.estimators.shared import DefaultEstimator, SharedState


class GradientStatsEstimator(DefaultEstimator):
    """Loss, pre-clip gradient norm, update/weight ratio (also at the run's peak learning
    rate), learning rate, non-finite count."""

    name = "gradient_stats"
    expensive = False

    def __init__(self, shared: SharedState) -> None:
        super().__init__(shared, shared.config.gradient_stats_interval)
        self.updates = UpdateRatioTracker(shared.parameters,
                                           every=shared.config.update_ratio_interval)
        self.nonfinite_steps = 0
        self.peak_learning_rate = 0.0  # of the first parameter group, over the whole run

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        grad_norm, bad = gradient_norm_and_nonfinite(self.shared.parameters)
        out = [Measurement("grad_norm", grad_norm)]
        if ctx.loss is not None:
            loss = float(ctx.loss.detach().float().mean())
            bad += 0 if math.isfinite(loss) else 1
            out.append(Measurement("loss", loss))
        self.nonfinite_steps += 1 if bad else 0
        out += [Measurement("nonfinite_values", float(bad)),
                Measurement("nonfinite_steps_total", float(self.nonfinite_steps))]
        lr = self._learning_rate(ctx)
        if lr is not None:
            out.append(Measurement("learning_rate", lr))
            if math.isfinite(lr):
                self.peak_learning_rate = max(self.peak_learning_rate, lr)
        _, ratio = self.updates.observe(ctx.step)
        if ratio is not None:
            out.append(Measurement("update_to_weight_ratio", ratio))
            at_peak = ratio_at_peak_learning_rate(ratio, lr, self.peak_learning_rate)
            if at_peak is not None:
                out.append(Measurement("update_to_weight_ratio_at_peak_lr", at_peak))
        # Non-finite loss and grad norm are reported: they are the reading that matters.
        return out

    def _learning_rate(self, ctx: StepContext) -> float | None:
        optimizer = ctx.optimizer or self.shared.optimizer
        if optimizer is None or not optimizer.param_groups:
            return None
        lr = optimizer.param_groups[0].get("lr")
        return None if lr is None else float(lr)

    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_steps": self.nonfinite_steps,
                "peak_learning_rate": self.peak_learning_rate}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.peak_learning_rate = float(state.get("peak_learning_rate", 0.0))
