"""Rare-signal probe geometry, in the sketch space of per-example sampled-label gradients.

For a probe set R with sketched per-example gradients G_R [n, d]:
- Fisher mass M_R = mean |g|^2 (per scored token), compared with a common probe's M_C;
- absorption a = |U_dom^T U_R|_F^2 / k_r: how much of R's top subspace lies in the
  dominant gradient subspace;
- bulk residual r = |G_R (I - U_dom U_dom^T)|_F^2 / |G_R|_F^2: R's gradient energy
  outside it;
- retention: the share of R's gradient energy in its reference directions U_R(t0),
  relative to that share at t0 (see :class:`RetentionReference` for why a share);
- interference: cosine of R's mean dataset-label gradient with the training gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raresignal.agent.estimators.subspace import orthonormal_rows_basis


def fisher_mass(sq_norms: torch.Tensor, counts: torch.Tensor) -> float:
    """sum |g_i|^2 / sum tokens_i: mean squared gradient norm per scored token."""
    return float(sq_norms.sum() / counts.sum().clamp(min=1.0))


def absorption(dominant: torch.Tensor, probe_basis: torch.Tensor) -> float:
    """|U_dom^T U_R|_F^2 / k_r, in [0, 1]."""
    if probe_basis.shape[1] == 0:
        return float("nan")
    return float((dominant.T @ probe_basis).pow(2).sum() / probe_basis.shape[1])


def bulk_residual(gradients: torch.Tensor, dominant: torch.Tensor) -> float:
    """|G (I - U U^T)|_F^2 / |G|_F^2, in [0, 1]."""
    total = gradients.pow(2).sum()
    if float(total) == 0.0:
        return float("nan")
    inside = (gradients @ dominant).pow(2).sum()
    return float(((total - inside) / total).clamp(0.0, 1.0))


def projected_energy(gradients: torch.Tensor, basis: torch.Tensor) -> float:
    """|G U|_F^2."""
    return float((gradients @ basis).pow(2).sum())


def energy_share(gradients: torch.Tensor, basis: torch.Tensor) -> float:
    """|G U|_F^2 / |G|_F^2, in [0, 1]: the part of G's energy inside span(U)."""
    total = float(gradients.pow(2).sum())
    if total == 0.0:
        return float("nan")
    return projected_energy(gradients, basis) / total


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    denominator = a.norm() * b.norm()
    if float(denominator) == 0.0:
        return float("nan")
    return float((a @ b) / denominator)


@dataclass
class RetentionReference:
    """R's top directions at the reference step t0, and the share of R's gradient energy
    they held then.

    Retention is (|G_R(t) U_R(t0)|_F^2 / |G_R(t)|_F^2) / (|G_R(t0) U_R(t0)|_F^2 /
    |G_R(t0)|_F^2): whether R's gradients still lie in the directions R used at t0. A
    ratio of energies, |G_R(t) U_R(t0)|_F^2 / |G_R(t0) U_R(t0)|_F^2, would not do: with
    sampled-label (true Fisher) gradients the energy is mostly the model's uncertainty,
    which falls as a healthy model grows sure of R and rises when R is being lost. The
    share cancels that scale and keeps the geometry.
    """

    basis: torch.Tensor  # U_R(t0), [d, k_r]
    share: float  # |G_R(t0) U_R(t0)|_F^2 / |G_R(t0)|_F^2
    step: int

    @classmethod
    def take(cls, gradients: torch.Tensor, rank: int, step: int) -> RetentionReference:
        basis = orthonormal_rows_basis(gradients, rank).to(gradients)
        return cls(basis, energy_share(gradients, basis), step)

    def retention(self, gradients: torch.Tensor) -> float:
        if not self.share > 0.0:
            return float("nan")
        return energy_share(gradients, self.basis.to(gradients)) / self.share

    def state_dict(self) -> dict[str, Any]:
        return {"basis": self.basis.cpu(), "share": self.share, "step": self.step}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RetentionReference:
        return cls(state["basis"], float(state["share"]), int(state["step"]))
