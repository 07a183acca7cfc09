"""Matrix-free spectral estimates of a symmetric operator given only v -> A v.

Lanczos finds the top eigenpair in few products, fewer still when started from the last
estimate's eigenvector; Hutchinson and Hutch++ estimate the trace.

Each has a ``*_units`` form, a generator that finally returns the estimate, so a caller
can spread one estimate over several training steps. It takes the operator as a
``UnitMatVec``, whose products are themselves units (one unit each, by :func:`one_unit`,
or several when a product is split, e.g. over chunks of a batch); the plain functions
take a plain ``MatVec`` and run everything at once. The units name their kinds (see
:data:`~raresignal.agent.api.Units`). Work on the stored vectors (the Lanczos basis,
Hutch++'s sketched subspace), each of the operator's size, goes a block of at most
``block`` vectors per unit, so that no unit grows with the number of iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from raresignal.agent.api import Units, run_units
from raresignal.agent.estimators.config import EstimatorConfig

MatVec = Callable[[torch.Tensor], torch.Tensor]
# v -> A v in units: a generator whose return value is the product.
UnitMatVec = Callable[[torch.Tensor], Units[torch.Tensor]]

# Kinds of units.
PRODUCT = "product"
REORTHOGONALISE = "reorthogonalise"
COMBINE = "combine"

BLOCK = EstimatorConfig.curvature_unit_vectors


def one_unit(matvec: MatVec) -> UnitMatVec:
    """``matvec`` with each product as one unit."""

    def product(vector: torch.Tensor) -> Units[torch.Tensor]:
        yield PRODUCT
        return matvec(vector)

    return product


def orthogonalise_units(basis: Sequence[torch.Tensor], vector: torch.Tensor,
                        block: int = BLOCK) -> Units[torch.Tensor]:
    """``vector`` less its components along ``basis`` (orthonormal vectors), by modified
    Gram-Schmidt applied twice (twice is enough, Kahan-Parlett): ``block`` projections per
    unit. Vector by vector, in place and in one order whatever ``block`` is, so the
    result does not depend on it, and nothing is copied: stacking the basis into one
    matrix would copy every vector at every Lanczos iteration."""
    _check_block(block)
    vector = vector.clone()  # the caller's stays as it was
    projections = [*basis, *basis]
    for start in range(0, len(projections), block):
        yield REORTHOGONALISE
        for q in projections[start: start + block]:
            vector.addcmul_(q, q @ vector, value=-1.0)
    return vector


def project_out(basis: Sequence[torch.Tensor], vector: torch.Tensor) -> torch.Tensor:
    """``vector`` less its projection on ``basis`` (orthonormal vectors), at once."""
    result = vector.clone()
    for q in basis:
        result.addcmul_(q, q @ vector, value=-1.0)
    return result


def combine_units(basis: Sequence[torch.Tensor], coefficients: torch.Tensor,
                  block: int = BLOCK) -> Units[torch.Tensor]:
    """sum_i coefficients[i] basis[i] over the first ``len(coefficients)`` vectors,
    ``block`` vectors per unit."""
    _check_block(block)
    total = torch.zeros_like(basis[0])
    for start in range(0, coefficients.numel(), block):
        yield COMBINE
        for i in range(start, min(start + block, coefficients.numel())):
            total.addcmul_(basis[i], coefficients[i])
    return total


def orthonormal_units(vectors: Sequence[torch.Tensor], block: int = BLOCK
                      ) -> Units[list[torch.Tensor]]:
    """An orthonormal basis of the span of ``vectors`` by Gram-Schmidt, each vector
    orthogonalised against the basis so far as in :func:`orthogonalise_units`; one with
    nothing left (exactly in the span of those before it) adds no vector."""
    basis: list[torch.Tensor] = []
    for vector in vectors:
        vector = yield from orthogonalise_units(basis, vector, block)
        norm = float(vector.norm())
        if norm > 0.0 and math.isfinite(norm):
            basis.append(vector / norm)
    return basis


def _check_block(block: int) -> None:
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")


@dataclass(frozen=True)
class Eigenpair:
    value: float
    vector: torch.Tensor  # unit norm
    matvecs: int
    residual: float  # |A x - value x|, a bound on the distance to an eigenvalue
    # (theta_1 - theta_2) / |theta_1| of the Ritz values, once there were three or more
    # (fewer Ritz values say too little about lambda_2); None otherwise.
    relative_gap: float | None = None


def lanczos_top(matvec: MatVec, start: torch.Tensor, max_iter: int, tol: float,
                relative_gap: float | None = None, value_rtol: float = 0.01,
                block: int = BLOCK) -> Eigenpair:
    """Largest (algebraic) eigenpair by Lanczos; see :func:`lanczos_top_units`."""
    return run_units(lanczos_top_units(one_unit(matvec), start, max_iter, tol, relative_gap,
                                       value_rtol, block))


def lanczos_top_units(matvec: UnitMatVec, start: torch.Tensor, max_iter: int, tol: float,
                      relative_gap: float | None = None, value_rtol: float = 0.01,
                      block: int = BLOCK) -> Units[Eigenpair]:
    """Largest (algebraic) eigenpair by Lanczos with full reorthogonalisation.

    Stops once the Ritz residual |A x - theta x| is below ``tol * |theta|``. By the
    Kato-Temple bound the eigenvalue error is then at most residual^2 / gap, so tol=0.02
    typically gives eigenvalues well within 1%. Given a (conservative) estimate of the gap
    (lambda_1 - lambda_2) / |lambda_1|, it also stops as soon as that bound,
    residual^2 / (relative_gap |theta|), is below ``value_rtol * |theta|``: a warm start
    from the previous step's eigenvector is then often accepted after a single product,
    because the eigenvalue error is quadratic in the eigenvector's.

    The reorthogonalisation against the basis (:func:`orthogonalise_units`) and the Ritz
    vector's assembly from it go ``block`` basis vectors per unit.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    basis = [start / start.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    theta, ritz, residual = 0.0, start.new_ones(1), math.inf
    for iteration in range(max_iter):
        w = yield from matvec(basis[-1])
        alphas.append(float(w @ basis[-1]))
        w = yield from orthogonalise_units(basis, w, block)
        beta = float(w.norm())
        m = len(alphas)
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(betas, dtype=torch.float64)
            tri += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(tri)
        theta, ritz = float(values[-1]), vectors[:, -1]
        residual = beta * abs(float(ritz[-1]))
        if (residual <= tol * abs(theta) or beta <= 1e-12 * max(abs(theta), 1e-30)
                or _temple_accepts(residual, theta, relative_gap, value_rtol)
                or iteration + 1 == max_iter):
            break
        betas.append(beta)
        basis.append(w / beta)
    coeffs = ritz.to(start.dtype).to(start.device)
    vector = yield from combine_units(basis, coeffs, block)
    gap = (float(values[-1] - values[-2]) / abs(theta)
           if values.numel() >= 3 and theta != 0.0 else None)
    return Eigenpair(theta, vector / vector.norm(), len(alphas), residual, gap)


def _temple_accepts(residual: float, theta: float, relative_gap: float | None,
                    value_rtol: float) -> bool:
    """Kato-Temple: lambda_1 - theta <= residual^2 / (theta - lambda_2) when theta >
    lambda_2; accept when that bound is within ``value_rtol`` of theta."""
    if relative_gap is None or relative_gap <= 0.0 or theta == 0.0:
        return False
    return residual * residual <= value_rtol * relative_gap * theta * theta


def rademacher(shape: tuple[int, ...], generator: torch.Generator,
               device: torch.device) -> torch.Tensor:
    """+-1 entries with equal probability (drawn on CPU from a seeded generator)."""
    bits = torch.randint(0, 2, shape, generator=generator)
    return (2.0 * bits - 1.0).to(device)


def hutchinson_trace(matvec: MatVec, dim: int, samples: int, generator: torch.Generator,
                     device: torch.device) -> float:
    """mean z^T A z over Rademacher z; variance 2(|A|_F^2 - sum A_ii^2) / samples."""
    return run_units(hutchinson_trace_units(one_unit(matvec), dim, samples, generator, device))


def hutchinson_trace_units(matvec: UnitMatVec, dim: int, samples: int,
                           generator: torch.Generator, device: torch.device) -> Units[float]:
    """:func:`hutchinson_trace` in units."""
    if samples < 1:
        raise ValueError(f"need at least one sample, got {samples}")
    total = 0.0
    for _ in range(samples):
        z = rademacher((dim,), generator, device)
        total += float(z @ (yield from matvec(z)))
    return total / samples


def hutchpp_trace(matvec: MatVec, dim: int, matvecs: int, generator: torch.Generator,
                  device: torch.device, block: int = BLOCK) -> float:
    """Hutch++ (Meyer et al. 2021): exact trace on a sketched top subspace plus Hutchinson
    on the rest. Uses ``matvecs`` products (rounded down to a multiple of 3, at least 3);
    its variance is that of Hutchinson on the deflated operator, at most 2|A|_F^2 / (m/3).
    """
    return run_units(hutchpp_trace_units(one_unit(matvec), dim, matvecs, generator, device,
                                         block))


def hutchpp_trace_units(matvec: UnitMatVec, dim: int, matvecs: int, generator: torch.Generator,
                        device: torch.device, block: int = BLOCK) -> Units[float]:
    """:func:`hutchpp_trace` in units; the sketch's orthonormal basis by Gram-Schmidt,
    ``block`` vectors per unit (see :func:`orthonormal_units`)."""
    third = max(matvecs // 3, 1)
    columns = []
    for _ in range(third):
        columns.append((yield from matvec(rademacher((dim,), generator, device))))
    q = yield from orthonormal_units(columns, block)
    del columns
    top = 0.0
    for vector in q:
        top += float(vector @ (yield from matvec(vector)))
    rest = 0.0
    for _ in range(third):
        z = project_out(q, rademacher((dim,), generator, device))
        az = yield from matvec(z)
        rest += float(z @ project_out(q, az))
    return top + rest / third
