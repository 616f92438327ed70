"""Low-rank factorisation of a segment of cached keys or values, and folding new rows in.

A segment X (num_tokens x kv_width, heads concatenated) is stored as X ~ F @ B with
F (num_tokens x rank) carrying the singular values and B (rank x kv_width) having
orthonormal rows. Outputs are always padded to the requested rank with zero
columns/rows, so a segment shorter than its rank is stored exactly and every
segment has the same shape.

`fold` adds rows to an existing factorisation (periodic re-compression and later
prefill chunks): it re-factorises [F @ B; X_new] without rebuilding F @ B, working in
the span of B's rows and the new rows, and returns the R x R map that rotates the
stored factors into the new basis.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SvdSettings:
    """How truncated SVDs are computed."""

    method: str = "exact"   # "exact" | "randomized"
    oversample: int = 8
    power_iters: int = 2


@dataclass
class LowRank:
    factors: torch.Tensor  # [num_tokens, rank] float32, singular values folded in
    basis: torch.Tensor    # [rank, kv_width] float32, orthonormal (or zero) rows


@dataclass
class Fold:
    rotation: torch.Tensor     # [rank, rank]: old factors @ rotation = their new factors
    new_factors: torch.Tensor  # [num_new, rank]
    basis: torch.Tensor        # [rank, kv_width]


def truncated_svd(x: torch.Tensor, rank: int, svd: SvdSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(U*S [n, r], Vh [r, d]) of the best rank-r approximation, r = min(rank, n, d)."""
    x = x.float()
    r = min(rank, *x.shape)
    if r == 0:
        return x.new_zeros(x.shape[0], 0), x.new_zeros(0, x.shape[1])
    if svd.method == "randomized" and r + svd.oversample < min(x.shape):
        u, s, v = torch.svd_lowrank(x, q=r + svd.oversample, niter=svd.power_iters)
        return u[:, :r] * s[:r], v[:, :r].T
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u[:, :r] * s[:r], vh[:r]


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def factorize(x: torch.Tensor, rank: int, svd: SvdSettings = SvdSettings()) -> LowRank:
    """Factorise x [num_tokens, kv_width] at `rank` (padded; exact when num_tokens <= rank)."""
    us, vh = truncated_svd(x, rank, svd)
    return LowRank(_pad(us, x.shape[0], rank), _pad(vh, rank, x.shape[1]))


def fold(old_factors: torch.Tensor, basis: torch.Tensor, new_rows: torch.Tensor,
         rank: int, svd: SvdSettings = SvdSettings()) -> Fold:
    """Re-factorise [old_factors @ basis; new_rows] at `rank`.

    old_factors: [n, rank]; basis: [rank, d] (orthonormal or zero rows);
    new_rows: [m, d]. The old tokens' new factors are `old_factors @ rotation`;
    their reconstruction changes only by the truncation to `rank`.

    The work happens in an orthonormal frame Q spanning the basis rows and the new
    rows (a QR factorisation, so the frame is orthonormal even when the stored basis
    has drifted or the new rows add nothing), and the old factors are never multiplied
    back to width d. The frame is exact when m <= rank (a re-compression window); for
    a longer chunk the new rows first give up all but their top `rank` directions.
    """
    basis, new_rows = basis.float(), new_rows.float()
    directions = new_rows
    if new_rows.shape[0] > rank:
        _, directions = truncated_svd(new_rows, rank, svd)
    frame, _ = torch.linalg.qr(torch.cat([basis, directions]).T)   # [d, k], orthonormal columns
    basis_in_frame = basis @ frame                                   # [rank, k]
    coords = torch.cat([old_factors.float() @ basis_in_frame, new_rows @ frame])  # [n + m, k]
    _, vh = truncated_svd(coords, rank, svd)                         # [r, k]
    v = vh.T
    return Fold(
        rotation=_pad(basis_in_frame @ v, rank, rank),
        new_factors=_pad(coords[old_factors.shape[0]:] @ v, new_rows.shape[0], rank),
        basis=_pad(vh @ frame.T, rank, basis.shape[1]),
    )


def per_head_reconstruction(x: torch.Tensor, num_heads: int, rank_per_head: int,
                            svd: SvdSettings = SvdSettings()) -> torch.Tensor:
    """Reconstruction of x [n, num_heads * head_size] factorised head by head.

    The alternative to concatenated heads, kept so that the two can be compared at
    equal bytes (see `stored_elements`).
    """
    heads = x.float().chunk(num_heads, dim=1)
    parts = []
    for head in heads:
        low = factorize(head, rank_per_head, svd)
        parts.append(low.factors @ low.basis)
    return torch.cat(parts, dim=1)


def stored_elements(num_tokens: int, width: int, rank: int, num_heads: int = 1) -> int:
    """Elements stored for a segment: factors plus basis, per head when num_heads > 1."""
    head_width = width // num_heads
    return num_heads * (num_tokens * rank + rank * head_width)


def relative_error(x: torch.Tensor, approx: torch.Tensor) -> float:
    """Frobenius-norm relative reconstruction error."""
    return float((x.float() - approx.float()).norm() / x.float().norm().clamp_min(1e-30))
