"""Says which signals a run cannot have, so their absence reads as a fact, not a fault."""

from __future__ import annotations

from collections.abc import Sequence

from raresignal.agent.api import Measurement, StepContext
from raresignal.agent.estimators.shared import DefaultEstimator, SharedState

# Signals that rest on labels sampled from the model's likelihood, by the ``estimator``
# label value they are reported unavailable under.
FISHER = "fisher"  # Fisher traces, spectrum, effective rank, empirical Fisher
PROBE_FISHER = "probe_fisher"  # probe Fisher mass (and ratio), absorption, residual, retention


class UnavailableSignalsEstimator(DefaultEstimator):
    """``agent_estimator_unavailable{estimator=...} = 1`` for each signal this run's task
    cannot measure, at the Fisher's cadence. A gauge rather than only a log line: a
    dashboard panel or alert that stays empty can then be told apart from one whose
    estimator failed or has not run yet, long after the start-up log has scrolled away."""

    name = "unavailable"
    expensive = False

    def __init__(self, shared: SharedState, signals: Sequence[str]) -> None:
        super().__init__(shared, shared.config.fisher_interval)
        self.signals = tuple(signals)

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        return [Measurement("agent_estimator_unavailable", 1.0, (("estimator", signal),))
                for signal in self.signals]
