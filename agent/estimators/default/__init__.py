"""The default estimators, one module each, and the factory that builds them together.

Each wraps one measurement from the modules one level up (its mathematics) as an
:class:`~raresignal.agent.api.Estimator`: ``run`` reads the step context, measures inside
``preserved_training_state`` where it runs the model, and returns catalogue measurements.
Work shared between estimators goes through ``SharedState`` and ``ctx.cache``.
"""

from raresignal.agent.estimators.default.factory import (
    build_default_estimators,
    build_shared_state,
)
from raresignal.agent.estimators.default.fisher import FisherEstimator
from raresignal.agent.estimators.default.gradient_stats import GradientStatsEstimator
from raresignal.agent.estimators.default.gradient_subspace import GradientSubspaceEstimator
from raresignal.agent.estimators.default.noise_scale import NoiseScaleEstimator
from raresignal.agent.estimators.default.probe_loss import (
    CommonProbeLossEstimator,
    ProbeLossEstimator,
)
from raresignal.agent.estimators.default.probes import ProbeEstimator
from raresignal.agent.estimators.default.representation import RepresentationEstimator
from raresignal.agent.estimators.default.sharpness import SharpnessEstimator
from raresignal.agent.estimators.default.subspace_drift import SubspaceDriftEstimator

__all__ = [
    "CommonProbeLossEstimator",
    "FisherEstimator",
    "GradientStatsEstimator",
    "GradientSubspaceEstimator",
    "NoiseScaleEstimator",
    "ProbeEstimator",
    "ProbeLossEstimator",
    "RepresentationEstimator",
    "SharpnessEstimator",
    "SubspaceDriftEstimator",
    "build_default_estimators",
    "build_shared_state",
]
