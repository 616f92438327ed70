"""The compiled CPU kernels (kernels/latent_decode_cpu.py, kernels/fold_cpu.py) against the PyTorch paths.

The same random caches as the Triton tests (tests/latent_cases.py: shuffled pages whose
other rows are NaN or random bytes, ragged lengths, a request with no compressed token,
slots from a larger pool), the window append it fuses against `SlotPool.write_window`,
whole decode runs against dense attention, the in-place fold against the rebuilt one, and
how the backend picks the kernel.
"""
import pytest
import torch

import attentionpack_vllm.kernels as K
from attentionpack_vllm import runtime
from attentionpack_vllm.config import AttentionPackConfig
from attentionpack_vllm.decode import decode_step, schedule_decode
from attentionpack_vllm.kernels import cpu_library, fold_cpu, latent_decode_cpu, latent_decode_torch
from attentionpack_vllm.kernels.reference import reconstruct_request_kv
from attentionpack_vllm.slot_pool import SlotPool
from attentionpack_vllm.plan import CompressionPlan
from latent_cases import C_LENS, CASES, INT8_CASES, W_LENS, random_case
from op_counter import OpCounter
from scenario import SIXTEEN_BIT, attend_now, build_scenario, run_decode

pytestmark = pytest.mark.skipif(not cpu_library.available(),
                                reason=f"CPU kernels unavailable: {cpu_library.unavailable_reason()}")
cpu_attention = latent_decode_cpu.latent_decode_attention_cpu


def case_for(name: str, dtype_override=None):
    heads, kv, head_size, rank_k, rank_v, block, image, partial, dtype, need_probs = {**CASES, **INT8_CASES}[name]
    int8 = name in INT8_CASES
    if not int8 and dtype == torch.float16:
        dtype = torch.bfloat16  # the CPU kernel stores float32 or bfloat16 rows (float16: the PyTorch path)
    case = random_case(K, compressed_lens=C_LENS, window_lens=W_LENS, num_heads=heads, num_kv_heads=kv,
                       head_size=head_size, rank_k=rank_k, rank_v=rank_v, block_size=block, window=4,
                       has_image=image, partial_k="k" in partial, partial_v="v" in partial,
                       dtype=dtype_override or dtype, seed=len(name), int8=int8)
    return case, need_probs


def run_both(case, need_probs):
    args = (case.query, case.pages, case.rows)
    ref = latent_decode_torch.latent_decode_attention(*args, case.batch(K), case.spec, case.scale,
                                                      need_probs=need_probs)
    got = cpu_attention(*args, case.batch(K, with_index=False), case.spec, case.scale, need_probs=need_probs)
    return ref, got


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """The kernel's work items: one per request on one thread; one per (request, KV head)
    on two threads at these batches of 4 (too few requests to share out whole)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", list(CASES) + list(INT8_CASES))
def test_matches_torch_path(name, threads):
    case, need_probs = case_for(name)
    ref, got = run_both(case, need_probs)
    assert got[0].dtype == ref[0].dtype and got[0].shape == ref[0].shape
    # Both sum float32 products of the same stored values, in another order.
    tol = 1e-5 if case.query.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got[0].float(), ref[0].float(), rtol=tol, atol=tol)
    if not need_probs:
        assert got[1] is None and got[2] is None
        return
    for a, b in zip(ref[1:], got[1:]):
        assert b.shape == a.shape and b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_results_change_with_the_inputs():
    """Not a constant: another query gives another output, equal to the PyTorch path's."""
    case, _ = case_for("int8-gqa-image-split-pkv")
    ref_a, got_a = run_both(case, False)
    case.query = case.query.flip(0)
    ref_b, got_b = run_both(case, False)
    assert (got_a[0] - got_b[0]).abs().max() > 1e-2
    torch.testing.assert_close(got_b[0].float(), ref_b[0].float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("storage,dtype", [("int8", torch.float32), ("auto", torch.float32),
                                           ("auto", torch.bfloat16)])
def test_fused_append_writes_what_write_window_writes(storage, dtype):
    """The kernel's window append stores the same bytes (int8 values and scales) as the
    PyTorch path's `SlotPool.write_window`, so both paths read back one cache."""
    plan = CompressionPlan.build(AttentionPackConfig.from_dict({"rank": 16, "storage": storage}), 3, 32,
                                 has_image=False)
    gen = torch.Generator().manual_seed(0)
    pools = [SlotPool.allocate(plan, 5, dtype) for _ in range(2)]
    keys = (torch.randn(3, 96, generator=gen) * torch.tensor([0.01, 1.0, 30.0]).repeat_interleave(32)).to(dtype)
    values = torch.randn(3, 96, generator=gen).to(dtype)
    keys[1, 32:64] = 0  # an all-zero head row: scale 0, values 0
    slots, lens = [4, 0, 2], [1, 3, 2]
    batch = K.decode_inputs.make_decode_batch(torch.zeros(3, 1, dtype=torch.int32), slots, lens, lens,
                                              window_size=plan.exact_rows, block_size=16, with_index=False)
    pools[0].write_window((batch.slot_ids, batch.new_window_rows), keys, values)
    query = torch.randn(3, 6, 32, generator=gen).to(dtype)
    pages = torch.zeros(2, 16, plan.layout.width, dtype=plan.page_dtype(dtype))
    pool = pools[1]
    cpu_attention(query, pages, pool.rows, batch, plan.spec, 0.2, new_keys=keys, new_values=values)
    for a, b in zip(pools[0].tensors(), pools[1].tensors()):
        assert torch.equal(a, b)
    assert pools[1].rows.arena.float().abs().sum() > 0


def test_layers_called_in_turn_each_read_their_own_cache():
    """The wrapper keeps each layer's constant fields between calls (keyed by its tensors):
    two caches of different shapes and storage, called in turn, each match the PyTorch path.
    The image spans give tiles of image tokens only, of text only and of both."""
    layers = [build_scenario(AttentionPackConfig.from_dict({"rank": rank, "window_size": 8, "storage": storage}),
                             num_kv_heads=kv, head_size=32, prompt_lens=[37, 5, 64], has_image=image, seed=seed,
                             image_spans=[[(0, 30)], [], [(10, 60)]] if image else None)
              for seed, (rank, storage, kv, image) in enumerate([(16, "int8", 2, True), (24, "auto", 1, False)])]
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for sc in layers:
            query = torch.randn(sc.batch, 4, 32, generator=gen)
            want = attend_now(sc, query, 0.2)[0]
            torch.testing.assert_close(attend_now(sc, query, 0.2, attention=cpu_attention)[0], want,
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_images", [False, True])
@pytest.mark.parametrize("storage", ["auto", "int8"])
def test_decode_runs_match_the_torch_path_across_folds(with_images, storage):
    """Whole decode runs (appends, folds, partial rank's importance EMA) give the same
    outputs with either attention."""
    config = AttentionPackConfig.from_dict({"rank": 16, "window_size": 4, "storage": storage,
                                            "partial_rank_values": True})
    spans = [[(3, 20)], [], [(0, 15)], []] if with_images else None
    runs = []
    for attention in (latent_decode_torch.latent_decode_attention, cpu_attention):
        sc = build_scenario(config, num_kv_heads=2, head_size=32, prompt_lens=[37, 5, 64, 18],
                            image_spans=spans, max_new_tokens=14, has_image=with_images, pages_fill=float("nan"))
        runs.append([out for out, _ in run_decode(sc, 4, steps=14, attention=attention, oracle=False)])
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("with_images", [False, True])
def test_full_rank_equals_dense_across_folds(with_images):
    # float64 folds ("gram"): exact to round-off, so the tolerance is the kernel's own
    sc = build_scenario(AttentionPackConfig.from_dict({**SIXTEEN_BIT, "rank": 64, "window_size": 4, "svd": "gram"}),
                        num_kv_heads=2, head_size=32, prompt_lens=[37, 5, 64, 18],
                        image_spans=[[(3, 20)], [], [(0, 15), (40, 47)], [(17, 17)]] if with_images else None,
                        max_new_tokens=14, pages_fill=float("nan"))
    for out, dense in run_decode(sc, 4, steps=14, attention=cpu_attention):
        torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("storage", ["auto", "int8"])
def test_plain_step_is_one_call_without_host_reads(storage):
    config = AttentionPackConfig.from_dict({"rank": 16, "window_size": 8, "storage": storage})
    sc = build_scenario(config, num_kv_heads=2, head_size=32, prompt_lens=[37, 5, 64, 18], has_image=False)
    gen = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(4, 4, 32, generator=gen), torch.randn(4, 64, generator=gen), torch.randn(4, 64, generator=gen)
    sc.seq_lens = [s + 1 for s in sc.seq_lens]
    batch, folds = schedule_decode(sc.tracker, sc.plan, sc.block_table, sc.slot_ids.tolist(), sc.seq_lens,
                                   sc.pages.shape[1], with_index=False)
    assert folds is None and batch.gather_blocks is None
    with OpCounter() as counter:
        decode_step(q, k, v, sc.pages, sc.pool, sc.plan, batch, 0.2, attention=cpu_attention)
    assert counter.host_reads == 0, counter.working_ops()
    # What is left in PyTorch: the query's and output's dtype handling, the output buffer.
    assert counter.working <= 4, counter.working_ops()


def test_float16_rows_are_refused_with_the_formats_it_takes():
    case, _ = case_for("mha-text", dtype_override=torch.float16)
    with pytest.raises(ValueError, match="int8, float32 or bfloat16"):
        run_both(case, False)


def test_a_failing_compiler_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTENTIONPACK_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(cpu_library.CpuKernelUnavailable, match="building the CPU kernels failed"):
        cpu_library.build()


def test_an_unusable_cache_folder_is_reported(monkeypatch, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("ATTENTIONPACK_CACHE", str(blocker / "cache"))  # a folder under a file
    with pytest.raises(cpu_library.CpuKernelUnavailable, match="building the CPU kernels failed"):
        cpu_library.build()


def test_the_backend_picks_the_kernel(monkeypatch):
    pick = lambda kernel, device="cpu": runtime.decode_kernel_name(  # noqa: E731
        AttentionPackConfig.from_dict({"decode_kernel": kernel}), device)
    assert pick("auto") == "cpu" and pick("cpu") == "cpu"
    assert pick("torch") == "torch" and pick("auto", "cuda:0") == "triton" and pick("triton") == "triton"
    assert runtime.decode_attention_for(pick("auto")) is cpu_attention
    with pytest.raises(ValueError, match="decode_kernel 'cpu' runs on the CPU only"):
        pick("cpu", "cuda:0")
    # A float16 cache in 16-bit storage is not the kernel's format: the PyTorch path decodes it.
    half = lambda kernel, storage: runtime.decode_kernel_name(  # noqa: E731
        AttentionPackConfig.from_dict({"decode_kernel": kernel, "storage": storage}), "cpu", torch.float16)
    assert half("auto", "auto") == "torch" and half("auto", "int8") == "cpu"
    with pytest.raises(ValueError, match="decode_kernel 'cpu' is unavailable here: it stores int8, float32 or "
                                         "bfloat16 rows, not torch.float16"):
        half("cpu", "auto")
    monkeypatch.setattr(cpu_library, "unavailable_reason", lambda: "no C++ compiler found")
    assert pick("auto") == "torch"
    with pytest.raises(ValueError, match="decode_kernel 'cpu' is unavailable here: no C\\+\\+ compiler found"):
        pick("cpu")


def reconstruct(sc, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Request b's keys and values as the cache holds them (factors @ bases, then the exact rows)."""
    slot, exact = int(sc.slot_ids[b]), sc.exact_lens()[b]
    rows = [sc.pool.read(name, slot) for name in ("basis_k", "basis_v", "window_k", "window_v")]
    return reconstruct_request_kv(sc.pages, sc.block_table[b], sc.seq_lens[b] - exact, *rows, exact, sc.plan.layout)


@pytest.mark.parametrize("with_images", [False, True])
@pytest.mark.parametrize("storage,dtype", [("int8", torch.float32), ("auto", torch.float32),
                                           ("auto", torch.bfloat16)])
@pytest.mark.parametrize("partial", [False, True])
def test_fold_in_place_matches_the_rebuilt_fold(with_images, storage, dtype, partial, monkeypatch):
    """The CPU fold (energies and rotation compiled, in place; the stacked-rows eigenproblem)
    against the PyTorch fold that rebuilds every record (full F^T F, the width-square
    covariance): the same keys and values (factors times bases: a basis direction's sign
    is free), the same flags (with partial rank: the groups every fold reassigns from
    importance), and the same attention afterwards."""
    config = AttentionPackConfig.from_dict({"rank": 24, "window_size": 6, "storage": storage,
                                            "partial_rank_keys": partial, "partial_rank_values": partial})
    spans = [[(3, 20)], [], [(0, 15)]] if with_images else None
    states = []
    for in_place in (True, False):
        if not in_place:
            monkeypatch.setattr(fold_cpu, "supports", lambda pages: False)
        sc = build_scenario(config, num_kv_heads=2, head_size=32, prompt_lens=[70, 9, 40], image_spans=spans,
                            max_new_tokens=14, has_image=with_images, dtype=dtype, data_rank=12)
        for _ in run_decode(sc, 4, steps=13, attention=cpu_attention, oracle=False):  # two folds
            pass
        states.append(sc)
    tol = 1e-4 if storage == "auto" and dtype == torch.float32 else 3e-2
    for b in range(3):
        kv = [reconstruct(sc, b) for sc in states]
        for fast, ref in zip(*kv):
            torch.testing.assert_close(fast, ref, rtol=tol, atol=tol * ref.abs().max())
    query = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(9)).to(dtype)
    outs = [attend_now(sc, query, 0.2)[0].float() for sc in states]
    torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol)
    records = [sc.pages.view(-1, sc.plan.layout.width) for sc in states]
    flags = [r[..., sc.plan.layout.flags_offset] for r in records]
    assert torch.equal(flags[0], flags[1])
    assert sc.plan.tracks_importance == partial
    if partial:  # the check can fail: a fold that skipped the regrouping leaves its window tokens in group 0
        assert (flags[0].long() // 2 > 0).any()
