"""Settings of the default estimators: sketch sizes, cadences, sample counts."""

from __future__ import annotations

from dataclasses import dataclass, fields

from raresignal.agent.estimators.parameters import GroupSpec


@dataclass
class EstimatorConfig:
    """Settings of the default estimators; cadences are in optimizer steps.

    Each default is defined here only: code that needs one reads it from this class.
    """

    # Sketch space shared by every estimator.
    sketch_dim: int = 2048
    seed: int = 0
    # Dominant gradient subspace: Frequent Directions with ell rows, forgetting gamma per
    # insertion, top-k basis U_dom; probe subspaces keep probe_rank directions.
    fd_rows: int = 32
    fd_decay: float = 0.99
    subspace_rank: int = 8
    probe_rank: int = 8
    # Cadences.
    gradient_stats_interval: int = 1
    # The update/weight ratio copies the parameters on the step before each report (and
    # holds the copy for that one step), so it is read every this many steps.
    update_ratio_interval: int = 10
    noise_scale_interval: int = 10
    subspace_interval: int = 4
    drift_interval: int = 500
    sharpness_interval: int = 500
    fisher_interval: int = 100
    probes_interval: int = 200
    # The probes' loss and accuracy (a forward pass) are read far more often than their
    # geometry: the default alert on the rare probe's loss needs many readings within a
    # collapse to warn ahead of it, so the budget keeps at least this many in a planned
    # run (the cadence rule's M for this estimator; see raresignal.agent.cadence): a
    # 5000-step run keeps the planned 10-step interval, since collapses on the detection
    # benchmark halve a rare skill within 50-300 steps of their start and every 25 steps
    # the alert warned ahead of fewer of them (BENCHMARKS.md). The common reference
    # probe, which no default alert reads, is read at ``probes_interval`` instead.
    probe_loss_interval: int = 10
    probe_loss_floor_measurements: int = 500
    representation_interval: int = 1000
    # Curvature: the fixed probe batch, Lanczos and the trace.
    curvature_batch_size: int = 64
    # A curvature measurement runs in units the monitor spreads over training steps; a
    # Hessian-vector product on the curvature batch is split into chunks of at most this
    # many examples (exactly: the loss is their weighted mean), one chunk per unit. Not
    # split for a loss_fn, which need not be a mean.
    curvature_chunk_size: int = 16
    # ...and of at most this fraction of the training batch (when the monitor is given
    # the batch), as are the chunks of per-example gradients of the Fisher and the probes:
    # a product on an eighth of a batch costs about a quarter of a training step (two
    # passes), and per-example gradients, each taken and sketched on its own, cost
    # several times a batch example's share of a step, so a unit stays within the stall
    # bound of twice a step.
    unit_batch_fraction: float = 0.125
    # A unit of the Lanczos reorthogonalisation, of the Ritz vector's assembly and of
    # Hutch++'s orthonormalisation reads at most this many stored vectors (a vector read
    # twice counting twice), each of the model's size: the whole basis in one unit would
    # cost more than a product at the last iterations of a cold Lanczos, and reading 8
    # costs less than a product on a chunk of the curvature batch for a model that does
    # more than a few operations per weight.
    curvature_unit_vectors: int = 8
    hvp_backend: str = "auto"  # or double_backward, forward_over_reverse, finite_difference
    # No sharpness in the first steps: Adam's second-moment estimate is then a handful of
    # squared gradients, and P^-1/2 H P^-1/2 (so the stability ratio) is meaningless: it
    # lies far above the stability threshold on a healthy run.
    sharpness_warmup_steps: int = 100
    sharpness_tol: float = 0.02
    sharpness_cold_iterations: int = 20
    sharpness_warm_iterations: int = 10
    trace_method: str = "hutchpp"  # or "hutchinson"
    hutchinson_samples: int = 12  # products for the trace; 0 skips it
    # Fisher and probes.
    fisher_label_draws: int = 1
    fisher_top_k: int = 8
    empirical_fisher: bool = True
    per_example_chunk: int = 16
    per_example_method: str = "auto"  # or "vmap", "loop"
    retention_warmup_step: int = 1000
    # A planned run shorter than the warm-up takes the retention reference at this
    # fraction of its length instead.
    retention_warmup_fraction: float = 0.2
    # Interference compares a probe's gradient with the net update over at least this many
    # steps after it (0: the update until the next probe measurement).
    probe_interference_horizon: int = 0
    common_probe_name: str = "common"
    # Layer groups for per-group Fisher traces (None: top-level module names).
    param_groups: GroupSpec = None
    # Noise scale.
    noise_scale_ema: float = 0.9
    # Representation rank: the submodule to hook (None skips the estimator).
    representation_layer: str | None = None
    dormant_threshold: float = 0.025

    def __post_init__(self) -> None:
        intervals = {f.name: getattr(self, f.name) for f in fields(self)
                     if f.name.endswith("_interval")}
        checks = {
            "sketch_dim": self.sketch_dim >= 1,
            "fd_rows": self.fd_rows >= 2,
            "subspace_rank": 0 < self.subspace_rank < self.fd_rows,
            "probe_rank": self.probe_rank >= 1,
            "fd_decay": 0.0 < self.fd_decay <= 1.0,
            "curvature_batch_size": self.curvature_batch_size >= 1,
            "curvature_chunk_size": self.curvature_chunk_size >= 1,
            "unit_batch_fraction": 0 < self.unit_batch_fraction <= 1,
            "curvature_unit_vectors": self.curvature_unit_vectors >= 1,
            "sharpness_tol": self.sharpness_tol > 0,
            "sharpness_cold_iterations": self.sharpness_cold_iterations >= 1,
            "sharpness_warm_iterations": self.sharpness_warm_iterations >= 1,
            "trace_method": self.trace_method in ("hutchinson", "hutchpp"),
            "hutchinson_samples": self.hutchinson_samples >= 0,
            "hvp_backend": self.hvp_backend in ("auto", "double_backward",
                                                "forward_over_reverse", "finite_difference"),
            "fisher_label_draws": self.fisher_label_draws >= 1,
            "per_example_chunk": self.per_example_chunk >= 1,
            "per_example_method": self.per_example_method in ("auto", "vmap", "loop"),
            "noise_scale_ema": 0.0 <= self.noise_scale_ema < 1.0,
            "probe_interference_horizon": self.probe_interference_horizon >= 0,
            "probe_loss_floor_measurements": self.probe_loss_floor_measurements >= 1,
            "retention_warmup_fraction": 0.0 <= self.retention_warmup_fraction <= 1.0,
            **{name: value >= 1 for name, value in intervals.items()},
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(f"invalid EstimatorConfig: {values}")
