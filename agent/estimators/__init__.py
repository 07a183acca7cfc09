"""The agent's numerical core: sketches, curvature, Fisher and rare-signal probes.

The modules here hold the mathematics and are usable on their own; the ``default``
package wraps each measurement as an ``Estimator`` for the monitor, and
``build_default_estimators`` builds them all.
"""

from raresignal.agent.api import default_forward
from raresignal.agent.estimators.config import EstimatorConfig
from raresignal.agent.estimators.default import build_default_estimators, build_shared_state
from raresignal.agent.estimators.likelihood import (
    BernoulliLikelihood,
    CausalLMLikelihood,
    ClassificationLikelihood,
    GaussianLikelihood,
    Likelihood,
    MaskedLMLikelihood,
)
from raresignal.agent.estimators.parameters import ParameterSet
from raresignal.agent.estimators.shared import (
    GRAD_SKETCH_KEY,
    LOCAL_GRAD_SQ_NORM_KEY,
    SharedState,
)
from raresignal.agent.estimators.sketch import GradientSketcher

__all__ = [
    "GRAD_SKETCH_KEY",
    "LOCAL_GRAD_SQ_NORM_KEY",
    "BernoulliLikelihood",
    "CausalLMLikelihood",
    "ClassificationLikelihood",
    "EstimatorConfig",
    "GaussianLikelihood",
    "GradientSketcher",
    "Likelihood",
    "MaskedLMLikelihood",
    "ParameterSet",
    "SharedState",
    "build_default_estimators",
    "build_shared_state",
    "default_forward",
]
