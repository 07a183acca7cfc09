"""Sharpness: top Hessian eigenvalue, preconditioned for Adam, against its stability edge.

The edge-of-stability literature compares lambda_max with the largest curvature the
optimizer can follow without diverging on a quadratic: 2/lr for SGD, (2 + 2 beta)/lr with
heavy-ball momentum, and for Adam the preconditioned lambda_1(P^-1/2 H P^-1/2) against
(2 + 2 beta1) / ((1 - beta1) lr) (Cohen et al. 2022, "Adaptive gradient methods at the edge
of stability").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raresignal.agent.api import Units, run_units
from raresignal.agent.estimators.config import EstimatorConfig
from raresignal.agent.estimators.hvp import HessianVectorProduct
from raresignal.agent.estimators.parameters import ParameterSet
from raresignal.agent.estimators.spectral import (
    Eigenpair,
    MatVec,
    UnitMatVec,
    hutchinson_trace_units,
    hutchpp_trace_units,
    lanczos_top_units,
    one_unit,
)


@dataclass(frozen=True)
class OptimizerProfile:
    """What the stability threshold depends on."""

    kind: str  # "sgd", "sgd_momentum", "adam", or "other"
    lr: float
    beta: float = 0.0  # momentum (SGD) or beta1 (Adam)

    @property
    def preconditioned(self) -> bool:
        return self.kind == "adam"

    def stability_threshold(self) -> float | None:
        """Largest stable curvature for this optimizer, or None when no formula applies."""
        if self.lr <= 0:
            return None
        if self.kind == "sgd":
            return 2.0 / self.lr
        if self.kind == "sgd_momentum":
            return (2.0 + 2.0 * self.beta) / self.lr
        if self.kind == "adam":
            return (2.0 + 2.0 * self.beta) / ((1.0 - self.beta) * self.lr)
        return None


def _float(value: object) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)  # type: ignore[arg-type]


def optimizer_profile(optimizer: torch.optim.Optimizer | None) -> OptimizerProfile:
    """Reads kind, learning rate and momentum of the first parameter group."""
    if optimizer is None or not optimizer.param_groups:
        return OptimizerProfile("other", 0.0)
    group = optimizer.param_groups[0]
    lr = _float(group.get("lr", 0.0))
    if "betas" in group and isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return OptimizerProfile("adam", lr, _float(group["betas"][0]))
    if isinstance(optimizer, torch.optim.SGD):
        momentum = _float(group.get("momentum", 0.0))
        return OptimizerProfile("sgd_momentum" if momentum > 0 else "sgd", lr, momentum)
    return OptimizerProfile("other", lr)


def adam_preconditioner(optimizer: torch.optim.Optimizer,
                        parameters: ParameterSet) -> torch.Tensor | None:
    """Flat P = sqrt(v_hat) + eps from Adam's state (bias-corrected), None before step 1."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parts = []
    for p in parameters.params:
        state = optimizer.state.get(p, {})
        group = group_of.get(id(p))
        if group is None or "exp_avg_sq" not in state or "step" not in state:
            return None
        step = _float(state["step"])
        if step < 1:
            return None
        beta2 = _float(group["betas"][1])
        v = state.get("max_exp_avg_sq") if group.get("amsgrad") else state["exp_avg_sq"]
        v_hat = v.detach().float() / (1.0 - beta2**step)
        parts.append((v_hat.sqrt() + _float(group["eps"])).reshape(-1))
    return torch.cat(parts).to(parameters.device)


def preconditioned(matvec: MatVec, preconditioner: torch.Tensor) -> MatVec:
    """x -> P^-1/2 H P^-1/2 x, for a diagonal P given as a flat vector."""
    scale = preconditioner.rsqrt()
    return lambda x: scale * matvec(scale * x)


def preconditioned_units(matvec: UnitMatVec, preconditioner: torch.Tensor) -> UnitMatVec:
    """:func:`preconditioned` for an operator whose products are units."""
    scale = preconditioner.rsqrt()

    def product(vector: torch.Tensor) -> Units[torch.Tensor]:
        return scale * (yield from matvec(scale * vector))

    return product


# The kind of the unit that prepares a Lanczos run's start vector (see api.Units).
START_VECTOR_KIND = "lanczos start"


@dataclass
class SharpnessTracker:
    """Top eigenpair estimates warm-started from the previous call's eigenvector.

    It also keeps the eigen-gap the last long enough run measured, halved for safety (a
    Ritz gap overstates the true one), so a warm start may stop on the Kato-Temple bound.
    """

    dim: int
    seed: int = 0
    cold_iterations: int = EstimatorConfig.sharpness_cold_iterations
    warm_iterations: int = EstimatorConfig.sharpness_warm_iterations
    tol: float = EstimatorConfig.sharpness_tol
    block: int = EstimatorConfig.curvature_unit_vectors  # basis vectors per unit
    gap_safety: float = 0.5
    previous: torch.Tensor | None = None
    relative_gap: float | None = None

    def estimate(self, matvec: MatVec, device: torch.device) -> Eigenpair:
        """The top eigenpair, remembered as the next call's warm start."""
        pair = run_units(self.estimate_units(one_unit(matvec), device))
        self.remember(pair)
        return pair

    def estimate_units(self, matvec: UnitMatVec, device: torch.device) -> Units[Eigenpair]:
        """:meth:`estimate` in units, without remembering the result: the
        caller calls :meth:`remember` once the whole measurement is complete, so one
        dropped half-way leaves the warm start as it was. The start vector is a unit of
        its own: drawn or copied, it is a fresh vector of the model's size."""
        yield START_VECTOR_KIND
        if self.previous is not None and self.previous.numel() == self.dim:
            start, iterations = self.previous.to(device), self.warm_iterations
            gap = None if self.relative_gap is None else self.gap_safety * self.relative_gap
        else:
            generator = torch.Generator().manual_seed(self.seed)
            start = torch.randn(self.dim, generator=generator).to(device)
            iterations, gap = self.cold_iterations, None
        return (yield from lanczos_top_units(matvec, start, iterations, self.tol, gap,
                                             block=self.block))

    def remember(self, pair: Eigenpair) -> None:
        """Keeps ``pair`` as the warm start of the next estimate."""
        self.previous = pair.vector.detach()
        if pair.relative_gap is not None:
            self.relative_gap = pair.relative_gap


def curvature_trace(hvp: HessianVectorProduct, samples: int, method: str,
                    generator: torch.Generator) -> float:
    """Trace of the Hessian by Hutchinson or Hutch++ with ``samples`` products."""
    return run_units(curvature_trace_units(one_unit(hvp), hvp.parameters.numel,
                                           hvp.parameters.device, samples, method, generator))


def curvature_trace_units(hvp: UnitMatVec, dim: int, device: torch.device, samples: int,
                          method: str, generator: torch.Generator,
                          block: int = EstimatorConfig.curvature_unit_vectors
                          ) -> Units[float]:
    """:func:`curvature_trace` in units, for an operator on vectors of ``dim`` (Hutch++
    works on ``block`` of its stored vectors per unit)."""
    if method == "hutchinson":
        return (yield from hutchinson_trace_units(hvp, dim, samples, generator, device))
    if method == "hutchpp":
        return (yield from hutchpp_trace_units(hvp, dim, samples, generator, device, block))
    raise ValueError(f"unknown trace method {method!r}; expected 'hutchinson' or 'hutchpp'")
