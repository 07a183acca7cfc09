"""The Fisher estimator: per-group traces and the sketched spectrum of the true Fisher."""

from __future__ import annotations

from collections.abc import Sequence

from raresignal.agent.api import Measurement, StepContext
from raresignal.agent.estimators.fisher import (
    group_traces,
    sample_model_labels,
    sketched_spectrum,
)
from raresignal.agent.estimators.isolation import preserved_training_state
from raresignal.agent.estimators.shared import DefaultEstimator, SharedState, finite


class FisherEstimator(DefaultEstimator):
    """Per-group traces of the true Fisher (and, beside them, the empirical Fisher), and the
    top of the sketched Fisher spectrum with its effective rank. Off under FSDP (sharded
    parameters): per-example gradients need whole parameters."""

    name = "fisher"
    expensive = True
    needs_whole_parameters = True

    def __init__(self, shared: SharedState) -> None:
        super().__init__(shared, shared.config.fisher_interval)

    def run(self, ctx: StepContext) -> Sequence[Measurement]:
        config = self.shared.config
        batch = self.shared.curvature_batch.get(ctx)
        if batch is None:
            return []
        inputs, targets = batch
        engine = self.shared.per_example
        with preserved_training_state(self.shared.model):
            drawn_inputs, labels = sample_model_labels(
                engine, inputs, targets, self.shared.generator(ctx.step, 11),
                config.fisher_label_draws)
            summary = engine.summarize(drawn_inputs, labels)
            out = [Measurement("fisher_trace", value, (("group", group),))
                   for group, value in group_traces(summary).items()]
            spectrum = sketched_spectrum(summary, config.fisher_top_k)
            if spectrum.eigenvalues.numel():
                out.append(Measurement("fisher_top_eigenvalue", float(spectrum.eigenvalues[0])))
            out.append(Measurement("fisher_effective_rank", spectrum.effective_rank))
            if config.empirical_fisher:
                empirical = engine.summarize(inputs, targets)
                out += [Measurement("empirical_fisher_trace", value, (("group", group),))
                        for group, value in group_traces(empirical).items()]
        return finite(out)
