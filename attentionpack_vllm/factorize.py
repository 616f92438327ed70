"""Low-rank factorisation of cached keys or values, and folding new rows in, batched.

A segment X (num_tokens x kv_width, heads concatenated) is stored as X ~ F @ B with
F (num_tokens x rank) carrying the singular values and B (rank x kv_width) having
orthonormal rows. Outputs are always padded to the requested rank with zero
columns/rows, so a segment with no more rows than its rank is stored exactly and
every segment has the same shape.

Every call is batched: `factorize_batch` takes [batch, num_tokens, kv_width] and
`fold_batch` [batch, ...] tensors, with all-zero rows as padding (a zero row changes
nothing and gets zero factors). `factorize` and `fold` are the one-request forms.

With `energy` (a share in (0, 1]), both keep only the fewest leading directions
whose energy reaches that share of the segment's (the rest are zeroed like padding):
a rank chosen per request, layer and matrix by captured energy, capped at `rank`.

`fold` adds rows to an existing factorisation (periodic re-compression and later
prefill chunks): it re-factorises [F @ B; X_new] without rebuilding F @ B, working in
an orthonormal frame spanning B's rows and the new rows (the old tokens only enter
through the small Gram matrix F^T F), and returns the R x R map that rotates the
stored factors into the new basis.

Methods (`SvdSettings.method`):

- "exact": `torch.linalg.svd` (LAPACK / cuSOLVER); the oracle.
- "gram": the eigendecomposition (`torch.linalg.eigh`) of the Gram matrix of the
  smaller side, in float64; as accurate as "exact", and much faster on CPU.
- "gram32": "gram" with the Gram matrices, eigendecompositions and products in
  float32 (about half the time on CPU). Its round-off, about 1e-7 of the largest
  direction's scale, is far below what int8 or 16-bit storage rounds away; directions
  whose energy round-off cannot tell from zero (below `_negligible_energy`) are dropped.
  A basis made from a Gram matrix's eigenvectors is orthonormal as eigh returns it; one
  made from the other side's (A^T W / sigma, `_directions_from_rows`), orthonormal to
  round-off already, gets one CholeskyQR pass in float32 (`_reorthonormalize_rows`).
- "randomized": only matrix products, Cholesky factorisations, triangular solves
  and elementwise ops, so that a GPU never meets cuSOLVER's slow batched small
  SVD / eigh / QR. Factorisation: a randomized range finder (rank + oversample
  Gaussian columns, `power_iters` power iterations), orthonormalised by CholeskyQR.
  The small eigenproblem that follows, and a fold's (R + m)-square Gram matrix, are
  solved by simultaneous (orthogonal) iteration with CholeskyQR, started from the
  coordinate axes in order of their energy (for a fold: the old basis directions and
  the new ones, so the start is already close).
- "auto": "randomized" on CUDA, "gram32" elsewhere (`resolve_method`).

Every CholeskyQR runs in float64 (cheap at these sizes) but the last pass over
"gram32"'s nearly orthonormal directions, and so does every small eigenproblem but
"gram32"'s. A "randomized" factorisation keeps its products with the
[num_tokens, kv_width] data in float32; "gram" works in float64 throughout, "gram32" in
float32 (but for the frame route of wide folds, `_fold_gram`, in float64). A fold
touches the old factors only in F^T F (float64). Outputs are float32.

This module imports only torch, so benchmarks/factorize_bench.py can load it on a
machine without vLLM.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

METHODS = ("auto", "exact", "gram", "gram32", "randomized")
GRAM_METHODS = ("gram", "gram32")  # the eigendecomposition methods: same routes, two precisions
# A direction whose singular value is below this fraction of the largest is dropped
# (zero basis row, zero factor column): what padding and rank deficiency leave behind
# is round-off, and keeping it would give the basis arbitrary rows.
NEGLIGIBLE = 1e-6
# Simultaneous-iteration steps for the small eigenproblems of the "randomized" method
# (each step multiplies by the squared Gram matrix, then CholeskyQR).
EIGEN_STEPS_FACTORIZE = 6   # cold start: the sketch's axes, ordered by energy
EIGEN_STEPS_FOLD = 3        # warm start: the old basis, then the new directions
# Diagonal shift (per column, relative to unit columns) that keeps every float64
# Cholesky factorisation defined: a column whose part outside the earlier columns is
# below about sqrt(shift) of its length comes out shrunk, not blown up from round-off.
CHOLESKY_SHIFT = 1e-13
# The "gram" fold works in the KV width (one d-square eigenproblem) instead of an
# orthonormal frame of the basis and the new rows (rank + window square, plus two
# Cholesky passes) when d <= this times the frame's size: measured faster on this
# CPU up to about 1.5 (SmolLM2: d = 192 against 80 + 64, 21 against 36 ms for ten
# requests), slower beyond (d = 256 against 144: 42 against 32 ms).
WIDTH_FOLD_MAX_RATIO = 1.5
SKETCH_SEED = 0


@dataclass(frozen=True)
class SvdSettings:
    """How truncated SVDs are computed (the `svd`, `svd_oversample`, `svd_power_iters` settings)."""

    method: str = "auto"   # one of METHODS
    oversample: int = 16   # "randomized": extra sketch columns beyond the rank
    power_iters: int = 2   # "randomized": power iterations of the range finder

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"attentionpack setting 'svd' = {self.method!r} is invalid: "
                             f"expected one of {list(METHODS)}")
        for key, value in (("svd_oversample", self.oversample), ("svd_power_iters", self.power_iters)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"attentionpack setting {key!r} = {value!r} is invalid: "
                                 "expected an integer >= 0")


@dataclass
class LowRank:
    factors: torch.Tensor  # [..., num_tokens, rank] float32, singular values folded in
    basis: torch.Tensor    # [..., rank, kv_width] float32, orthonormal (or zero) rows


@dataclass
class Fold:
    rotation: torch.Tensor     # [..., R, rank]: old factors @ rotation = their new factors
    new_factors: torch.Tensor  # [..., num_new, rank]
    basis: torch.Tensor        # [..., rank, kv_width], orthonormal (or zero) rows


def resolve_method(method: str, device: torch.device | str) -> str:
    """The method that runs on `device`: "auto" is "randomized" on CUDA, "gram32" elsewhere.

    On CUDA "randomized" avoids cuSOLVER's batched small decompositions. On CPU the
    eigendecomposition methods were measured fastest at SmolLM2's KV width, for
    factorising and for folds, "gram32" about twice as fast as "gram"
    (benchmarks/results/factorize_bench_cpu.json), with perplexity through the model
    between "exact"'s and "gram"'s (benchmarks/results/quality_defaults_svd_*.json). Any
    other method is returned as it is.
    """
    if method not in METHODS:
        raise ValueError(f"attentionpack setting 'svd' = {method!r} is invalid: "
                         f"expected one of {list(METHODS)}")
    if method != "auto":
        return method
    return "randomized" if torch.device(device).type == "cuda" else "gram32"


def _precision(method: str) -> torch.dtype:
    """The precision a method's Gram matrices and eigenproblems work in (float32: "gram32")."""
    return torch.float32 if method == "gram32" else torch.float64


def describe(svd: SvdSettings, device: torch.device | str) -> str:
    """One line for the startup log: the method that runs on `device`, and how."""
    method = resolve_method(svd.method, device)
    how = {
        "exact": "torch.linalg.svd",
        "gram": "float64 Gram matrix + torch.linalg.eigh",
        "gram32": "float32 Gram matrix + torch.linalg.eigh",
        "randomized": (f"randomized range finder (rank + {svd.oversample} columns, {svd.power_iters} power "
                       f"iterations), CholeskyQR, simultaneous iteration ({EIGEN_STEPS_FACTORIZE} steps; "
                       f"{EIGEN_STEPS_FOLD} per fold): matrix products and Cholesky only"),
    }[method]
    return f"svd={svd.method} on {torch.device(device).type}: {method} ({how})"


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------

def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad the last two dimensions of t to [rows, cols]."""
    return torch.nn.functional.pad(t, (0, cols - t.shape[-1], 0, rows - t.shape[-2]))


def _orthonormalizer(gram: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """A [..., k, k] such that Y @ A has orthonormal columns, for any Y with Y^T Y = gram.

    gram: float64 [..., k, k]. Each pass is one CholeskyQR step done on the Gram
    matrix alone: scale the columns to unit norm, factor the scaled Gram matrix +
    shift * I = L L^T, and take A = D L^-T. The shift (`CHOLESKY_SHIFT` times k)
    keeps the factorisation defined when Y is rank-deficient: a zero column stays
    zero, and a column with almost nothing outside the earlier ones comes out short
    instead of as amplified round-off. A second pass restores orthogonality lost to
    round-off and drops the columns the first one left short (less than half their
    length: nothing of their own beyond about sqrt(shift)). Y itself is never touched,
    so the cost does not depend on Y's length; but the Gram matrix squares Y's
    condition, so a caller that needs Y A orthonormal to round-off finishes with an
    explicit pass.
    """
    k = gram.shape[-1]
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    total = eye.expand_as(gram)
    for pass_ in range(passes):
        diagonal = gram.diagonal(dim1=-2, dim2=-1)
        floor = 0.25 if pass_ else 0.0
        scale = torch.where(diagonal > floor, diagonal.clamp_min(1e-300).rsqrt(), torch.zeros_like(diagonal))
        scaled = gram * scale.unsqueeze(-1) * scale.unsqueeze(-2)
        lower, _ = torch.linalg.cholesky_ex(scaled + CHOLESKY_SHIFT * k * eye)
        step = scale.unsqueeze(-1) * torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False).mT
        total = total @ step
        gram = step.mT @ gram @ step
    return total


def _cholesky_qr(y: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """Orthonormalise the columns of y [..., n, c] in order (CholeskyQR in float64; y's dtype out)."""
    y64 = y.double()
    return (y64 @ _orthonormalizer(y64.mT @ y64, passes)).to(y.dtype)


def _reorthonormalize_rows(y: torch.Tensor) -> torch.Tensor:
    """[..., c, n]: the columns of y [..., n, c] made orthonormal in order by one CholeskyQR
    pass in y's own precision, returned as rows (L^-1 y^T, contiguous); zero columns stay zero.

    Only for columns orthonormal up to round-off already (or zero), as the directions of
    `_directions_from_rows` are: their Gram matrix is then within round-off of the
    identity, so its Cholesky factor is well defined and accurate in float32, and one
    triangular solve restores orthonormality to the working precision.
    """
    gram = y.mT @ y                                                                    # [..., c, c]
    present = gram.diagonal(dim1=-2, dim2=-1) > 0.25
    both = present.unsqueeze(-1) & present.unsqueeze(-2)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    lower, _ = torch.linalg.cholesky_ex(torch.where(both, gram, eye))                # a zero column: a unit pivot
    rows = torch.linalg.solve_triangular(lower, y.mT, upper=False) * present.unsqueeze(-1)
    return rows.contiguous()  # the solve writes column-major; the stores quantize along rows


def _top_eigenvectors(gram: torch.Tensor, r: int, exact: bool, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r eigenvectors of symmetric PSD gram [..., c, c] (float64), largest first.

    Returns (vectors [..., c, r] orthonormal columns, energies [..., r] = their
    Rayleigh quotients). `exact`: torch.linalg.eigh. Otherwise simultaneous iteration
    with the squared matrix: start from the coordinate axes in order of their
    energy (the diagonal), `steps` times multiply and re-orthonormalise by
    CholeskyQR, then order the columns by Rayleigh quotient. A column that CholeskyQR
    left short (nothing found outside the earlier columns: gram has lower rank) gets
    energy 0.
    """
    if exact:
        values, vectors = torch.linalg.eigh(gram)  # ascending: the top r are the last, reversed
        first = gram.shape[-1] - r
        return vectors[..., first:].flip(-1), values[..., first:].flip(-1).clamp_min(0)
    order = gram.diagonal(dim1=-2, dim2=-1).argsort(dim=-1, descending=True)       # [..., c]
    vectors = torch.zeros_like(gram).scatter_(-2, order.unsqueeze(-2), 1.0)        # axes e_order[j]
    squared = gram @ gram
    for _ in range(steps):
        vectors = _cholesky_qr(squared @ vectors)
    found = vectors.square().sum(-2) > 0.25                                          # [..., c]
    energies = ((gram @ vectors) * vectors).sum(-2) * found
    energies, top = energies.sort(dim=-1, descending=True)
    top = top[..., :r]
    return vectors.gather(-1, top.unsqueeze(-2).expand(*vectors.shape[:-1], r)), energies[..., :r]


def _negligible_energy(dtype: torch.dtype, size: int) -> float:
    """Energy, as a share of the largest direction's, below which a direction of a
    `size`-square eigenproblem solved in `dtype` is dropped: `NEGLIGIBLE` squared, or,
    where round-off is larger (float32), the eigensolver's error bound, about size x eps
    (a direction there is round-off, not data)."""
    return max(NEGLIGIBLE ** 2, size * torch.finfo(dtype).eps)


def _drop_negligible(vectors: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
    """Zero the columns of vectors [..., c, r] whose energy is negligible (`_negligible_energy`)."""
    largest = energies.amax(-1, keepdim=True)
    keep = energies > largest * _negligible_energy(energies.dtype, vectors.shape[-2])
    return vectors * keep.unsqueeze(-2)


@functools.lru_cache(maxsize=16)
def _gaussian_sketch(width: int, columns: int, device: torch.device) -> torch.Tensor:
    """A fixed Gaussian test matrix [width, columns] (seeded: the same for every call)."""
    gen = torch.Generator().manual_seed(SKETCH_SEED)
    return torch.randn(width, columns, generator=gen).to(device)


def _range_sketch(x: torch.Tensor, columns: int, power_iters: int) -> torch.Tensor:
    """[..., d, columns]: X^T Q, where Q [..., n, columns] spans X's dominant columns.

    Randomized range finder: Q from X @ Omega, then `power_iters` rounds of
    Q <- orth(X X^T Q), each orthonormalisation one CholeskyQR pass (in float64, so
    the squared condition number of X X^T Q is no trouble).
    """
    q = _cholesky_qr(x @ _gaussian_sketch(x.shape[-1], columns, x.device))
    for _ in range(power_iters):
        q = _cholesky_qr(x @ (x.mT @ q))
    return x.mT @ q


# ---------------------------------------------------------------------------
# Factorisation
# ---------------------------------------------------------------------------

def factorize_batch(x: torch.Tensor, rank: int, svd: SvdSettings = SvdSettings(),
                    energy: float | None = None) -> LowRank:
    """Factorise every x[b] [num_tokens, kv_width] at `rank`: factors [B, n, rank], basis [B, rank, d].

    Zero rows are padding: they get zero factors and change nothing else. A request
    with no more valid rows than `rank` is stored exactly. Basis rows past a
    request's numerical rank are zero, and so are those past the fewest directions
    that capture `energy` of x[b]'s energy (None: keep all `rank`).
    """
    if x.dim() != 3:
        raise ValueError(f"factorize_batch: x must be [batch, num_tokens, kv_width], got {list(x.shape)}")
    method = resolve_method(svd.method, x.device)
    x = x.float()
    n, d = x.shape[-2:]
    r = min(rank, n, d)
    if r == 0:
        return LowRank(x.new_zeros(*x.shape[:-1], rank), x.new_zeros(x.shape[0], rank, d))
    if method == "exact":
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        basis = vh[..., :r, :] * (s[..., :r] > s[..., :1] * NEGLIGIBLE).unsqueeze(-1)
    else:
        basis = _top_row_space(x, r, svd, method)
    # X B^T = U S for the exact basis; and padding rows get exactly zero factors.
    low = LowRank(_pad(x @ basis.mT, n, rank), _pad(basis, rank, d))
    if energy is None:
        return low
    keep = energy_keep(low.factors.double().square().sum(-2), x.double().square().sum((-2, -1)), energy)
    return LowRank(low.factors * keep.unsqueeze(-2), low.basis * keep.unsqueeze(-1))


def energy_keep(column_energy: torch.Tensor, total_energy: torch.Tensor, energy: float) -> torch.Tensor:
    """[..., r] bool: the fewest columns, largest first, whose energy sums to at least
    `energy` x total_energy [...] (all nonzero columns when they do not reach it).

    The columns of an orthonormal basis' factors carry disjoint shares of the data's
    energy, so the kept ones capture exactly their sum. Batched, no host reads.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    ordered, order = column_energy.sort(dim=-1, descending=True)
    before = ordered.cumsum(-1) - ordered                   # energy of the larger columns
    keep = (before < energy * total_energy.unsqueeze(-1)) & (ordered > 0)
    return torch.zeros_like(keep).scatter(-1, order, keep)


def _top_row_space(x: torch.Tensor, r: int, svd: SvdSettings, method: str) -> torch.Tensor:
    """Orthonormal rows [B, r, d] spanning (approximately) the top-r row space of x [B, n, d].

    The eigenproblem is set on the smaller side's Gram matrix, or, for "randomized"
    when both sides are longer than rank + oversample, on the sketch's; in the method's
    precision (`_precision`).
    """
    n, d = x.shape[-2:]
    columns = r + svd.oversample
    exact = method in GRAM_METHODS
    dtype = _precision(method)
    if d <= n and (exact or d <= columns):
        x = x.to(dtype)
        vectors, energies = _top_eigenvectors(x.mT @ x, r, exact, EIGEN_STEPS_FACTORIZE)
        return _drop_negligible(vectors, energies).mT.float()            # eigenvectors of X^T X
    sketch = x.mT if (exact or n <= columns) else _range_sketch(x, columns, svd.power_iters)
    rows = sketch.mT.to(dtype)                                            # [B, c, d]
    return _directions_from_rows(rows, rows @ rows.mT, r, exact, EIGEN_STEPS_FACTORIZE).float()


def _directions_from_rows(rows: torch.Tensor, gram: torch.Tensor, r: int, exact: bool = True,
                          steps: int = 0) -> torch.Tensor:
    """[B, r, d]: the top-r right singular directions of rows [B, k, d], as rows^T W for the
    top eigenvectors W of their Gram matrix `gram` = rows rows^T [B, k, k] (`_top_eigenvectors`
    with `exact` and `steps`), made orthonormal; dropped directions stay zero.

    In float64 they are normalised through their own Gram matrix W^T gram W; in float32
    ("gram32"), where that Gram matrix squares too much round-off, each is divided by its
    singular value, which leaves them orthonormal to round-off, and the lot gets one
    float32 CholeskyQR pass (`_reorthonormalize_rows`; the rows come out contiguous).
    """
    vectors, energies = _top_eigenvectors(gram, min(r, gram.shape[-1]), exact, steps)
    coeffs = _drop_negligible(vectors, energies)                          # [B, k, r]
    if gram.dtype == torch.float64:
        coeffs = coeffs @ _orthonormalizer(coeffs.mT @ gram @ coeffs)
        return (rows.mT @ coeffs).mT
    directions = rows.mT @ (coeffs * energies.clamp_min(1e-30).rsqrt().unsqueeze(-2))
    return _reorthonormalize_rows(directions) if directions.shape[-1] else directions.mT


def factorize(x: torch.Tensor, rank: int, svd: SvdSettings = SvdSettings(),
              energy: float | None = None) -> LowRank:
    """Factorise x [num_tokens, kv_width] at `rank` (padded; exact when num_tokens <= rank)."""
    low = factorize_batch(x[None], rank, svd, energy)
    return LowRank(low.factors[0], low.basis[0])


# ---------------------------------------------------------------------------
# Folding new rows in
# ---------------------------------------------------------------------------

def fold_batch(old_factors: torch.Tensor, basis: torch.Tensor, new_rows: torch.Tensor,
               rank: int, svd: SvdSettings = SvdSettings(), energy: float | None = None,
               diagonal_gram: bool = False) -> Fold:
    """Re-factorise every [old_factors[b] @ basis[b]; new_rows[b]] at `rank`.

    old_factors: [B, T, R] (zero rows: padding, or tokens that keep their factors);
    basis: [B, R, d] (orthonormal or zero rows; a basis stored in half precision is
    re-orthonormalised here); new_rows: [B, m, d] (zero rows: padding). Returns
    rotation [B, R, rank] (the old tokens' new factors are `old_factors @ rotation`:
    their reconstruction changes only by the truncation to `rank`), new_factors
    [B, m, rank] and basis [B, rank, d]. Exact when the combined data has rank <= rank.

    The frame Q spans the basis rows and the new rows (at most `rank` of the new rows'
    directions: a longer chunk first gives up all but its top `rank`). The old tokens
    enter only through F^T F [R, R], so nothing is rebuilt at width d. The top `rank`
    directions of the combined data in Q's coordinates then come from the SVD of the
    stacked coordinates ("exact"), or from its (R + m)-square Gram matrix; "gram" at a
    narrow width d takes them from the combined data's d-square covariance instead
    (`_fold_width`). With
    `energy`, only the fewest directions capturing that share of the combined data's
    energy are kept (see `energy_keep`).

    `diagonal_gram`: the caller knows F^T F to be diagonal, as it is for factors that a
    factorisation or a fold produced (their columns are the data's coordinates along
    orthogonal principal directions: F = X U gives F^T F = U^T X^T X U, diagonal). Then
    only its diagonal, the columns' energies, is computed: O(T R) work instead of
    O(T R^2) in float64. Stored factors (rounded to 16 bits or int8) are diagonal up to
    that rounding, which the fold then leaves out.
    """
    _check_fold_shapes(old_factors, basis, new_rows)
    method = resolve_method(svd.method, new_rows.device)
    old = old_factors.float()
    # F^T F in float64: all the Gram method and the energy share need of the old tokens
    # ([B, R, R], or its diagonal [B, R] with `diagonal_gram`; see `_times_gram`).
    old_gram = None
    if method != "exact" or energy is not None:
        if diagonal_gram:
            old_gram = old.square().sum(-2).double()
        else:
            old64 = old.double()
            old_gram = old64.mT @ old64
    return _fold(old, old_gram, basis.float(), new_rows.float(), rank, method, svd, energy)


def fold_batch_diagonal(old_energies: torch.Tensor, basis: torch.Tensor, new_rows: torch.Tensor,
                        rank: int, svd: SvdSettings = SvdSettings(), energy: float | None = None) -> Fold:
    """`fold_batch` for old factors whose Gram matrix is diagonal, given by that diagonal:
    old_energies [B, R], the squared norms of their columns.

    A fold sees the old factors only through F^T F, so F = diag(sqrt(energies)) (R rows)
    stands for any T of them ("exact" factorises it): the result is the same, with no pass
    over the T tokens."""
    energies = old_energies.double().clamp_min(0)
    method = resolve_method(svd.method, new_rows.device)
    # Only "exact" factorises the old tokens themselves; the others need the energies alone.
    stand_in = (torch.diag_embed(energies.sqrt()).float() if method == "exact"
                else energies.new_zeros(energies.shape[0], 0, energies.shape[1], dtype=torch.float32))
    _check_fold_shapes(stand_in, basis, new_rows)
    return _fold(stand_in, energies, basis.float(), new_rows.float(), rank, method, svd, energy)


def _check_fold_shapes(old_factors: torch.Tensor, basis: torch.Tensor, new_rows: torch.Tensor) -> None:
    if old_factors.dim() != 3 or basis.dim() != 3 or new_rows.dim() != 3:
        raise ValueError("fold_batch: old_factors [B, T, R], basis [B, R, d] and new_rows [B, m, d] "
                         f"must be 3-d, got {list(old_factors.shape)}, {list(basis.shape)}, "
                         f"{list(new_rows.shape)}")
    if (old_factors.shape[-1] != basis.shape[-2] or basis.shape[-1] != new_rows.shape[-1]
            or not old_factors.shape[0] == basis.shape[0] == new_rows.shape[0]):
        raise ValueError(f"fold_batch: shapes do not agree: old_factors {list(old_factors.shape)}, "
                         f"basis {list(basis.shape)}, new_rows {list(new_rows.shape)}")


def _fold(old: torch.Tensor, old_gram: torch.Tensor | None, basis: torch.Tensor, new_rows: torch.Tensor,
          rank: int, method: str, svd: SvdSettings, energy: float | None) -> Fold:
    """`fold_batch` past its F^T F (float32 old factors, basis and new rows; `old_gram` None
    when neither the method nor the energy share needs it)."""
    diagonal_gram = old_gram is not None and old_gram.dim() == 2
    frame = basis.shape[1] + min(new_rows.shape[1], rank)    # rows of the frame's spanning set
    stacked = basis.shape[1] + new_rows.shape[1]             # rows of [sqrt(energies) B; N]
    gram_method = method in GRAM_METHODS
    if gram_method and diagonal_gram and stacked < basis.shape[-1]:
        result = _fold_stacked(old_gram, basis, new_rows, rank, _precision(method))
    elif gram_method and basis.shape[-1] <= WIDTH_FOLD_MAX_RATIO * frame:
        result = _fold_width(old_gram, basis, new_rows, rank, _precision(method))   # every new row as it is
    else:
        directions = new_rows
        if new_rows.shape[1] > rank:
            directions = factorize_batch(new_rows, rank, svd).basis
        if method == "exact":
            result = _fold_exact(old, basis, directions, new_rows, rank)
        else:
            result = _fold_gram(old_gram, basis, directions, new_rows, rank, exact=gram_method)
    d = basis.shape[-1]
    result = Fold(rotation=_pad(result.rotation, basis.shape[1], rank),
                  new_factors=_pad(result.new_factors, new_rows.shape[1], rank),
                  basis=_pad(result.basis, rank, d))
    if energy is None:
        return result
    # The combined data's energy per new direction and in all, the old tokens through F^T F.
    rotation = result.rotation.double()
    column_energy = (_times_gram(old_gram, rotation) * rotation).sum(-2) + result.new_factors.double().square().sum(-2)
    basis_gram = (basis @ basis.mT).double()
    old_total = ((old_gram * basis_gram.diagonal(dim1=-2, dim2=-1)).sum(-1) if old_gram.dim() == 2
                 else (old_gram * basis_gram).sum((-2, -1)))
    total = old_total + new_rows.double().square().sum((-2, -1))
    keep = energy_keep(column_energy, total, energy)
    return Fold(rotation=result.rotation * keep.unsqueeze(-2),
                new_factors=result.new_factors * keep.unsqueeze(-2),
                basis=result.basis * keep.unsqueeze(-1))


def _times_gram(old_gram: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """F^T F @ m for m [B, R, k]: old_gram is F^T F [B, R, R], or its diagonal [B, R]."""
    return m * old_gram.unsqueeze(-1) if old_gram.dim() == 2 else old_gram @ m


def _fold_exact(old: torch.Tensor, basis: torch.Tensor, directions: torch.Tensor,
                new_rows: torch.Tensor, rank: int) -> Fold:
    """The oracle: QR frame, SVD of the stacked coordinates [old F @ B Q^T; new Q^T]."""
    frame = torch.linalg.qr(torch.cat([basis, directions], dim=1).mT)[0].mT          # [B, k, d]
    coords = torch.cat([old @ (basis @ frame.mT), new_rows @ frame.mT], dim=1)         # [B, T + m, k]
    _, s, vh = torch.linalg.svd(coords, full_matrices=False)
    r = min(rank, s.shape[-1])
    keep = s[..., :r] > s[..., :1] * NEGLIGIBLE
    new_basis = (vh[..., :r, :] * keep.unsqueeze(-1)) @ frame                        # [B, r, d]
    return Fold(rotation=basis @ new_basis.mT, new_factors=new_rows @ new_basis.mT, basis=new_basis)


def _fold_width(old_gram: torch.Tensor, basis: torch.Tensor, new_rows: torch.Tensor, rank: int,
                dtype: torch.dtype = torch.float64) -> Fold:
    """The fold through the combined data's d-square covariance B^T (F^T F) B + N^T N.

    Its top `rank` eigenvectors U are the new basis rows (U^T, orthonormal whatever the
    stored basis B was), the rotation is B U and the new factors N U: the best rank-`rank`
    approximation of [F B; N], as "exact" gives. For narrow KV widths, where the
    d-square eigenproblem is no larger than the frame's (WIDTH_FOLD_MAX_RATIO).
    `old_gram` is F^T F in float64 (see `_times_gram`); the rest works in `dtype`
    (float32: "gram32"; eigh's eigenvectors are orthonormal as they come).
    """
    b, n = basis.to(dtype), new_rows.to(dtype)
    covariance = b.mT @ _times_gram(old_gram.to(dtype), b) + n.mT @ n                # [B, d, d]
    vectors, energies = _top_eigenvectors(covariance, min(rank, covariance.shape[-1]), True, 0)
    top = _drop_negligible(vectors, energies)                                        # [B, d, r]
    return Fold(rotation=(b @ top).float(), new_factors=(n @ top).float(), basis=top.mT.float())


def _fold_stacked(old_energies: torch.Tensor, basis: torch.Tensor, new_rows: torch.Tensor, rank: int,
                  dtype: torch.dtype = torch.float64) -> Fold:
    """The fold through the Gram matrix of the stacked rows A = [sqrt(E) B; N], when the old
    factors' Gram matrix is diagonal (E = `old_energies` [B, R], float64) and A has fewer
    rows (R + m) than the KV width d.

    A^T A = B^T E B + N^T N is the combined data's d-square covariance (`_fold_width`), and
    its top eigenvectors are A^T W / sigma for the top eigenpairs (W, sigma^2) of the
    smaller A A^T: one (R + m)-square eigendecomposition instead of a d-square one (SmolLM2:
    144 against 192), solved and normalised by `_directions_from_rows` in `dtype`.
    """
    b, n = basis.to(dtype), new_rows.to(dtype)
    stacked = torch.cat([b * old_energies.to(dtype).sqrt().unsqueeze(-1), n], dim=1)  # [B, R + m, d]
    rows = _directions_from_rows(stacked, stacked @ stacked.mT, rank)                  # [B, r, d]
    top = rows.mT
    return Fold(rotation=(b @ top).float(), new_factors=(n @ top).float(), basis=rows.float())


def _fold_gram(old_gram: torch.Tensor, basis: torch.Tensor, directions: torch.Tensor,
               new_rows: torch.Tensor, rank: int, exact: bool) -> Fold:
    """The fold through Gram matrices: S = [basis; directions] enters at width d only in
    S S^T, in the new basis rows M^T S and in their Gram matrix.

    With Y = S^T and A = `_orthonormalizer(S S^T)`, Y A is an orthonormal frame; a row
    v has coordinates (v S^T) A in it, so the old tokens' Gram matrix there is
    A^T (S B^T) F^T F (B S^T) A and the new rows' (N S^T) A. Its top eigenvectors W
    give the new basis rows M^T S with M = A W, orthonormalised by one explicit
    CholeskyQR pass (M <- M A'), then the rotation B S^T M and the new factors N S^T M.
    `old_gram` is F^T F in float64 (see `_times_gram`).
    """
    stack = torch.cat([basis, directions], dim=1).double()                          # [B, k, d]
    stack_gram = stack @ stack.mT                                                     # [B, k, k]
    r_old = basis.shape[1]
    new_by_stack = stack_gram[:, r_old:] if directions is new_rows else new_rows.double() @ stack.mT
    frame = _orthonormalizer(stack_gram, passes=2)                                    # [B, k, k]
    basis_coords = stack_gram[:, :r_old] @ frame                                      # [B, R, k]
    new_coords = new_by_stack @ frame                                                 # [B, m, k]
    gram = basis_coords.mT @ _times_gram(old_gram, basis_coords) + new_coords.mT @ new_coords  # [B, k, k]
    vectors, energies = _top_eigenvectors(gram, min(rank, gram.shape[-1]), exact, EIGEN_STEPS_FOLD)
    coeffs = frame @ _drop_negligible(vectors, energies)                              # [B, k, r]
    rows = coeffs.mT @ stack                                                          # [B, r, d]
    fix = _orthonormalizer(rows @ rows.mT)
    coeffs = coeffs @ fix
    return Fold(rotation=(stack_gram[:, :r_old] @ coeffs).float(),
                new_factors=(new_by_stack @ coeffs).float(),
                basis=(fix.mT @ rows).float())


def fold(old_factors: torch.Tensor, basis: torch.Tensor, new_rows: torch.Tensor,
         rank: int, svd: SvdSettings = SvdSettings(), energy: float | None = None) -> Fold:
    """Re-factorise [old_factors @ basis; new_rows] at `rank` (one request; see `fold_batch`).

    old_factors: [n, R]; basis: [R, d] (orthonormal or zero rows); new_rows: [m, d].
    """
    result = fold_batch(old_factors[None], basis[None], new_rows[None], rank, svd, energy)
    return Fold(result.rotation[0], result.new_factors[0], result.basis[0])


# ---------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------

def per_head_reconstruction(x: torch.Tensor, num_heads: int, rank_per_head: int,
                            svd: SvdSettings = SvdSettings()) -> torch.Tensor:
    """Reconstruction of x [n, num_heads * head_size] factorised head by head.

    The alternative to concatenated heads, kept so that the two can be compared at
    equal bytes (see `stored_elements`). The heads are one batched call.
    """
    n = x.shape[0]
    heads = x.float().reshape(n, num_heads, -1).transpose(0, 1)        # [H, n, head_size]
    low = factorize_batch(heads, rank_per_head, svd)
    return (low.factors @ low.basis).transpose(0, 1).reshape(n, -1)


def stored_elements(num_tokens: int, width: int, rank: int, num_heads: int = 1) -> int:
    """Elements stored for a segment: factors plus basis, per head when num_heads > 1."""
    head_width = width // num_heads
    return num_heads * (num_tokens * rank + rank * head_width)


def directions_in_use(basis: torch.Tensor) -> torch.Tensor:
    """[...]: the nonzero rows of bases [..., rank, d] (padding, rank deficiency and the
    energy share leave the others zero)."""
    return (basis != 0).any(-1).sum(-1)


def relative_error(x: torch.Tensor, approx: torch.Tensor) -> float:
    """Frobenius-norm relative reconstruction error."""
    return float((x.float() - approx.float()).norm() / x.float().norm().clamp_min(1e-30))


def captured_energy(x: torch.Tensor, low: LowRank, columns: int | None = None) -> torch.Tensor:
    """1 - ||X - F[:, :c] B[:c]||^2 / ||X||^2 for x [..., n, d]: one value per matrix.

    `columns` (c) defaults to all of them; fewer is what a partial-rank group reads.
    """
    columns = low.factors.shape[-1] if columns is None else columns
    approx = low.factors[..., :columns].double() @ low.basis[..., :columns, :].double()
    x = x.double()
    return 1 - (x - approx).square().sum((-2, -1)) / x.square().sum((-2, -1)).clamp_min(1e-300)
