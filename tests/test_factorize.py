"""Factorisation and folding: every method against exact SVD, batching, padding, drift.

Methods and their stated tolerances (captured energy at the same rank, relative to
exact SVD): "gram" as accurate as exact (1e-5), "gram32" (float32) within 1e-5 too,
"randomized" within 0.5 %.
"""
import pytest
import torch

import attentionpack_vllm.factorize as fz
from attentionpack_vllm.config import SVD_METHODS
from attentionpack_vllm.factorize import (LowRank, SvdSettings, captured_energy, describe, directions_in_use,
                                          factorize, factorize_batch, fold, fold_batch, fold_batch_diagonal,
                                          per_head_reconstruction, relative_error, resolve_method,
                                          stored_elements)
from scenario import low_rank_rows

METHODS = ("exact", "gram", "gram32", "randomized")
FAST = ("gram", "gram32", "randomized")
# Captured energy at the same rank, as a share of exact SVD's, at least:
ENERGY_TOLERANCE = {"exact": 1e-6, "gram": 1e-5, "gram32": 1e-5, "randomized": 5e-3}


def reconstruct(low):
    return low.factors @ low.basis


def settings(method):
    return SvdSettings(method)


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------

def test_auto_resolves_per_device_and_methods_match_the_config():
    assert resolve_method("auto", "cpu") == "gram32"
    assert resolve_method("auto", torch.device("cuda")) == "randomized"   # no GPU needed
    for method in METHODS:
        assert resolve_method(method, "cuda") == method == resolve_method(method, "cpu")
    assert set(SVD_METHODS) == set(fz.METHODS)
    assert SvdSettings().method == "auto"


def test_bad_method_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match="'svd' = 'qr'.*expected one of"):
        SvdSettings("qr")
    with pytest.raises(ValueError, match="'svd' = 'lapack'"):
        resolve_method("lapack", "cpu")
    with pytest.raises(ValueError, match="'svd_power_iters' = -1"):
        SvdSettings("randomized", 8, -1)


def test_describe_names_the_resolved_method():
    assert describe(SvdSettings(), "cpu") == "svd=auto on cpu: gram32 (float32 Gram matrix + torch.linalg.eigh)"
    assert describe(SvdSettings("gram"), "cpu") == "svd=gram on cpu: gram (float64 Gram matrix + torch.linalg.eigh)"
    text = describe(SvdSettings("auto", 16, 2), "cuda")
    assert text.startswith("svd=auto on cuda: randomized (")
    assert "16 columns" in text and "2 power iterations" in text
    assert describe(SvdSettings("exact"), "cpu") == "svd=exact on cpu: exact (torch.linalg.svd)"


def test_randomized_calls_no_small_decomposition(monkeypatch):
    """The GPU path: matrix products, Cholesky, triangular solves, elementwise ops only."""
    def refuse(*args, **kwargs):
        raise AssertionError("randomized called a cuSOLVER-style decomposition")

    for name in ("svd", "eigh", "qr", "svdvals", "eigvalsh"):
        monkeypatch.setattr(torch.linalg, name, refuse)
    monkeypatch.setattr(torch, "svd_lowrank", refuse)
    gen = torch.Generator().manual_seed(0)
    x = low_rank_rows(200, 96, 12, gen, noise=0.05).expand(2, -1, -1)
    low = factorize_batch(x, 16, settings("randomized"))
    fold_batch(low.factors, low.basis, torch.randn(2, 40, 96, generator=gen), 16, settings("randomized"))
    factorize_batch(x[:, :10], 16, settings("randomized"))   # the small-side branch


# ---------------------------------------------------------------------------
# Factorisation against exact SVD
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_error_falls_as_rank_rises(method):
    gen = torch.Generator().manual_seed(0)
    x = low_rank_rows(300, 128, 24, gen, noise=0.05)
    errors = [relative_error(x, reconstruct(factorize(x, r, settings(method)))) for r in (4, 8, 16, 24, 48, 128)]
    assert all(a >= b - 1e-6 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.3 and errors[3] < 0.1 and errors[-1] < 1e-5


def decaying_rows(num_tokens, width, rank, gen, noise):
    """Rank-`rank` rows whose singular values fall geometrically (100x over the rank), plus noise."""
    scales = torch.logspace(0, -2, rank)
    rows = (torch.randn(num_tokens, rank, generator=gen) * scales) @ torch.randn(rank, width, generator=gen)
    return rows + noise * torch.randn(num_tokens, width, generator=gen)


def assert_fewest_directions_reach(x, low, target):
    """captured energy >= target, and dropping the weakest kept direction falls below it."""
    got = captured_energy(x, low)
    assert bool((got >= target - 1e-9).all()), (got, target)
    weakest = low.factors.double().square().sum(-2).masked_fill(low.basis.abs().sum(-1) == 0, float("inf"))
    drop = weakest.argmin(-1)
    keep = torch.ones_like(weakest, dtype=torch.bool).scatter(-1, drop[..., None], False)
    fewer = LowRank(low.factors * keep.unsqueeze(-2), low.basis * keep.unsqueeze(-1))
    assert bool((captured_energy(x, fewer) < target).all())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("target", [0.5, 0.9, 0.99])
def test_energy_rank_reaches_its_target_with_the_fewest_directions(method, target):
    gen = torch.Generator().manual_seed(11)
    # Three requests with different spectra (and one padded): each gets its own rank.
    x = torch.stack([decaying_rows(60, 48, 24, gen, noise=0.0), decaying_rows(60, 48, 40, gen, noise=0.01),
                     torch.cat([low_rank_rows(30, 48, 6, gen), torch.zeros(30, 48)])])
    low = factorize_batch(x, 32, settings(method), energy=target)
    assert_fewest_directions_reach(x, low, target)
    full = factorize_batch(x, 32, settings(method))
    kept = directions_in_use(low.basis)
    assert bool((kept <= directions_in_use(full.basis)).all()) and len(set(kept.tolist())) > 1, kept
    # The kept directions are the full factorisation's leading ones, unchanged.
    torch.testing.assert_close(low.basis, full.basis * (low.basis.abs().sum(-1, keepdim=True) > 0))


def test_energy_rank_is_capped_by_the_rank():
    x = torch.randn(50, 40, generator=torch.Generator().manual_seed(12))   # flat spectrum
    low = factorize(x, 8, energy=0.99)
    assert int(directions_in_use(low.basis)) == 8
    assert float(captured_energy(x, low)) < 0.99


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("target", [0.8, 0.95])
def test_fold_with_energy_reaches_its_target_on_the_combined_data(method, target):
    gen = torch.Generator().manual_seed(13)
    old = torch.stack([decaying_rows(70, 48, 30, gen, noise=0.01), decaying_rows(70, 48, 12, gen, noise=0.0)])
    new = torch.stack([decaying_rows(9, 48, 30, gen, noise=0.01), decaying_rows(9, 48, 30, gen, noise=0.01)])
    low = factorize_batch(old, 24, settings(method))
    result = fold_batch(low.factors, low.basis, new, 24, settings(method), energy=target)
    combined = torch.cat([low.factors @ low.basis, new], dim=1)
    folded = LowRank(torch.cat([low.factors @ result.rotation, result.new_factors], dim=1), result.basis)
    assert_fewest_directions_reach(combined, folded, target)


def test_energy_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="energy must be in"):
        factorize(torch.randn(4, 8), 2, energy=0.0)


@pytest.mark.parametrize("method", FAST)
@pytest.mark.parametrize("rank", [8, 24, 40])
def test_energy_matches_exact_on_low_rank_plus_noise(method, rank):
    gen = torch.Generator().manual_seed(1)
    x = torch.stack([decaying_rows(400, 256, 32, gen, noise=0.02) for _ in range(3)])
    exact = captured_energy(x, factorize_batch(x, rank, settings("exact")))
    fast = captured_energy(x, factorize_batch(x, rank, settings(method)))
    assert (fast >= exact * (1 - ENERGY_TOLERANCE[method])).all(), (fast, exact)
    assert (fast <= exact + 1e-6).all()


def test_reorthonormalising_nearly_orthonormal_columns_in_float32():
    """gram32's last pass: columns off orthonormal by round-off (and a zero column, a dropped
    direction) come back as orthonormal rows spanning the same columns, the zero one zero."""
    gen = torch.Generator().manual_seed(3)
    q = torch.linalg.qr(torch.randn(2, 192, 8, generator=gen, dtype=torch.float64))[0]
    noisy = (q + 1e-4 * torch.randn(q.shape, generator=gen, dtype=torch.float64)).float()
    noisy[1, :, 5] = 0
    rows = fz._reorthonormalize_rows(noisy)                                        # [2, 8, 192]
    assert rows.shape == (2, 8, 192) and rows.is_contiguous()
    assert (noisy.mT @ noisy - torch.eye(8)).abs().amax() > 1e-4                   # it had work to do
    kept = torch.ones(2, 8)
    kept[1, 5] = 0
    torch.testing.assert_close(rows @ rows.mT, torch.diag_embed(kept), atol=2e-6, rtol=0)
    assert rows[1, 5].abs().amax() == 0
    # In order (CholeskyQR): column j lies in the span of input columns 0..j.
    coords = rows.double() @ q                                                     # [2, 8, 8]
    assert coords.tril(-1).abs().amax() < 1e-3 and coords.triu(1).abs().amax() < 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_basis_rows_are_orthonormal_and_factors_carry_singular_values(method):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 32, generator=gen)
    low = factorize(x, 10, settings(method))
    torch.testing.assert_close(low.basis @ low.basis.T, torch.eye(10), atol=1e-5, rtol=0)
    s = torch.linalg.svdvals(x)[:10]
    tol = 1e-4 if method != "randomized" else 2e-2
    torch.testing.assert_close(low.factors.norm(dim=0), s, atol=tol, rtol=tol)


@pytest.mark.parametrize("method", METHODS)
def test_segment_shorter_than_rank_is_exact_and_padded(method):
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    low = factorize(x, 16, settings(method))
    assert low.factors.shape == (5, 16) and low.basis.shape == (16, 64)
    torch.testing.assert_close(reconstruct(low), x, atol=1e-5, rtol=1e-5)
    assert low.basis[5:].abs().max() == 0


@pytest.mark.parametrize("method", METHODS)
def test_padded_batch_short_and_rank_deficient_requests(method):
    """Zero rows are padding: short and rank-deficient requests are exact, all-zero ones stay zero."""
    gen = torch.Generator().manual_seed(3)
    n, width, rank = 120, 96, 24
    x = torch.zeros(4, n, width)
    x[0, :7] = torch.randn(7, width, generator=gen)                        # 7 valid rows
    x[1, :100] = low_rank_rows(100, width, 3, gen)                          # rank 3
    x[2] = low_rank_rows(n, width, 40, gen, noise=0.05)                     # full request
    # x[3] stays all zero
    low = factorize_batch(x, rank, settings(method))
    assert low.factors.shape == (4, n, rank) and low.basis.shape == (4, rank, width)
    assert torch.isfinite(low.factors).all() and torch.isfinite(low.basis).all()
    rec = reconstruct(low)
    torch.testing.assert_close(rec[:2], x[:2], atol=2e-5, rtol=1e-4)
    assert low.factors[0, 7:].abs().max() == 0 and low.factors[1, 100:].abs().max() == 0
    assert low.basis[0, 7:].abs().max() == 0 and low.basis[1, 3:].abs().max() == 0
    assert low.basis[3].abs().max() == 0 and low.factors[3].abs().max() == 0
    for b, valid in ((0, 7), (1, 3), (2, rank)):
        gram = low.basis[b, :valid] @ low.basis[b, :valid].T
        torch.testing.assert_close(gram, torch.eye(valid), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_per_request_and_padding_changes_nothing(method):
    gen = torch.Generator().manual_seed(4)
    lengths, n, width, rank = (150, 90, 130), 160, 64, 12
    rows = [low_rank_rows(t, width, 20, gen, noise=0.05) for t in lengths]
    x = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, n - r.shape[0])) for r in rows])
    batched = factorize_batch(x, rank, settings(method))
    for b, r in enumerate(rows):
        alone = factorize(x[b], rank, settings(method))
        torch.testing.assert_close(reconstruct(batched)[b], reconstruct(alone), atol=1e-4, rtol=1e-4)
        # The unpadded request (the same branch: more rows than rank + oversample).
        unpadded = reconstruct(factorize(r, rank, settings(method)))
        torch.testing.assert_close(reconstruct(batched)[b, :r.shape[0]], unpadded, atol=1e-4, rtol=1e-4)


def test_modality_separation_beats_joint_at_equal_bytes():
    gen = torch.Generator().manual_seed(3)
    width, rank = 128, 8
    image = low_rank_rows(400, width, rank, gen, noise=0.01) * 3.0   # distinct subspaces, scales
    text = low_rank_rows(200, width, rank, gen, noise=0.01)
    x = torch.cat([image, text])
    separate = torch.cat([reconstruct(factorize(image, rank)), reconstruct(factorize(text, rank))])
    separate_bytes = stored_elements(400, width, rank) + stored_elements(200, width, rank)
    joint_rank = separate_bytes // (x.shape[0] + width)
    assert stored_elements(600, width, joint_rank) <= separate_bytes
    joint = reconstruct(factorize(x, joint_rank))
    err_sep, err_joint = relative_error(x, separate), relative_error(x, joint)
    assert err_sep < 0.05 and err_joint > 3 * err_sep, (err_sep, err_joint)


def test_concatenated_heads_versus_per_head_at_equal_bytes():
    gen = torch.Generator().manual_seed(4)
    num_heads, head_size, rank = 4, 32, 8
    x = low_rank_rows(256, num_heads * head_size, rank, gen, noise=0.01)  # structure shared by heads
    concat = reconstruct(factorize(x, rank))
    per_head_rank = rank // num_heads
    per_head = per_head_reconstruction(x, num_heads, per_head_rank)
    assert stored_elements(256, 128, per_head_rank, num_heads) <= stored_elements(256, 128, rank)
    assert relative_error(x, concat) < 0.05 < relative_error(x, per_head)
    # Both are exact at full rank.
    assert relative_error(x, per_head_reconstruction(x, num_heads, head_size)) < 1e-5


# ---------------------------------------------------------------------------
# Folding
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_fold_at_full_rank_is_exact_and_rotates_old_factors(method):
    gen = torch.Generator().manual_seed(5)
    old, new = torch.randn(30, 48, generator=gen), torch.randn(7, 48, generator=gen)
    low = factorize(old, 48, settings(method))
    result = fold(low.factors, low.basis, new, 48, settings(method))
    torch.testing.assert_close((low.factors @ result.rotation) @ result.basis, old, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.new_factors @ result.basis, new, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("num_new", [4, 40])
def test_fold_preserves_old_reconstruction_up_to_truncation_error(method, num_new):
    gen = torch.Generator().manual_seed(6)
    rank, width = 12, 64
    old = low_rank_rows(80, width, 10, gen, noise=0.02)
    new = low_rank_rows(num_new, width, 10, gen, noise=0.02)
    low = factorize(old, rank, settings(method))
    before = reconstruct(low)
    result = fold(low.factors, low.basis, new, rank, settings(method))
    after = (low.factors @ result.rotation) @ result.basis
    new_after = result.new_factors @ result.basis
    # What truncating [old reconstruction; new] to `rank` must lose at best.
    stacked = torch.cat([before, new])
    best = torch.linalg.svdvals(stacked)[rank:].square().sum().sqrt()
    lost = torch.cat([before - after, new - new_after]).norm()
    assert lost <= best * 1.05 + 1e-4, (float(lost), float(best))
    assert (before - after).norm() <= best * 1.05 + 1e-4
    torch.testing.assert_close(result.basis @ result.basis.T, torch.eye(rank), atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_fold_into_empty_basis_is_plain_factorisation(method):
    x = decaying_rows(20, 32, 12, torch.Generator().manual_seed(7), noise=0.0)
    result = fold(torch.zeros(0, 8), torch.zeros(8, 32), x, 8, settings(method))
    ref = factorize(x, 8, settings("exact"))
    tol = 1e-4 if method != "randomized" else 1e-3
    torch.testing.assert_close(result.new_factors @ result.basis, reconstruct(ref), atol=tol, rtol=tol)


def _combined_rank_fits_batch(gen, width=80, rank=24):
    """Three padded fold requests whose old + new data have rank <= `rank`."""
    t_max, m_max = 60, 10
    old_f, bases, new = torch.zeros(3, t_max, rank), torch.zeros(3, rank, width), torch.zeros(3, m_max, width)
    truth_old, truth_new = [], []
    # 0: old rank 10 (basis has zero rows), new rows bring 8 directions of their own.
    # 1: new rows inside the old span.  2: no old tokens at all.
    for b, (t, old_rank, m, new_dirs) in enumerate(((50, 10, 8, 8), (60, 16, 10, 0), (0, 0, 9, 9))):
        shared = torch.randn(old_rank + new_dirs, width, generator=gen)
        old = torch.randn(t, old_rank, generator=gen) @ shared[:old_rank] if old_rank else torch.zeros(t, width)
        coeffs = torch.randn(m, old_rank + new_dirs, generator=gen)
        rows = coeffs @ shared
        low = factorize(old, rank, settings("exact"))
        old_f[b, :t], bases[b], new[b, :m] = low.factors, low.basis, rows
        truth_old.append(old)
        truth_new.append(rows)
    return old_f, bases, new, truth_old, truth_new


@pytest.mark.parametrize("method", METHODS)
def test_fold_is_exact_when_combined_rank_fits(method):
    gen = torch.Generator().manual_seed(8)
    old_f, bases, new, truth_old, truth_new = _combined_rank_fits_batch(gen)
    result = fold_batch(old_f, bases, new, 24, settings(method))
    assert torch.isfinite(result.basis).all() and torch.isfinite(result.rotation).all()
    for b in range(3):
        t, m = truth_old[b].shape[0], truth_new[b].shape[0]
        old_after = (old_f[b] @ result.rotation[b]) @ result.basis[b]
        torch.testing.assert_close(old_after[:t], truth_old[b], atol=1e-3, rtol=1e-4)
        assert (old_after[t:] == 0).all()                         # padding stays zero
        new_after = result.new_factors[b] @ result.basis[b]
        torch.testing.assert_close(new_after[:m], truth_new[b], atol=1e-3, rtol=1e-4)
        assert (result.new_factors[b, m:] == 0).all()
        valid = int((result.basis[b].norm(dim=1) > 0).sum())
        torch.testing.assert_close(result.basis[b, :valid] @ result.basis[b, :valid].T, torch.eye(valid),
                                   atol=1e-5, rtol=0)
    assert int((result.basis[1].norm(dim=1) > 0).sum()) == 16   # no direction was invented


@pytest.mark.parametrize("method", METHODS)
def test_fold_batched_equals_per_request(method):
    gen = torch.Generator().manual_seed(9)
    rank, width = 16, 72
    lows, news = [], []
    for t, m in ((90, 20), (40, 5), (70, 32)):
        lows.append(factorize(low_rank_rows(t, width, 24, gen, noise=0.05), rank))
        news.append(low_rank_rows(m, width, 24, gen, noise=0.05))
    pad = lambda t, rows: torch.nn.functional.pad(t, (0, 0, 0, rows - t.shape[0]))  # noqa: E731
    old_f, new = torch.stack([pad(lo.factors, 90) for lo in lows]), torch.stack([pad(n, 32) for n in news])
    result = fold_batch(old_f, torch.stack([lo.basis for lo in lows]), new, rank, settings(method))
    for b, (lo, n) in enumerate(zip(lows, news)):
        # The same request alone, with the batch's padding: nothing crosses between requests.
        alone = fold(old_f[b], lo.basis, new[b], rank, settings(method))
        for got, want in ((result.rotation[b], alone.rotation), (result.new_factors[b], alone.new_factors),
                          (result.basis[b], alone.basis)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # Unpadded: the same result up to round-off for the exact-accuracy methods; for
        # "randomized" a window longer than the rank is first cut to its top directions,
        # which a different padding may pick differently, so only its energy is compared.
        unpadded = fold(lo.factors, lo.basis, n, rank, settings(method))
        data = torch.cat([reconstruct(lo), n])
        padded_rec = torch.cat([(lo.factors @ result.rotation[b]), result.new_factors[b, :n.shape[0]]])
        unpadded_rec = torch.cat([(lo.factors @ unpadded.rotation), unpadded.new_factors])
        if method != "randomized":
            torch.testing.assert_close(padded_rec @ result.basis[b], unpadded_rec @ unpadded.basis,
                                       atol=1e-4, rtol=1e-4)
        energy = lambda f, basis: captured_energy(data, LowRank(f, basis))  # noqa: E731
        assert energy(padded_rec, result.basis[b]) >= energy(unpadded_rec, unpadded.basis) * (1 - 5e-3)


@pytest.mark.parametrize("method", FAST)
def test_fold_energy_matches_exact_fold(method):
    gen = torch.Generator().manual_seed(10)
    rank, width = 32, 128
    old = torch.stack([low_rank_rows(200, width, 48, gen, noise=0.1) for _ in range(4)])
    new = torch.stack([low_rank_rows(32, width, 48, gen, noise=0.1) * s for s in (0.3, 1.0, 3.0, 10.0)])
    low = factorize_batch(old, rank, settings("exact"))
    data = torch.cat([reconstruct(low), new], dim=1)

    def energy(result):
        folded = LowRank(torch.cat([low.factors @ result.rotation, result.new_factors], 1), result.basis)
        return captured_energy(data, folded)

    exact = energy(fold_batch(low.factors, low.basis, new, rank, settings("exact")))
    fast = energy(fold_batch(low.factors, low.basis, new, rank, settings(method)))
    assert (fast >= exact * (1 - ENERGY_TOLERANCE[method])).all(), (fast, exact)


@pytest.mark.parametrize("method", METHODS)
def test_fold_reorthonormalises_a_half_precision_basis(method):
    gen = torch.Generator().manual_seed(11)
    rank, width = 16, 256
    low = factorize(low_rank_rows(100, width, 12, gen, noise=0.0), rank)
    basis16 = low.basis.half().float()                     # what a float16 slot pool returns
    old = low.factors @ basis16
    new = low_rank_rows(3, width, 2, gen)
    result = fold(low.factors, basis16, new, rank, settings(method))
    valid = 12 + 2                                         # old rank + the new rows' own directions
    assert (result.basis[valid:] == 0).all()
    torch.testing.assert_close(result.basis[:valid] @ result.basis[:valid].T, torch.eye(valid),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close((low.factors @ result.rotation) @ result.basis, old, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.new_factors @ result.basis, new, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("route", ["width", "frame"])
def test_gram_fold_routes_match_exact(monkeypatch, route):
    """"gram" folds through the d-square covariance at narrow widths and through the
    (rank + window)-square frame otherwise; forced either way, each equals "exact" on
    padded, rank-deficient and half-precision-basis requests."""
    monkeypatch.setattr(fz, "WIDTH_FOLD_MAX_RATIO", 1e9 if route == "width" else 0.0)
    gen = torch.Generator().manual_seed(12)
    old_f, bases, new, truth_old, truth_new = _combined_rank_fits_batch(gen)
    cases = [(old_f, bases.half().float(), new, 24)]   # a basis not orthonormal to round-off
    rank, width = 16, 72
    low = factorize_batch(torch.stack([low_rank_rows(90, width, 24, gen, noise=0.05) for _ in range(3)]), rank)
    cases.append((low.factors, low.basis, torch.stack([low_rank_rows(20, width, 24, gen, noise=0.05)
                                                       for _ in range(3)]), rank))
    for i, (old, basis, rows, r) in enumerate(cases):
        data = torch.cat([old @ basis, rows], dim=1)
        got, want = (fold_batch(old, basis, rows, r, settings(m)) for m in ("gram", "exact"))
        rec = lambda f: torch.cat([old @ f.rotation, f.new_factors], 1) @ f.basis  # noqa: E731
        if i == 0:  # the combined data fits the rank: both reproduce it
            torch.testing.assert_close(rec(got), rec(want), atol=1e-4, rtol=1e-4)
        # More new rows than the rank: the frame keeps only their top `rank` directions
        # first, the width route all of them, so it may only do better.
        assert (rec(got) - data).norm() <= (rec(want) - data).norm() * (1 + 1e-5) + 1e-5
        valid = directions_in_use(got.basis)
        for b in range(basis.shape[0]):
            n = int(valid[b])
            torch.testing.assert_close(got.basis[b, :n] @ got.basis[b, :n].T, torch.eye(n), atol=1e-5, rtol=0)
            assert (got.basis[b, n:] == 0).all()
    # New rows inside the old span (request 1): no direction is invented.
    assert int(directions_in_use(fold_batch(old_f, bases, new, 24, settings("gram")).basis)[1]) == 16


def test_gram_fold_picks_the_width_route_only_for_narrow_widths(monkeypatch):
    routes = []
    for name in ("_fold_width", "_fold_gram"):
        original = getattr(fz, name)
        monkeypatch.setattr(fz, name, lambda *a, _f=original, _n=name, **k: routes.append(_n) or _f(*a, **k))
    gen = torch.Generator().manual_seed(13)
    for width, expected in ((192, "_fold_width"), (512, "_fold_gram")):   # frame: 80 + 64 rows
        low = factorize_batch(torch.randn(2, 200, width, generator=gen), 80)
        fold_batch(low.factors, low.basis, torch.randn(2, 64, width, generator=gen), 80, settings("gram"))
        assert routes[-1] == expected, (width, routes)


# ---------------------------------------------------------------------------
# Real keys and values: SmolLM2-135M-Instruct (30 layers, KV width 192)
# ---------------------------------------------------------------------------

PREFILL, WINDOW, FOLDS = 256, 32, 5


@pytest.fixture(scope="module")
def smollm2_kv(request):
    """[60, 416, 192]: post-RoPE keys and values (heads concatenated) of all 30 layers,
    416 tokens of the Python reference's "Execution model" chapter."""
    from attentionpack_vllm import models
    try:
        path = models.convert_smollm2(models.default_models_dir() / "smollm2-135m-instruct")
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"SmolLM2 is unavailable here: {exc}")
    import pydoc_data.topics as topics
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer(topics.topics["execmodel"]).input_ids[:PREFILL + WINDOW * FOLDS]
    with torch.inference_mode():
        cache = model(input_ids=torch.tensor(ids)[None], use_cache=True, logits_to_keep=1).past_key_values
    # The cache holds keys after RoPE, as vLLM hands them to the backend.
    flat = lambda t: t[0].transpose(0, 1).reshape(t.shape[2], -1)  # noqa: E731  [1,H,T,D] -> [T, H*D]
    kv = [flat(t) for layer in cache.layers for t in (layer.keys, layer.values)]
    return torch.stack(kv).float()


@pytest.fixture(scope="module")
def smollm2_exact(smollm2_kv):
    """Exact rank-64 SVD of the whole sample (the oracle, computed once)."""
    return factorize_batch(smollm2_kv, 64, settings("exact"))


@pytest.mark.parametrize("method", FAST)
def test_energy_matches_exact_on_smollm2_kv(smollm2_kv, smollm2_exact, method):
    """Rank 64 on every layer's keys and values: within the method's tolerance of exact."""
    x = smollm2_kv
    low = factorize_batch(x, 64, settings(method))
    exact, fast = captured_energy(x, smollm2_exact), captured_energy(x, low)
    assert (fast >= exact * (1 - ENERGY_TOLERANCE[method])).all(), (fast / exact).min()
    # What a partial-rank group reads (the first quarter of the columns) is ordered too.
    exact16, fast16 = captured_energy(x, smollm2_exact, 16), captured_energy(x, low, 16)
    assert (fast16 >= exact16 * (1 - 2 * ENERGY_TOLERANCE[method])).all(), (fast16 / exact16).min()


@pytest.mark.parametrize("method", METHODS)
def test_five_folds_stay_within_ten_percent_of_a_fresh_svd_on_smollm2_kv(smollm2_kv, smollm2_exact, method):
    """Prefill 256 tokens at rank 64, fold five 32-token windows in: the error over all
    416 tokens stays within 1.1x a fresh SVD of the same 416 tokens at rank 64."""
    x, rank = smollm2_kv, 64
    low = factorize_batch(x[:, :PREFILL], rank, settings(method))
    factors, basis = low.factors, low.basis
    for start in range(PREFILL, PREFILL + WINDOW * FOLDS, WINDOW):
        result = fold_batch(factors, basis, x[:, start:start + WINDOW], rank, settings(method))
        factors = torch.cat([factors @ result.rotation, result.new_factors], dim=1)
        basis = result.basis
    folded = 1 - captured_energy(x, LowRank(factors, basis))
    fresh = 1 - captured_energy(x, smollm2_exact)
    ratio = (folded / fresh).sqrt()                # relative Frobenius errors
    assert ratio.max() <= 1.1, ratio.max()


@pytest.mark.parametrize("method", ["exact", "gram", "gram32"])
@pytest.mark.parametrize("width", [72, 32], ids=["stacked", "width"])
@pytest.mark.parametrize("energy", [None, 0.9])
def test_a_fold_of_factorised_rows_needs_only_the_gram_diagonal(width, energy, method):
    """Factors that a factorisation or an earlier fold produced have a diagonal Gram matrix, so
    the fold from its diagonal (`fold_batch_diagonal`: through the stacked rows' Gram matrix when
    they are fewer than the width, else the width-square covariance) is as good as "exact" on
    the factors themselves; on factors whose Gram matrix is not diagonal it is not (the
    diagonal is the caller's promise, not a guess)."""
    gen = torch.Generator().manual_seed(4)
    rank = 16
    first = factorize_batch(torch.stack([low_rank_rows(90, width, 24, gen, noise=0.05) for _ in range(3)]), rank)
    new = torch.stack([low_rank_rows(20, width, 24, gen, noise=0.05) for _ in range(3)])
    once = fold_batch_diagonal(first.factors.square().sum(-2), first.basis, new, rank, settings("gram"))
    again_rows = torch.stack([low_rank_rows(12, width, 24, gen, noise=0.05) for _ in range(3)])
    old = torch.cat([first.factors @ once.rotation, once.new_factors], dim=1)   # the fold's own output
    for factors, basis, rows in ((first.factors, first.basis, new), (old, once.basis, again_rows)):
        gram = factors.double().mT @ factors.double()
        off = gram - torch.diag_embed(gram.diagonal(dim1=-2, dim2=-1))
        assert off.abs().max() <= 1e-5 * gram.abs().max()
        data = torch.cat([factors @ basis, rows], dim=1)
        diagonal = fold_batch_diagonal(factors.square().sum(-2), basis, rows, rank, settings(method), energy)
        best = fold_batch(factors, basis, rows, rank, settings("exact"), energy)
        rec = lambda f: torch.cat([factors @ f.rotation, f.new_factors], 1) @ f.basis  # noqa: E731
        error = lambda f: (rec(f) - data).norm(dim=(-2, -1))  # noqa: E731
        assert (error(diagonal) <= error(best) * (1 + 1e-4) + 1e-5).all(), (error(diagonal), error(best))
        valid = directions_in_use(diagonal.basis)
        for b in range(3):
            n = int(valid[b])
            torch.testing.assert_close(diagonal.basis[b, :n] @ diagonal.basis[b, :n].T, torch.eye(n), atol=1e-5, rtol=0)
    # Mixed factors (a random rotation of the columns) are not diagonal: the promise matters.
    mixed = first.factors @ torch.linalg.qr(torch.randn(rank, rank, generator=gen))[0]
    mixed_basis = torch.linalg.qr(torch.randn(rank, rank, generator=gen))[0].T @ first.basis
    data = torch.cat([mixed @ mixed_basis, new], dim=1)
    diagonal = fold_batch_diagonal(mixed.square().sum(-2), mixed_basis, new, 8, settings("gram"))
    best = fold_batch(mixed, mixed_basis, new, 8, settings("exact"))
    rec = lambda f: torch.cat([mixed @ f.rotation, f.new_factors], 1) @ f.basis  # noqa: E731
    assert ((rec(diagonal) - data).norm() > (rec(best) - data).norm() * 1.01)
