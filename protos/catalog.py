"""The metric catalogue: every series the agent may send, with its unit and labels.

It is part of the wire contract. The agent emits only these names; the server rejects
any other name or any label key the catalogue does not allow for that name, which is
what keeps Prometheus label sets bounded. Names here carry no prefix: the server
exposes ``raresignal_<name>``. Units follow Prometheus conventions (base units,
ratios as plain fractions, ``_total`` for counters).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

PROMETHEUS_PREFIX = "raresignal_"

# Label keys a sample may carry. Values are bounded by the server (length, count).
LABEL_PROBE = "probe"
LABEL_GROUP = "group"
LABEL_LAYER = "layer"
LABEL_ESTIMATOR = "estimator"


class Kind(str, Enum):
    GAUGE = "gauge"
    COUNTER = "counter"  # monotonic over a run; the agent sends the running total


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()

    @property
    def prometheus_name(self) -> str:
        return PROMETHEUS_PREFIX + self.name


def _g(name: str, help_text: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, Kind.GAUGE, help_text, tuple(labels))


def _c(name: str, help_text: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, Kind.COUNTER, help_text, tuple(labels))


_SPECS: tuple[MetricSpec, ...] = (
    # Gradient statistics, every step.
    _g("loss", "Training loss of the last step."),
    _g("grad_norm", "L2 norm of the full gradient before clipping."),
    _g("update_to_weight_ratio", "L2 norm of the last parameter update over the weight norm."),
    _g("update_to_weight_ratio_at_peak_lr",
       "update_to_weight_ratio rescaled to the highest learning rate the run has used."),
    _g("learning_rate", "Learning rate of the first parameter group."),
    _g("nonfinite_values", "Non-finite values in the loss and gradients of the last step."),
    _c("nonfinite_steps_total", "Steps whose loss or gradient held a non-finite value."),
    _g("step", "Last optimizer step reported."),
    _g("step_duration_seconds", "Wall time of one training step, monitor excluded."),
    # Gradient noise scale (McCandlish et al. 2018).
    _g("gradient_noise_scale", "Simple gradient noise scale B_simple = tr(Sigma)/|G|^2, EMA."),
    # Dominant gradient subspace and its drift.
    _g("subspace_overlap", "Chance-corrected overlap of the dominant gradient subspace with "
       "the one a drift interval ago (1 = unchanged, 0 = as random)."),
    _g("subspace_max_angle_radians", "Largest principal angle between the dominant gradient "
       "subspaces a drift interval apart."),
    # Sharpness and curvature.
    _g("sharpness", "Largest eigenvalue of the loss Hessian on the probe batch."),
    _g("preconditioned_sharpness", "Largest eigenvalue of P^-1/2 H P^-1/2 for Adam-type "
       "optimizers, P = sqrt(v_hat) + eps."),
    _g("sharpness_threshold", "Stability threshold of the optimizer in use (2/lr for SGD)."),
    _g("sharpness_ratio", "Sharpness (preconditioned for Adam-type) over its stability "
       "threshold; above 1 the step is past the edge of stability."),
    _g("hessian_trace", "Hutchinson estimate of the trace of the loss Hessian."),
    _g("hessian_vector_products", "Hessian-vector products the last sharpness estimate used."),
    # Fisher information.
    _g("fisher_trace", "Trace of the true Fisher (labels sampled from the model) per layer "
       "group.", LABEL_GROUP),
    _g("empirical_fisher_trace", "Trace of the empirical Fisher (dataset labels) per layer "
       "group; reported beside the true Fisher, not as curvature.", LABEL_GROUP),
    _g("fisher_top_eigenvalue", "Largest eigenvalue of the sketched true Fisher."),
    _g("fisher_effective_rank", "Effective rank (exp of spectral entropy) of the sketched "
       "true Fisher."),
    # Rare-signal probes.
    _g("probe_fisher_mass", "Mean squared norm of sampled-label gradients of the probe.",
       LABEL_PROBE),
    _g("probe_fisher_mass_ratio", "Probe Fisher mass over the common probe's.", LABEL_PROBE),
    _g("probe_absorption", "Share of the probe's gradient subspace inside the dominant "
       "subspace.", LABEL_PROBE),
    _g("probe_bulk_residual", "Share of the probe's gradient energy outside the dominant "
       "subspace.", LABEL_PROBE),
    _g("probe_retention", "Share of the probe's gradient energy in its reference directions "
       "(taken after warm-up), relative to that share then.", LABEL_PROBE),
    _g("probe_interference", "Cosine between the probe's mean gradient at a measurement and "
       "the net parameter update since then (negative: training undoes the probe).",
       LABEL_PROBE),
    _g("probe_loss", "Loss on the probe set.", LABEL_PROBE),
    _g("probe_accuracy", "Accuracy on the probe set, as a fraction.", LABEL_PROBE),
    # Representation rank.
    _g("representation_effective_rank", "Effective rank of a layer's features on a probe.",
       LABEL_LAYER),
    _g("representation_stable_rank", "Stable rank of a layer's features on a probe.",
       LABEL_LAYER),
    _g("representation_dormant_fraction", "Fraction of a layer's units that are dormant on a "
       "probe.", LABEL_LAYER),
    # The agent's own cost and health.
    _g("agent_overhead_ratio", "Monitor wall time over training step time across the "
       "last MonitorConfig.overhead_window_steps steps, each estimator's first (cold) "
       "run left out."),
    _g("agent_estimator_seconds", "Wall time of the last run of an estimator.",
       LABEL_ESTIMATOR),
    _g("agent_estimator_interval_steps", "Current cadence of an estimator in steps, as set by "
       "the overhead budget.", LABEL_ESTIMATOR),
    _g("agent_estimator_floor_interval_steps", "Longest interval the overhead budget may "
       "stretch an estimator to (its floor cadence, from the run's planned length).",
       LABEL_ESTIMATOR),
    _g("agent_estimator_effort_ratio", "Share of a full run's work an estimator does per run, "
       "as set by the overhead budget (1 = full work).", LABEL_ESTIMATOR),
    _g("agent_budget_floor_exceeded", "1 while the overhead budget cannot keep every "
       "estimator's floor cadence within its target (the floors are kept, over target)."),
    _c("agent_dropped_reports_total", "Reports the agent dropped (spool full or rejected)."),
    _g("agent_spool_bytes", "Bytes waiting in the agent's spool."),
    _g("agent_estimator_unavailable", "1 for each estimator the run's task cannot measure "
       "(a loss_fn with no likelihood has no sampled-label Fisher).", LABEL_ESTIMATOR),
    _c("agent_estimator_errors_total", "Runs of an estimator that raised; the monitor logged "
       "the error and went on.", LABEL_ESTIMATOR),
    _c("agent_send_failures_total", "Attempts to reach the server that failed (each one is "
       "retried with backoff)."),
    _c("agent_sender_errors_total", "Unexpected errors the agent's sender thread survived "
       "(each logged, rate-limited); its batches wait in the spool meanwhile."),
)

CATALOG: dict[str, MetricSpec] = {spec.name: spec for spec in _SPECS}


def spec(name: str) -> MetricSpec:
    """The spec of a metric; KeyError names the metric when it is not in the catalogue."""
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(f"metric {name!r} is not in the raresignal catalogue") from None
