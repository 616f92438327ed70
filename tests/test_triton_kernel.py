"""The Triton latent decode against the PyTorch path, on CPU (interpreter) and on CUDA.

The caches are built directly (tests/latent_cases.py): random records with valid
flags in shuffled pages whose other rows are NaN, ragged lengths including a request
with no compressed token, window lengths from 0 to the window size, slots drawn from
a larger pool. int8 storage: the same cases in the int8 format (stale page rows are
random bytes with NaN and inf scales), and int8 state made by prefill, decode and a
fold (tests/scenario.py).
"""
import collections
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attentionpack_vllm.kernels as K
from attentionpack_vllm.config import AttentionPackConfig
from attentionpack_vllm.kernels import decode_inputs, latent_decode_torch, latent_decode_triton  # noqa: F401
from attentionpack_vllm.kernels import layout  # noqa: F401
from latent_cases import C_LENS, CASES, INT8_CASES, W_LENS, random_case, replay_against_eager, same_outputs
from scenario import attend_now, build_scenario, run_decode
from triton_devices import DEVICES, HAS_CUDA, interpreted

pytestmark = pytest.mark.triton

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
KERNELS = ("_project_queries", "_latent_pass", "_combine", "_probs_pass")


def tolerances(device: str, dtype) -> tuple[float, float]:
    """(output, probabilities) tolerances: on CPU every product is float32; on a GPU
    half-precision operands are multiplied in their own dtype."""
    if dtype == F32:
        return 1e-4, 1e-5
    if device == "cpu":
        return (2e-3 if dtype == F16 else 1e-2), 1e-5
    return (1e-2, 2e-3) if dtype == F16 else (5e-2, 1e-2)


def call_torch(case, batch=None, need_probs=True):
    batch = batch or case.batch(K)
    return latent_decode_torch.latent_decode_attention(
        case.query, case.pages, case.rows, batch, case.spec, case.scale, need_probs=need_probs)


def call_triton(case, batch=None, need_probs=True, **kwargs):
    batch = batch or case.batch(K, with_index=False)
    args = (case.query, case.pages, case.rows, batch, case.spec, case.scale, need_probs)
    if kwargs:
        return latent_decode_triton._latent_decode(*args, **kwargs)
    return latent_decode_triton.latent_decode_attention_triton(*args)


def assert_same(ref, got, device, dtype, need_probs=True):
    tol_out, tol_p = tolerances(device, dtype)
    assert got[0].dtype == ref[0].dtype and got[0].shape == ref[0].shape
    assert torch.isfinite(got[0].float()).all()
    torch.testing.assert_close(got[0].float(), ref[0].float(), rtol=tol_out, atol=tol_out)
    if not need_probs:
        assert got[1] is None and got[2] is None
        return
    for a, b in zip(ref[1:], got[1:]):
        assert b.dtype == torch.float32 and b.shape == a.shape
        torch.testing.assert_close(b, a, rtol=10 * tol_p, atol=tol_p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES) + list(INT8_CASES))
def test_matches_torch_path(device, name):
    int8 = name in INT8_CASES
    heads, kv, head_size, rank_k, rank_v, block, image, partial, dtype, need_probs = {**CASES, **INT8_CASES}[name]
    case = random_case(K, compressed_lens=C_LENS, window_lens=W_LENS, num_heads=heads, num_kv_heads=kv,
                       head_size=head_size, rank_k=rank_k, rank_v=rank_v, block_size=block, window=4,
                       has_image=image, partial_k="k" in partial, partial_v="v" in partial,
                       dtype=dtype, device=device, seed=len(name), int8=int8)
    assert case.pages.dtype == (torch.int8 if int8 else dtype)
    assert case.spec.partial_k == ("k" in partial) and case.spec.partial_v == ("v" in partial)
    ref = call_torch(case, need_probs=need_probs)
    got = call_triton(case, need_probs=need_probs)
    assert_same(ref, got, device, dtype, need_probs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("need_probs", [False, True], ids=["no-probs", "probs"])
@pytest.mark.parametrize("partial", ["", "k", "v", "kv"], ids=["full", "pk", "pv", "pkv"])
@pytest.mark.parametrize("image", [True, False], ids=["image", "text"])
@pytest.mark.parametrize("int8", [False, True], ids=["16-bit", "int8"])
def test_every_switch_combination(device, dtype, need_probs, partial, image, int8):
    if device == "cuda" and (dtype != F16 or not need_probs):
        pytest.skip("on CUDA the half-precision branch with probabilities only (CASES covers the rest; "
                    "every combination is a separate compilation)")
    case = random_case(K, compressed_lens=[0, 19, 6], window_lens=[3, 1, 2], num_heads=4, num_kv_heads=2,
                       head_size=16, block_size=8, window=3, has_image=image, partial_k="k" in partial,
                       partial_v="v" in partial, dtype=dtype, device=device, seed=7, int8=int8)
    assert_same(call_torch(case, need_probs=need_probs), call_triton(case, need_probs=need_probs),
                device, dtype, need_probs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits,tile", [(1, 16), (2, 32), (7, 16)], ids=["one-split", "two", "empty-splits"])
def test_any_split_count_and_tile(device, splits, tile):
    # A long request beside short ones: with 7 splits most of the short ones' splits are empty.
    case = random_case(K, compressed_lens=[3, 70, 0, 17], window_lens=[2, 1, 3, 3], num_heads=4,
                       num_kv_heads=2, head_size=16, block_size=16, window=3, partial_v=True,
                       device=device, seed=splits)
    assert_same(call_torch(case), call_triton(case, splits=splits, tile=tile), device, F32)


@pytest.mark.parametrize("device", DEVICES)
def test_stale_window_rows_are_never_read(device):
    # NaN past each window's length: the kernel masks those rows; the PyTorch path
    # (which needs finite leftovers) sees zeros there.
    kwargs = dict(compressed_lens=[9, 0, 20], window_lens=[1, 3, 2], window=4, partial_k=True,
                  partial_v=True, device=device)
    stale = random_case(K, window_stale=float("nan"), **kwargs)
    clean = random_case(K, window_stale=0.0, **kwargs)
    assert torch.isnan(stale.rows.arena).any()
    assert_same(call_torch(clean), call_triton(stale), device, F32)


@pytest.mark.parametrize("device", DEVICES)
def test_a_request_with_an_empty_window(device):
    # Window length 0 (allowed by make_decode_batch): only the compressed tokens count;
    # NaN in its window rows must not leak in.
    kwargs = dict(compressed_lens=[12, 30, 7], window_lens=[0, 2, 4], window=4, partial_v=True, device=device)
    stale = random_case(K, window_stale=float("nan"), **kwargs)
    clean = random_case(K, window_stale=0.0, **kwargs)
    got = call_triton(stale)
    assert_same(call_torch(clean), got, device, F32)
    assert (got[2][0] == 0).all()


def _zero_stale_rows(case):
    """A copy of the case's pages with every row that no request reads zeroed."""
    pages = torch.zeros_like(case.pages)
    flat, src = pages.view(-1, pages.shape[-1]), case.pages.view(-1, pages.shape[-1])
    for b, clen in enumerate(case.batch(K, with_index=False).compressed_lens.tolist()):
        pos = torch.arange(clen, device=pages.device)
        rows = case.block_table[b].long()[pos // case.block_size] * case.block_size + pos % case.block_size
        flat[rows] = src[rows]
    return pages


@pytest.mark.parametrize("device", DEVICES)
def test_int8_stale_bytes_never_leak(device):
    # Page rows past each request's length (in its last page, and in the pages its block
    # table's spare entries point at) are random bytes with NaN K' and inf V' scales; window
    # rows past a window's length have NaN scales. The kernel never loads them: its results
    # equal, bit for bit, those over the same cache with all of it zeroed.
    kwargs = dict(compressed_lens=[9, 0, 20, 33], window_lens=[1, 3, 2, 4], window=4, partial_k=True,
                  partial_v=True, int8=True, device=device)
    stale = random_case(K, window_stale=float("nan"), **kwargs)
    clean = random_case(K, window_stale=0.0, **kwargs)
    clean.pages = _zero_stale_rows(clean)
    offset = stale.spec.layout.k_scale_offset
    k_scales = stale.pages[..., offset:offset + 4].contiguous().view(torch.float32)
    assert torch.isnan(k_scales).any() and torch.isnan(stale.rows.scales).any()
    got = call_triton(stale)
    assert all(torch.equal(a, b) for a, b in zip(got, call_triton(clean)))
    assert_same(call_torch(clean), got, device, F32)


def test_int8_refuses_missing_scales_and_misaligned_pages():
    """The record scales are loaded as float32: pages whose rows are not 4-byte aligned are
    refused on the host, before any launch."""
    case = random_case(K, compressed_lens=[5], window_lens=[1], int8=True)
    args = [case.query, case.pages, case.rows.with_arena(case.rows.arena, None),
            case.batch(K, with_index=False), case.spec, case.scale]
    with pytest.raises(AssertionError, match="slot-row scales"):
        latent_decode_triton.latent_decode_attention_triton(*args)
    shifted = torch.empty(case.pages.numel() + 1, dtype=torch.int8)[1:].view(case.pages.shape)
    shifted.copy_(case.pages)
    args[1], args[2] = shifted, case.rows   # one byte past an aligned allocation
    with pytest.raises(AssertionError, match="4-byte aligned"):
        latent_decode_triton.latent_decode_attention_triton(*args)


@pytest.mark.skipif(not interpreted(), reason="the scenario's state is on the CPU (the CUDA tests use random_case)")
@pytest.mark.parametrize("with_images", [False, True], ids=["text", "image"])
def test_int8_state_made_by_prefill_decode_and_a_fold(with_images):
    """int8 state as the backend makes it (pages of stale random bytes, records written by
    prefill and a fold, partial rank on): the Triton kernel matches the PyTorch path,
    probabilities included."""
    config = AttentionPackConfig.from_dict({"rank": 12, "window_size": 3, "sink_tokens": 2, "storage": "int8",
                                            "partial_rank_keys": True, "partial_rank_values": True})
    spans = [[(4, 30)], [], [(0, 9)]] if with_images else None
    sc = build_scenario(config, num_kv_heads=2, head_size=16, prompt_lens=[40, 6, 21], image_spans=spans,
                        pages_fill=float("nan"), has_image=with_images)
    for _ in run_decode(sc, 4, steps=4, oracle=False):  # one fold
        pass
    spec = sc.plan.spec
    assert spec.layout.int8 and spec.partial_k and spec.partial_v and spec.has_image == with_images
    q = torch.randn(sc.batch, 4, 16, generator=torch.Generator().manual_seed(3))
    ref = attend_now(sc, q, 0.25, need_probs=True)
    got = attend_now(sc, q, 0.25, attention=latent_decode_triton.latent_decode_attention_triton, need_probs=True)
    assert_same(ref, got, "cpu", F32)


@pytest.mark.parametrize("device", DEVICES)
def test_padded_length_larger_than_needed(device):
    # A captured graph runs with a length bound: the result must not depend on it.
    case = random_case(K, compressed_lens=[12, 30], window_lens=[2, 4], device=device, partial_v=True)
    exact = call_triton(case)
    bound = case.batch(K, with_index=False, max_compressed_len=57)
    padded = call_triton(case, batch=bound)
    assert padded[1].shape == (2, 57)
    torch.testing.assert_close(padded[0], exact[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded[1][:, :30], exact[1], rtol=1e-5, atol=1e-7)
    assert (padded[1][:, 30:] == 0).all()
    torch.testing.assert_close(padded[2], exact[2], rtol=1e-5, atol=1e-7)
    assert_same(call_torch(case, batch=case.batch(K, max_compressed_len=57)), padded, device, F32)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_storage(device):
    case = random_case(K, compressed_lens=[33, 9], window_lens=[4, 1], num_heads=8, num_kv_heads=2,
                       head_size=32, rank_k=32, rank_v=32, block_size=16, partial_v=True, dtype=BF16,
                       device=device)
    assert_same(call_torch(case), call_triton(case), device, BF16)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    case = random_case(K, compressed_lens=[4], window_lens=[1], device=device)
    batch = dataclasses.replace(case.batch(K, with_index=False), block_table=case.block_table[:0],
                                slot_ids=torch.zeros(0, dtype=torch.int64, device=device))
    query = case.query[:0]
    out, probs, w_probs = latent_decode_triton.latent_decode_attention_triton(
        query, case.pages, case.rows, batch, case.spec, case.scale, need_probs=True)
    assert out.shape == (0, 4, 16) and probs.shape == (0, 4) and w_probs.shape == (0, 4)


@pytest.mark.parametrize("int8", [False, True], ids=["16-bit", "int8"])
def test_native_half_dot_branch(monkeypatch, int8):
    """The GPU branch (fp16 operands, fp32 accumulation, GPU tile size) under the interpreter,
    whose fp16 dot is right. int8: the scaled tiles are multiplied in the query's fp16."""
    if not interpreted():
        pytest.skip("checks the GPU code path on CPU; on a GPU the other tests run it")
    monkeypatch.setattr(latent_decode_triton, "_interpreted", lambda: False)
    case = random_case(K, compressed_lens=[0, 70, 17], window_lens=[1, 4, 2], num_heads=8, num_kv_heads=2,
                       head_size=32, rank_k=24, rank_v=20, block_size=16, partial_k=True, partial_v=True,
                       dtype=F16, int8=int8)
    assert_same(call_torch(case), call_triton(case), "cuda", F16)  # the GPU's tolerances


# --------------------------------------------------------------------------- graph-safety

class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


class _Launches:
    """Wraps the module's Triton kernels: records (name, grid) of every launch; `run` off
    replaces the launch by nothing (for meta tensors)."""

    def __init__(self, monkeypatch, run=True):
        self.calls = []
        for name in KERNELS:
            real = getattr(latent_decode_triton, name)
            monkeypatch.setattr(latent_decode_triton, name, self._wrap(name, real, run))

    def _wrap(self, name, real, run):
        calls = self.calls

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    calls.append((name, tuple(grid)))
                    if run:
                        return real[grid](*args, **kwargs)
                return launch
        return Launcher()


FORBIDDEN = {"_local_scalar_dense", "nonzero", "index", "index_select", "gather", "masked_select",
             "item", "_to_copy", "masked_fill"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need_probs", [False, True], ids=["no-probs", "probs"])
@pytest.mark.parametrize("int8", [False, True], ids=["16-bit", "int8"])
def test_no_host_reads_and_a_fixed_number_of_launches(device, need_probs, int8, monkeypatch):
    case = random_case(K, compressed_lens=C_LENS, window_lens=W_LENS, device=device, partial_k=True,
                       partial_v=True, int8=int8)
    batch = case.batch(K, with_index=False)
    call_triton(case, batch=batch, need_probs=need_probs)  # warm-up: compiles, caches the column table
    launches = _Launches(monkeypatch)
    with _Ops() as mode:
        call_triton(case, batch=batch, need_probs=need_probs)
    assert not FORBIDDEN & set(mode.ops), mode.ops
    if device == "cuda":  # the interpreter copies arguments itself; on a GPU only allocations remain
        assert set(mode.ops) <= {"empty", "slice"}, mode.ops
    names = [name for name, _ in launches.calls]
    assert names == list(KERNELS if need_probs else KERNELS[:3])
    grids = dict(launches.calls)
    assert grids["_project_queries"] == (4, 2 * 2)    # batch x (planes x KV heads)
    assert grids["_combine"] == (4, 2)                 # batch x KV heads
    assert grids["_latent_pass"][0] == 4


@pytest.mark.parametrize("int8", [False, True], ids=["16-bit", "int8"])
@pytest.mark.parametrize("image", [True, False], ids=["image", "text-only"])
def test_the_host_side_reads_no_tensor_value(image, int8, monkeypatch):
    """Every input on the meta device (which has no values): the host side still runs,
    so it decides everything from shapes, the spec and host integers."""
    case = random_case(K, compressed_lens=C_LENS, window_lens=W_LENS, has_image=image, partial_v=True, int8=int8)
    launches = _Launches(monkeypatch, run=False)
    meta = lambda t: t.to("meta")  # noqa: E731
    batch = decode_inputs.make_decode_batch(
        meta(case.block_table), case.slot_ids, case.seq_lens, case.window_lens,
        window_size=case.window, block_size=case.block_size, with_index=False)
    meta_rows = case.rows.map_tensors(meta)
    out, probs, w_probs = latent_decode_triton.latent_decode_attention_triton(
        meta(case.query), meta(case.pages), meta_rows, batch, case.spec, case.scale, need_probs=True)
    assert out.device.type == "meta" and probs.shape == (4, 40) and w_probs.shape == (4, 4)
    grids = dict(launches.calls)
    assert len(launches.calls) == 4
    assert grids["_project_queries"] == (4, (2 if image else 1) * 2)  # no image plane without images


def _graph_cases(device):
    shape = dict(num_heads=8, num_kv_heads=2, head_size=32, rank_k=32, rank_v=32, block_size=16, window=8,
                 partial_v=True, dtype=F16, device=device, num_blocks=40, max_blocks=8, num_slots=9)
    cases = [random_case(K, compressed_lens=[40, 0, 100, 7], window_lens=[3, 8, 1, 5], seed=1, **shape),
             random_case(K, compressed_lens=[90, 13, 2, 61], window_lens=[8, 1, 6, 2], seed=2, **shape)]
    gen = torch.Generator().manual_seed(0)
    new_kv = [tuple(torch.randn(4, 64, generator=gen).to(device, F16) for _ in "kv") for _ in cases]
    return cases, new_kv


@pytest.mark.parametrize("need_probs", [False, True], ids=["no-probs", "probs"])
def test_step_on_fixed_buffers_without_capture(need_probs):
    """CPU stand-in for the graph test: the same buffers refilled for other requests, no capture."""
    if not interpreted():
        pytest.skip("the CUDA test captures for real")
    cases, new_kv = _graph_cases("cpu")
    for result in replay_against_eager(K, cases, new_kv, bound=120, need_probs=need_probs, use_graph=False):
        assert same_outputs(result["graph"], result["eager"]) and result["window_equal"]
        assert_same(result["reference"], result["graph"], "cpu", F16, need_probs)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("need_probs", [False, True], ids=["no-probs", "probs"])
def test_cuda_graph_capture_and_replay(need_probs):
    """Append the new token to the window and attend, captured once; replayed on other
    requests (other lengths, block tables, slots, contents) it equals eager bit for bit."""
    cases, new_kv = _graph_cases("cuda")
    for result in replay_against_eager(K, cases, new_kv, bound=120, need_probs=need_probs):
        assert same_outputs(result["graph"], result["eager"]) and result["window_equal"]
        assert_same(result["reference"], result["graph"], "cuda", F16, need_probs)
