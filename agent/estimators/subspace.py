"""Comparing subspaces: chance-corrected overlap and principal angles.

Two random k-dimensional subspaces of R^d overlap by k/d on average, so the raw overlap
ov = ||U^T V||_F^2 / k is reported as (ov - k/d) / (1 - k/d): 1 when unchanged, about 0
when as unrelated as chance. Small principal angles come from sines (the singular values
of (I - U U^T) V), because arccos of a cosine near 1 loses all precision.
"""

from __future__ import annotations

from typing import Any

import torch

from raresignal.agent.estimators.frequent_directions import FrequentDirections


def overlap(u: torch.Tensor, v: torch.Tensor) -> float:
    """||U^T V||_F^2 / k for orthonormal bases U [d, k] and V [d, k'] (k = the larger)."""
    k = max(u.shape[1], v.shape[1])
    if k == 0:
        return float("nan")
    return float((u.T @ v).pow(2).sum() / k)


def chance_corrected_overlap(u: torch.Tensor, v: torch.Tensor) -> float:
    """(ov - k/d) / (1 - k/d): 1 for the same subspace, 0 in expectation for random ones."""
    d, k = u.shape[0], max(u.shape[1], v.shape[1])
    if k == 0 or k >= d:
        return float("nan")
    chance = k / d
    return (overlap(u, v) - chance) / (1.0 - chance)


def principal_angles(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, largest first) between the column spans of U and V.

    Same method as scipy.linalg.subspace_angles (Knyazev & Argentati 2002): cosines for
    large angles, sines for angles below pi/4.
    """
    qa = torch.linalg.qr(u.double()).Q
    qb = torch.linalg.qr(v.double()).Q
    cross = qa.T @ qb
    sigma = torch.linalg.svdvals(cross)
    residual = qb - qa @ cross if qa.shape[1] >= qb.shape[1] else qa - qb @ cross.T
    mask = sigma**2 >= 0.5
    cos_angles = torch.arccos(torch.clamp(sigma.flip(0), -1.0, 1.0))
    if bool(mask.any()):
        sin_angles = torch.arcsin(torch.clamp(torch.linalg.svdvals(residual), -1.0, 1.0))
        return torch.where(mask, sin_angles[: sigma.numel()], cos_angles).float()
    return cos_angles.float()


def orthonormal_rows_basis(rows: torch.Tensor, k: int, rel_tol: float = 1e-6) -> torch.Tensor:
    """[d, k'] orthonormal basis of the top-k right singular vectors of ``rows`` [n, d]."""
    if rows.shape[0] == 0:
        return rows.new_zeros(rows.shape[1], 0)
    _, s, vh = torch.linalg.svd(rows.float(), full_matrices=False)
    if s.numel() == 0 or s[0] <= 0:
        return rows.new_zeros(rows.shape[1], 0)
    rank = int((s > s[0] * rel_tol).sum())
    return vh[: min(k, rank)].T.contiguous()


class DominantSubspace:
    """The dominant gradient subspace U_dom: a Frequent Directions sketch and its top-k.

    Shared by the estimator that feeds it and those that read U_dom (drift, probes).
    """

    def __init__(self, dim: int, ell: int, k: int, decay: float = 1.0,
                 device: torch.device | str | None = None) -> None:
        if not 0 < k < ell:
            raise ValueError(f"subspace rank k={k} must be in (0, ell={ell})")
        self.k = k
        self.sketch = FrequentDirections(dim, ell, decay, device)
        self._basis: torch.Tensor | None = None

    def insert(self, row: torch.Tensor) -> None:
        if not bool(torch.isfinite(row).all()):
            raise ValueError("refusing to insert a non-finite gradient sketch")
        self.sketch.insert(row)
        self._basis = None

    @property
    def ready(self) -> bool:
        return self.sketch.rows_seen >= self.k

    def basis(self) -> torch.Tensor:
        """U_dom [d, k'] (cached until the next insertion)."""
        if self._basis is None:
            self._basis = self.sketch.top_subspace(self.k)
        return self._basis

    def state_dict(self) -> dict[str, Any]:
        return self.sketch.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sketch.load_state_dict(state)
        self._basis = None

