"""Factorisation, modality separation, concatenated vs per-head, and folding new rows in."""
import pytest
import torch

from attentionpack_vllm.factorize import (SvdSettings, factorize, fold, per_head_reconstruction,
                                          relative_error, stored_elements)
from scenario import low_rank_rows


def reconstruct(low):
    return low.factors @ low.basis


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_error_falls_as_rank_rises(method):
    gen = torch.Generator().manual_seed(0)
    x = low_rank_rows(300, 128, 24, gen, noise=0.05)
    errors = [relative_error(x, reconstruct(factorize(x, r, SvdSettings(method)))) for r in (4, 8, 16, 24, 48, 128)]
    assert all(a >= b - 1e-6 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.3 and errors[3] < 0.1 and errors[-1] < 1e-5


def test_basis_rows_are_orthonormal_and_factors_carry_singular_values():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 32, generator=gen)
    low = factorize(x, 10)
    torch.testing.assert_close(low.basis @ low.basis.T, torch.eye(10), atol=1e-5, rtol=0)
    s = torch.linalg.svdvals(x)[:10]
    torch.testing.assert_close(low.factors.norm(dim=0), s, atol=1e-4, rtol=1e-4)


def test_segment_shorter_than_rank_is_exact_and_padded():
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    low = factorize(x, 16)
    assert low.factors.shape == (5, 16) and low.basis.shape == (16, 64)
    torch.testing.assert_close(reconstruct(low), x, atol=1e-5, rtol=1e-5)
    assert low.basis[5:].abs().max() == 0


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


def test_fold_at_full_rank_is_exact_and_rotates_old_factors():
    gen = torch.Generator().manual_seed(5)
    old, new = torch.randn(30, 48, generator=gen), torch.randn(7, 48, generator=gen)
    low = factorize(old, 48)
    result = fold(low.factors, low.basis, new, 48)
    torch.testing.assert_close((low.factors @ result.rotation) @ result.basis, old, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.new_factors @ result.basis, new, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_new", [4, 40])
def test_fold_preserves_old_reconstruction_up_to_truncation_error(num_new):
    gen = torch.Generator().manual_seed(6)
    rank, width = 12, 64
    old = low_rank_rows(80, width, 10, gen, noise=0.02)
    new = low_rank_rows(num_new, width, 10, gen, noise=0.02)
    low = factorize(old, rank)
    before = reconstruct(low)
    result = fold(low.factors, low.basis, new, rank)
    after = (low.factors @ result.rotation) @ result.basis
    new_after = result.new_factors @ result.basis
    # What truncating [old reconstruction; new] to `rank` must lose at best.
    stacked = torch.cat([before, new])
    best = torch.linalg.svdvals(stacked)[rank:].square().sum().sqrt()
    lost = torch.cat([before - after, new - new_after]).norm()
    assert lost <= best * 1.05 + 1e-4, (float(lost), float(best))
    assert (before - after).norm() <= best * 1.05 + 1e-4
    torch.testing.assert_close(result.basis @ result.basis.T, torch.eye(rank), atol=1e-4, rtol=0)


def test_fold_into_empty_basis_is_plain_factorisation():
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(7))
    result = fold(torch.zeros(0, 8), torch.zeros(8, 32), x, 8)
    ref = factorize(x, 8)
    torch.testing.assert_close(result.new_factors @ result.basis, reconstruct(ref), atol=1e-4, rtol=1e-4)
