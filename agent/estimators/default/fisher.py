"""The Fisher estimator: per-group traces and the sketched spectrum of the true Fisher.

Its measurement runs in units that the monitor may spread over several training steps:
drawing the labels (one forward pass), then each chunk of per-example gradients
(``EstimatorConfig.per_example_chunk`` examples, at most ``unit_batch_fraction`` of the
training batch). The parameters and buffers are copied
when it starts, so the result is exactly the one-shot measurement of that step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from raresignal.agent.api import Measurement, MeasurementUnits, StepContext, run_units
from raresignal.agent.estimators.fisher import (
    group_traces,
    sample_model_labels,
    sketched_spectrum,
)
from raresignal.agent.estimators.isolation import isolated_units
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
        return run_units(self.run_in_units(ctx))

    def run_in_units(self, ctx: StepContext) -> MeasurementUnits:
        """The measurement at ``ctx.step``, one chunk of per-example gradients per unit."""
        batch = self.shared.curvature_batch.get(ctx)
        if batch is None:
            return []
        return (yield from isolated_units(self.shared.model, self._measure_units(ctx, batch)))

    def _measure_units(self, ctx: StepContext, batch: tuple[Any, torch.Tensor]
                       ) -> MeasurementUnits:
        config = self.shared.config
        inputs, targets = batch
        shared_engine = self.shared.per_example
        engine = shared_engine.frozen(
            self.shared.unit_examples(ctx, config.per_example_chunk))
        drawn_inputs, labels = sample_model_labels(
            engine, inputs, targets, self.shared.generator(ctx.step, 11),
            config.fisher_label_draws)
        yield
        summary = yield from engine.summarize_units(drawn_inputs, labels)
        out = [Measurement("fisher_trace", value, (("group", group),))
               for group, value in group_traces(summary).items()]
        spectrum = sketched_spectrum(summary, config.fisher_top_k)
        if spectrum.eigenvalues.numel():
            out.append(Measurement("fisher_top_eigenvalue", float(spectrum.eigenvalues[0])))
        out.append(Measurement("fisher_effective_rank", spectrum.effective_rank))
        if config.empirical_fisher:
            empirical = yield from engine.summarize_units(inputs, targets)
            out += [Measurement("empirical_fisher_trace", value, (("group", group),))
                    for group, value in group_traces(empirical).items()]
        # The copy learned which per-example method works on this model.
        shared_engine.method = engine.method
        return finite(out)
