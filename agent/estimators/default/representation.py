"""The representation estimator: ranks and dormant units of one layer's features."""

from __future__ import annotations

from collections.abc import Sequence

from raresignal.agent.api import Measurement, Probe, StepContext
from raresignal.agent.estimators.isolation import preserved_training_state
from raresignal.agent.estimators.objective import to_device
from raresignal.agent.estimators.representation import capture_features, representation_stats
from raresignal.agent.estimators.shared import DefaultEstimator, SharedState, finite


class RepresentationEstimator(DefaultEstimator):
    """Effective rank, stable rank and dormant fraction of one layer's features on a probe."""

    name = "representation"
    expensive = False

    def __init__(self, shared: SharedState, layer: str, probe: Probe) -> None:
        shared.model.get_submodule(layer)  # fails early, naming the layer, if it is absent
        super().__init__(shared, shared.config.representation_interval)
        self.layer = layer
        self.probe = probe

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        model = self.shared.model
        inputs = to_device(self.probe.inputs, self.shared.parameters.device)
        with preserved_training_state(model):
            features = capture_features(model, self.layer,
                                        lambda: self.shared.forward(model, inputs))
        stats = representation_stats(features, self.shared.config.dormant_threshold)
        labels = (("layer", self.layer),)
        return finite([
            Measurement("representation_effective_rank", stats.effective_rank, labels),
            Measurement("representation_stable_rank", stats.stable_rank, labels),
            Measurement("representation_dormant_fraction", stats.dormant_fraction, labels),
        ])
