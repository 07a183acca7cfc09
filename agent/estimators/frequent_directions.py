"""Frequent Directions: a deterministic, mergeable sketch of a stream of row vectors.

Keeps 2*ell rows; when full, shrinks by the ell-th squared singular value, which zeroes
half the rows (one SVD per ell insertions). For the stream A with sketch B this
guarantees ||A^T A - B^T B||_2 <= ||A - A_k||_F^2 / (ell - k) for every k < ell
(Ghashami, Liberty, Phillips, Woodruff 2016). Exponential forgetting multiplies the
sketch by gamma at each insertion, so old gradients fade; gamma = 1 keeps the bound above.
"""

from __future__ import annotations

from typing import Any

import torch


class FrequentDirections:
    """Sketch of the row stream a_1, a_2, ... in R^dim, with ``ell`` kept directions."""

    def __init__(self, dim: int, ell: int, decay: float = 1.0,
                 device: torch.device | str | None = None) -> None:
        if ell < 1 or dim < 1:
            raise ValueError(f"need ell >= 1 and dim >= 1, got ell={ell}, dim={dim}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.dim = dim
        self.ell = ell
        self.decay = decay
        self.buffer = torch.zeros(2 * ell, dim, dtype=torch.float32, device=device)
        self.filled = 0
        self.rows_seen = 0

    def insert(self, row: torch.Tensor) -> None:
        """Adds one row (decaying what is already there by gamma)."""
        row = row.detach().reshape(-1).to(self.buffer)
        if row.numel() != self.dim:
            raise ValueError(f"row has {row.numel()} entries, sketch dimension is {self.dim}")
        if self.decay != 1.0:
            self.buffer[: self.filled] *= self.decay
        if self.filled == self.buffer.shape[0]:
            self._shrink()
        self.buffer[self.filled] = row
        self.filled += 1
        self.rows_seen += 1

    def _shrink(self) -> None:
        """Shrinks the filled rows to at most ell - 1 nonzero rows (FD's one step)."""
        self.buffer, self.filled = _shrunk(self.buffer[: self.filled], self.ell,
                                           2 * self.ell)

    @property
    def sketch(self) -> torch.Tensor:
        """The current sketch B (its nonzero rows); B^T B approximates A^T A."""
        return self.buffer[: self.filled]

    def merge(self, other: FrequentDirections) -> FrequentDirections:
        """A new sketch of the stacked streams: stack both sketches and shrink."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge sketches of dimension {self.dim} and {other.dim}")
        merged = FrequentDirections(self.dim, self.ell, self.decay, self.buffer.device)
        stacked = torch.cat([self.sketch, other.sketch.to(self.buffer)])
        if stacked.shape[0] > 2 * self.ell:
            merged.buffer, merged.filled = _shrunk(stacked, self.ell, 2 * self.ell)
        else:
            merged.buffer[: stacked.shape[0]] = stacked
            merged.filled = stacked.shape[0]
        merged.rows_seen = self.rows_seen + other.rows_seen
        return merged

    def top_subspace(self, k: int) -> torch.Tensor:
        """Orthonormal [dim, k'] basis of the top-k right singular vectors (k' <= k)."""
        if self.filled == 0:
            return torch.zeros(self.dim, 0, dtype=torch.float32, device=self.buffer.device)
        _, s, vh = torch.linalg.svd(self.sketch, full_matrices=False)
        rank = int((s > s[0] * 1e-6).sum()) if s[0] > 0 else 0
        return vh[: min(k, rank)].T.contiguous()

    def state_dict(self) -> dict[str, Any]:
        return {"sketch": self.sketch.cpu().clone(), "rows_seen": self.rows_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rows = state["sketch"].to(self.buffer)
        if rows.shape[1] != self.dim or rows.shape[0] > self.buffer.shape[0]:
            raise ValueError(f"sketch of shape {tuple(rows.shape)} does not fit this sketch")
        self.buffer.zero_()
        self.buffer[: rows.shape[0]] = rows
        self.filled = rows.shape[0]
        self.rows_seen = int(state["rows_seen"])


def _shrunk(rows: torch.Tensor, ell: int, capacity: int) -> tuple[torch.Tensor, int]:
    """Rows shrunk by their ell-th squared singular value, in a buffer of ``capacity``."""
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    delta = s[ell - 1] ** 2 if s.numel() >= ell else s.new_zeros(())
    shrunk = torch.sqrt(torch.clamp(s**2 - delta, min=0.0))
    kept = int((shrunk > 0).sum())
    buffer = rows.new_zeros(capacity, rows.shape[1])
    buffer[:kept] = shrunk[:kept, None] * vh[:kept]
    return buffer, kept
