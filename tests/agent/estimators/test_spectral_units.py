"""The work on stored vectors (the Lanczos basis, Hutch++'s sketch) in units of at most
``block`` vectors: the block changes no result, each unit reads at most ``block``
vectors, and the results match exact references on dense matrices."""

from __future__ import annotations

import math

import pytest
import torch

from raresignal.agent.api import Units
from raresignal.agent.estimators.spectral import (
    COMBINE,
    PRODUCT,
    REORTHOGONALISE,
    hutchpp_trace,
    lanczos_top,
    lanczos_top_units,
    one_unit,
    orthogonalise_units,
    orthonormal_units,
    rademacher,
)


def _kinds_and_result(units: Units) -> tuple[list[str | None], object]:
    kinds = []
    while True:
        try:
            kinds.append(next(units))
        except StopIteration as done:
            return kinds, done.value


def _symmetric(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense symmetric matrix with a known spectrum (a clear top eigenvalue)."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64)).Q
    values = torch.linspace(-1.0, 3.0, n, dtype=torch.float64)
    values[-1] = 5.0
    return basis @ torch.diag(values) @ basis.T, values


def test_reorthogonalising_in_blocks_gives_the_same_vector_whatever_the_block() -> None:
    generator = torch.Generator().manual_seed(0)
    basis = list(torch.linalg.qr(torch.randn(50, 7, generator=generator,
                                             dtype=torch.float64)).Q.T)
    vector = torch.randn(50, generator=generator, dtype=torch.float64)
    results = {}
    for block in (1, 3, 8, 100):
        kinds, result = _kinds_and_result(orthogonalise_units(basis, vector, block))
        # Two passes over seven vectors, at most ``block`` of them per unit.
        assert kinds == [REORTHOGONALISE] * math.ceil(14 / block)
        results[block] = result
    for block in (1, 3, 8):
        assert torch.equal(results[block], results[100])
    assert float((torch.stack(basis) @ results[100]).abs().max()) < 1e-14


def test_lanczos_in_blocks_finds_the_exact_top_eigenpair_whatever_the_block() -> None:
    matrix, values = _symmetric(60, seed=1)
    start = torch.randn(60, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pairs = {block: lanczos_top(lambda v: matrix @ v, start, max_iter=30, tol=1e-10,
                                block=block) for block in (1, 3, 8, 64)}
    reference = pairs[64]
    assert reference.value == pytest.approx(float(values[-1]), rel=1e-10)
    exact_vector = torch.linalg.eigh(matrix).eigenvectors[:, -1]
    assert abs(float(reference.vector @ exact_vector)) == pytest.approx(1.0, abs=1e-10)
    for pair in pairs.values():
        assert pair.value == reference.value and pair.matvecs == reference.matvecs
        assert torch.equal(pair.vector, reference.vector)


def test_each_lanczos_unit_reads_at_most_block_basis_vectors() -> None:
    matrix, _ = _symmetric(40, seed=3)
    start = torch.randn(40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    block = 3
    kinds, pair = _kinds_and_result(lanczos_top_units(
        one_unit(lambda v: matrix @ v), start, max_iter=12, tol=1e-14, block=block))
    iterations = pair.matvecs
    assert iterations == 12
    # Iteration k reorthogonalises twice against its k basis vectors; the Ritz vector
    # combines all of them.
    assert kinds.count(PRODUCT) == iterations
    assert kinds.count(REORTHOGONALISE) == sum(math.ceil(2 * k / block)
                                               for k in range(1, iterations + 1))
    assert kinds.count(COMBINE) == math.ceil(iterations / block)


def _hutchpp_with_householder_qr(matrix: torch.Tensor, matvecs: int,
                                 generator: torch.Generator) -> float:
    """Hutch++ as published (Meyer et al. 2021, Algorithm 1), its sketch's basis by a
    Householder QR, drawing the same Rademacher vectors in the same order."""
    dim = matrix.shape[0]
    third = max(matvecs // 3, 1)
    device = torch.device("cpu")
    sketch = torch.stack([matrix @ rademacher((dim,), generator, device)
                          for _ in range(third)], dim=1)
    q = torch.linalg.qr(sketch).Q
    top = float(torch.trace(q.T @ matrix @ q))
    rest = 0.0
    for _ in range(third):
        z = rademacher((dim,), generator, device)
        z = z - q @ (q.T @ z)
        rest += float(z @ (matrix @ z))
    return top + rest / third


@pytest.fixture
def float64_default():
    """Rademacher vectors (drawn in the default dtype) in float64, for exact references."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


@pytest.mark.parametrize("block", [1, 2, 8])
def test_hutchpp_with_gram_schmidt_equals_hutchpp_with_a_householder_qr(
        block: int, float64_default) -> None:
    matrix, values = _symmetric(30, seed=5)
    for matvecs in (12, 30, 90):
        ours = hutchpp_trace(lambda v: matrix @ v, 30, matvecs,
                             torch.Generator().manual_seed(6), torch.device("cpu"), block)
        reference = _hutchpp_with_householder_qr(matrix, matvecs,
                                                 torch.Generator().manual_seed(6))
        assert ours == pytest.approx(reference, rel=1e-10)
    # A sketch as large as the space makes the estimate exact.
    assert ours == pytest.approx(float(values.sum()), rel=1e-10)


def test_a_vector_with_nothing_left_adds_nothing_to_the_orthonormal_basis() -> None:
    generator = torch.Generator().manual_seed(7)
    a, b = torch.randn(2, 20, generator=generator, dtype=torch.float64)
    zero = torch.zeros(20, dtype=torch.float64)
    kinds, basis = _kinds_and_result(orthonormal_units([a, zero, b], block=1))
    assert len(basis) == 2
    gram = torch.stack(basis) @ torch.stack(basis).T
    torch.testing.assert_close(gram, torch.eye(2, dtype=torch.float64))
    assert set(kinds) == {REORTHOGONALISE}
