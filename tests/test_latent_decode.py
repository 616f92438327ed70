"""Latent-space decode against dense attention (full rank) and the naive oracle (partial rank)."""
import os

import pytest
import torch

from attentionpack_vllm.config import AttentionPackConfig
from attentionpack_vllm.kernels.latent_decode_torch import latent_decode_attention
from attentionpack_vllm.kernels.latent_decode_triton import latent_decode_attention_triton
from attentionpack_vllm.kernels.reference import dense_attention, reconstruct_request_kv
from attentionpack_vllm.kernels.slot_rows import ZERO_ROW
from scenario import SIXTEEN_BIT, attend_now, build_scenario, run_decode

# (num_heads, num_kv_heads, head_size): MHA and GQA, several head sizes.
GEOMETRIES = [(4, 4, 16), (4, 2, 32), (8, 2, 64), (6, 3, 32)]


# Full rank against dense: float64 folds ("gram") are exact to float32 round-off; float32
# folds ("gram32", the CPU default) add about 1e-6 per fold, which runs of folds accumulate.
FULL_RANK_TOLERANCE = {"gram": 1e-4, "gram32": 1e-3}


def full_rank_config(width: int, window: int, svd: str = "gram", **extra) -> AttentionPackConfig:
    return AttentionPackConfig.from_dict(
        {**SIXTEEN_BIT, "rank": width, "partial_rank_values": False, "window_size": window, "svd": svd, **extra})


@pytest.mark.parametrize("svd", sorted(FULL_RANK_TOLERANCE))
@pytest.mark.parametrize("num_heads,num_kv_heads,head_size", GEOMETRIES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("with_images", [False, True])
def test_full_rank_equals_dense_across_folds(num_heads, num_kv_heads, head_size, block_size, with_images, svd):
    width = num_kv_heads * head_size
    window = 4
    prompt_lens = [37, 5, 64, 18]  # ragged; not multiples of the block size
    spans = [[(3, 20)], [], [(0, 15), (40, 47)], [(17, 17)]] if with_images else None
    sc = build_scenario(full_rank_config(width, window, svd), num_kv_heads=num_kv_heads, head_size=head_size,
                        prompt_lens=prompt_lens, image_spans=spans, block_size=block_size,
                        max_new_tokens=3 * window + 2, pages_fill=float("nan"))
    tol = FULL_RANK_TOLERANCE[svd]
    for out, dense in run_decode(sc, num_heads, steps=3 * window + 2):  # three folds, then a partial window
        torch.testing.assert_close(out, dense, rtol=tol, atol=tol)
    assert sc.window_lens() == [2] * 4


def test_every_token_in_top_group_equals_full_rank():
    geometry = dict(num_kv_heads=2, head_size=32)
    base = {"rank": 24, "window_size": 8}
    full = build_scenario(AttentionPackConfig.from_dict({**SIXTEEN_BIT, **base, "partial_rank_values": False}),
                          prompt_lens=[40, 23], image_spans=[[(2, 12)], []], **geometry)
    top = build_scenario(AttentionPackConfig.from_dict(
        {**SIXTEEN_BIT, **base, "partial_rank_values": True, "partial_rank_keys": True,
         "group_fractions": [1.0, 0.0], "group_rank_scales": [1.0, 0.25]}),
        prompt_lens=[40, 23], image_spans=[[(2, 12)], []], **geometry)
    for (a, _), (b, _) in zip(run_decode(full, 4, 12, oracle=False), run_decode(top, 4, 12, oracle=False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("partial_keys", [False, True])
def test_partial_rank_equals_oracle_on_truncated_factors(partial_keys):
    config = AttentionPackConfig.from_dict(
        {**SIXTEEN_BIT, "rank": 16, "window_size": 6, "partial_rank_keys": partial_keys, "partial_rank_values": True,
         "group_fractions": [0.25, 0.5, 0.25], "group_rank_scales": [1.0, 0.5, 0.25]})
    sc = build_scenario(config, num_kv_heads=2, head_size=32, prompt_lens=[50, 9, 33],
                        image_spans=[[(5, 30)], [], [(0, 3)]], block_size=16)
    group_cols_k, group_cols_v = sc.plan.group_cols_tensors()
    gen = torch.Generator().manual_seed(5)
    for out, _ in run_decode(sc, 4, steps=8, oracle=False):
        pass  # groups get assigned from importance by the decode steps
    q = torch.randn(sc.batch, 4, 32, generator=gen)
    w_lens = sc.exact_lens()
    c_lens = [s - w for s, w in zip(sc.seq_lens, w_lens)]
    out, _, _ = attend_now(sc, q, 32 ** -0.5)
    flags = sc.pages[..., sc.plan.layout.flags_offset]
    assert set((flags // 2).unique().tolist()) >= {0, 1, 2}, "all three groups must be in use"
    for b in range(sc.batch):
        slot = int(sc.slot_ids[b])
        keys, values = reconstruct_request_kv(
            sc.pages, sc.block_table[b], int(c_lens[b]), sc.pool.read("basis_k", slot), sc.pool.read("basis_v", slot),
            sc.pool.read("window_k", slot), sc.pool.read("window_v", slot), w_lens[b],
            sc.plan.layout, group_cols_k, group_cols_v)
        expected, _ = dense_attention(q[b:b + 1], keys, values, 32 ** -0.5)
        torch.testing.assert_close(out[b], expected[0], rtol=1e-4, atol=1e-5)


def test_partial_rank_changes_the_output():
    """Groups on must really drop columns (guards against a mask that never applies)."""
    config = AttentionPackConfig.from_dict({**SIXTEEN_BIT, "rank": 16, "window_size": 4, "partial_rank_values": True})
    on = build_scenario(config, num_kv_heads=2, head_size=32, prompt_lens=[60])
    off = build_scenario(AttentionPackConfig.from_dict({**SIXTEEN_BIT, "rank": 16, "window_size": 4,
                                                        "partial_rank_values": False}),
                         num_kv_heads=2, head_size=32, prompt_lens=[60])
    outs = [[o for o, _ in run_decode(sc, 4, 3, oracle=False)] for sc in (on, off)]
    assert not torch.allclose(outs[0][-1], outs[1][-1], atol=1e-4)


def test_low_rank_decode_tracks_dense_on_low_rank_data():
    """Data of rank 8 compressed at rank 8: exact even though rank < kv_width."""
    config = AttentionPackConfig.from_dict({**SIXTEEN_BIT, "rank": 8, "partial_rank_values": False, "window_size": 64})
    sc = build_scenario(config, num_kv_heads=2, head_size=32, prompt_lens=[45, 70], data_rank=8,
                        image_spans=[[(0, 20)], [(10, 69)]])
    for out, dense in run_decode(sc, 4, steps=3):
        torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)


def test_fp16_storage_stays_close_to_dense():
    width = 64
    sc = build_scenario(full_rank_config(width, 4), num_kv_heads=2, head_size=32,
                        prompt_lens=[30, 12], dtype=torch.float16, max_new_tokens=9)
    for out, dense in run_decode(sc, 4, steps=9):
        assert out.dtype == torch.float16
        torch.testing.assert_close(out.float(), dense, rtol=2e-2, atol=2e-2)


def test_unequal_modality_ranks_over_stale_pages_match_oracle():
    """Text rank 8, image rank 16: text records leave columns unused; stale NaNs must not leak."""
    config = AttentionPackConfig.from_dict(
        {**SIXTEEN_BIT, "rank_text_key": 8, "rank_text_value": 8, "rank_vision_key": 16, "rank_vision_value": 16,
         "partial_rank_values": False, "window_size": 3})
    sc = build_scenario(config, num_kv_heads=2, head_size=16, prompt_lens=[40, 21],
                        image_spans=[[(4, 30)], [(0, 9)]], pages_fill=float("nan"))
    for _ in run_decode(sc, 4, steps=4, oracle=False):  # one fold
        pass
    q = torch.randn(sc.batch, 4, 16, generator=torch.Generator().manual_seed(3))
    w_lens = sc.exact_lens()
    c_lens = [s - w for s, w in zip(sc.seq_lens, w_lens)]
    out, _, _ = attend_now(sc, q, 0.25)
    assert torch.isfinite(out).all()
    for b in range(sc.batch):
        slot = int(sc.slot_ids[b])
        keys, values = reconstruct_request_kv(
            sc.pages, sc.block_table[b], int(c_lens[b]), sc.pool.read("basis_k", slot), sc.pool.read("basis_v", slot),
            sc.pool.read("window_k", slot), sc.pool.read("window_v", slot), w_lens[b], sc.plan.layout)
        expected, _ = dense_attention(q[b:b + 1], keys, values, 0.25)
        torch.testing.assert_close(out[b], expected[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention", ["torch", "triton"])
def test_planes_of_their_own_rank_read_no_neighbour_rows(attention):
    """Each modality's basis plane takes only its own rank's rows (`slot_pool.slot_pool_maps`):
    with text ranks above image ranks the image plane's rows past its rank map to the arena's
    zero row. Attention must equal the oracle built from each plane's own rows."""
    if attention == "triton" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("the scenario's tensors are on CPU: Triton runs them under TRITON_INTERPRET=1 only")
    config = AttentionPackConfig.from_dict(
        {"rank_text_key": 20, "rank_text_value": 12, "rank_vision_key": 8, "rank_vision_value": 4,
         "window_size": 3, "sink_tokens": 1, "storage": "int8"})
    sc = build_scenario(config, num_kv_heads=2, head_size=16, prompt_lens=[40, 30, 25],
                        image_spans=[[(4, 30)], [(0, 9)], [(10, 20)]])
    for _ in run_decode(sc, 4, steps=4, oracle=False):  # one fold
        pass
    maps, own = sc.pool.rows.basis_k, sc.plan.ranks_k
    assert maps.shape[2] == 20
    assert (maps[int(sc.slot_ids[0]), 1, own[1]:] == ZERO_ROW).all()   # past the image rank: the zero row
    q = torch.randn(sc.batch, 4, 16, generator=torch.Generator().manual_seed(3))
    fn = latent_decode_attention if attention == "torch" else latent_decode_attention_triton
    out, _, _ = attend_now(sc, q, 0.25, attention=fn)
    w_lens = sc.exact_lens()
    for b in range(sc.batch):
        slot = int(sc.slot_ids[b])
        planes = []
        for name, ranks in (("basis_k", sc.plan.ranks_k), ("basis_v", sc.plan.ranks_v)):
            rows = sc.pool.read(name, slot).clone()
            for m, rank in enumerate(ranks):
                rows[m, rank:] = 0                              # the plane's own rows only
            planes.append(rows)
        windows = [sc.pool.read(name, slot) for name in ("window_k", "window_v")]
        keys, values = reconstruct_request_kv(sc.pages, sc.block_table[b], sc.seq_lens[b] - w_lens[b], *planes,
                                              *windows, w_lens[b], sc.plan.layout)
        expected, _ = dense_attention(q[b:b + 1], keys, values, 0.25)
        torch.testing.assert_close(out[b], expected[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("svd", sorted(FULL_RANK_TOLERANCE))
def test_full_rank_stays_exact_over_many_folds_past_the_layer_width(svd):
    """Text segments grow past kv_width (64) over 15 folds: the basis is full and every
    fold must find no room outside it, without inventing directions from round-off."""
    sc = build_scenario(full_rank_config(64, 8, svd), num_kv_heads=2, head_size=32,
                        prompt_lens=[30, 45, 60, 20], block_size=32, max_new_tokens=130)
    tol = FULL_RANK_TOLERANCE[svd]
    for out, dense in run_decode(sc, 4, steps=120):
        torch.testing.assert_close(out, dense, rtol=tol, atol=tol)


def test_a_span_shorter_than_its_rank_is_stored_exactly():
    """Full-rank random data: 12 image tokens under an image rank of 16 come back exact,
    while the 60 text tokens at text rank 4 do not (the check can fail)."""
    config = AttentionPackConfig.from_dict({**SIXTEEN_BIT, "rank_vision_key": 16, "rank_vision_value": 16,
                                            "rank_text_key": 4, "rank_text_value": 4, "sink_tokens": 0})
    sc = build_scenario(config, num_kv_heads=2, head_size=16, prompt_lens=[72], image_spans=[[(30, 41)]])
    slot = int(sc.slot_ids[0])
    keys, values = reconstruct_request_kv(
        sc.pages, sc.block_table[0], 72, sc.pool.read("basis_k", slot), sc.pool.read("basis_v", slot),
        sc.pool.read("window_k", slot), sc.pool.read("window_v", slot), 0, sc.plan.layout)
    image = sc.is_image[0]
    torch.testing.assert_close(keys[image], sc.keys[0][image], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values[image], sc.values[0][image], rtol=1e-5, atol=1e-5)
    assert (keys[~image] - sc.keys[0][~image]).abs().max() > 0.1
