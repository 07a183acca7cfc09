"""Frequent Directions error bounds and subspace comparisons against exact references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from raresignal.agent.estimators.frequent_directions import FrequentDirections
from raresignal.agent.estimators.subspace import (
    chance_corrected_overlap,
    orthonormal_rows_basis,
    principal_angles,
)


def _low_rank_stream(rows: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, 6, generator=generator)).Q
    weights = torch.randn(rows, 6, generator=generator) * torch.tensor([9, 7, 5, 4, 3, 2.0])
    return weights @ basis.T + 0.3 * torch.randn(rows, dim, generator=generator)


def _covariance_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a.T.double() @ a.double() - b.T.double() @ b.double(),
                                          ord=2))


def _tail(a: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(a.double())
    return float(s[k:].pow(2).sum())


@pytest.mark.parametrize("k", [0, 2, 5])
def test_error_within_the_fd_bound(k: int) -> None:
    a = _low_rank_stream(300, 64, seed=0)
    fd = FrequentDirections(64, ell=12)
    for row in a:
        fd.insert(row)
    # Ghashami et al. 2016: |A^T A - B^T B|_2 <= |A - A_k|_F^2 / (ell - k); 1e-6 relative
    # slack covers fp32 rounding of the SVDs.
    assert _covariance_error(a, fd.sketch) <= _tail(a, k) / (12 - k) * (1 + 1e-6)
    assert fd.sketch.shape[0] <= 24


def test_merge_within_the_bound_of_the_stacked_matrix() -> None:
    a1, a2 = _low_rank_stream(150, 64, seed=1), _low_rank_stream(170, 64, seed=2)
    f1, f2 = FrequentDirections(64, ell=12), FrequentDirections(64, ell=12)
    for row in a1:
        f1.insert(row)
    for row in a2:
        f2.insert(row)
    merged = f1.merge(f2)
    stacked = torch.cat([a1, a2])
    k = 3
    # Mergeable summaries (Agarwal et al. 2013): the same bound holds for the stacked
    # stream; fp32 slack as above.
    assert _covariance_error(stacked, merged.sketch) <= _tail(stacked, k) / (12 - k) * (1 + 1e-6)
    assert merged.rows_seen == 320


def test_top_subspace_finds_the_planted_directions() -> None:
    generator = torch.Generator().manual_seed(5)
    planted = torch.linalg.qr(torch.randn(200, 3, generator=generator)).Q
    fd = FrequentDirections(200, ell=8, decay=0.98)
    for _ in range(100):
        fd.insert(planted @ (torch.randn(3, generator=generator) * 10)
                  + 0.01 * torch.randn(200, generator=generator))
    found = fd.top_subspace(3)
    # Noise at 0.1% of the signal moves the subspace by about that much: overlap > 0.99.
    assert chance_corrected_overlap(found, planted) > 0.99


def test_overlap_is_one_with_itself_and_near_zero_with_a_random_subspace() -> None:
    generator = torch.Generator().manual_seed(7)
    d, k = 2048, 8
    u = torch.linalg.qr(torch.randn(d, k, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(d, k, generator=generator)).Q
    assert chance_corrected_overlap(u, u) == pytest.approx(1.0, abs=1e-5)
    # Raw overlap of random k-subspaces has mean k/d and std about sqrt(2)/d; 6 std.
    assert abs(chance_corrected_overlap(u, v)) <= 6 * math.sqrt(2) / d / (1 - k / d)


def test_principal_angles_match_scipy_including_tiny_ones() -> None:
    generator = torch.Generator().manual_seed(9)
    u = torch.linalg.qr(torch.randn(50, 4, generator=generator)).Q
    nudged = u + 1e-5 * torch.randn(50, 4, generator=generator)
    rotated = torch.linalg.qr(torch.cat([u[:, :2], torch.randn(50, 2, generator=generator)],
                                        dim=1)).Q
    for v in (nudged, rotated):
        ours = principal_angles(u.double(), v.double()).double().numpy()
        reference = scipy.linalg.subspace_angles(u.double().numpy(), v.double().numpy())
        # Both use the sine formula for small angles, so even 1e-5 rad angles agree to
        # fp32 output precision (the result is returned as fp32).
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-7)
    assert float(principal_angles(u, nudged)[0]) < 1e-3


def test_orthonormal_rows_basis_spans_the_rows() -> None:
    generator = torch.Generator().manual_seed(11)
    rows = torch.randn(5, 3, generator=generator) @ torch.randn(3, 40, generator=generator)
    basis = orthonormal_rows_basis(rows, k=8)
    assert basis.shape == (40, 3)  # rank 3, however many directions were asked for
    torch.testing.assert_close(basis.T @ basis, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(rows @ basis @ basis.T, rows, atol=1e-4, rtol=1e-4)
