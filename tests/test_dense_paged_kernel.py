"""The dense paged Triton baseline against plain softmax over gathered K/V (CPU under the
interpreter, and CUDA when present)."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attentionpack_vllm.kernels.dense_paged_triton import dense_paged_decode_attention
from triton_devices import DEVICES, HAS_CUDA, interpreted

pytestmark = pytest.mark.triton


def reference(query, pages, block_table, seq_lens, scale):
    """Gather each request's K/V from its pages, then softmax attention in float32."""
    batch, num_heads, head_size = query.shape
    block_size, num_kv_heads = pages.shape[1], pages.shape[3]
    group = num_heads // num_kv_heads
    outs = []
    for b in range(batch):
        length = int(seq_lens[b])
        num_blocks = -(-length // block_size)
        kv = pages[block_table[b, :num_blocks].long()].reshape(-1, 2, num_kv_heads, head_size)[:length]
        k, v = kv[:, 0].float(), kv[:, 1].float()                      # [T, kvh, D]
        q = query[b].float().view(num_kv_heads, group, head_size)
        probs = torch.softmax(torch.einsum("kgd,tkd->kgt", q, k) * scale, dim=-1)
        outs.append(torch.einsum("kgt,tkd->kgd", probs, v).reshape(num_heads, head_size))
    return torch.stack(outs)


def paged_scenario(num_heads, num_kv_heads, head_size, block_size, seq_lens, dtype, seed=0):
    """Random K/V in shuffled pages; every row past a request's length holds NaN (stale bytes)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(seq_lens)
    max_blocks = -(-max(seq_lens) // block_size) + 1
    num_blocks = batch * max_blocks + 2
    pages = torch.full((num_blocks, block_size, 2, num_kv_heads, head_size), float("nan"))
    block_table = torch.randperm(num_blocks, generator=gen)[:batch * max_blocks].view(batch, max_blocks)
    for b, length in enumerate(seq_lens):
        kv = torch.randn(length, 2, num_kv_heads, head_size, generator=gen)
        rows = torch.arange(length)
        pages[block_table[b, rows // block_size], rows % block_size] = kv
    query = torch.randn(batch, num_heads, head_size, generator=gen)
    return (query.to(dtype), pages.to(dtype), block_table.to(torch.int32),
            torch.tensor(seq_lens, dtype=torch.int32))


TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def check(num_heads, num_kv_heads, head_size, block_size, seq_lens, dtype, device="cpu", **kwargs):
    query, pages, block_table, lens = paged_scenario(
        num_heads, num_kv_heads, head_size, block_size, seq_lens, dtype)
    scale = head_size ** -0.5
    on = lambda t: t.to(device)  # noqa: E731
    got = dense_paged_decode_attention(on(query), on(pages), on(block_table), on(lens), scale, **kwargs)
    assert got.shape == query.shape and got.dtype == dtype
    ref = reference(query, pages, block_table, lens, scale)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float().cpu(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (6, 3), (4, 1)],
                         ids=["mha", "gqa4", "gqa2-odd", "mqa"])
@pytest.mark.parametrize("head_size", [32, 64])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(num_heads, num_kv_heads, head_size, block_size, dtype, device):
    # Ragged: one token, mid-block, exactly one block, several blocks plus a partial one.
    seq_lens = [1, 7, block_size, 2 * block_size + 5]
    check(num_heads, num_kv_heads, head_size, block_size, seq_lens, dtype, device)


@pytest.mark.parametrize("pages_per_split", [1, 2, 100])
@pytest.mark.parametrize("device", DEVICES)
def test_splits_including_empty_ones(pages_per_split, device):
    # Short requests next to a long one: most of their splits have no page at all.
    check(8, 2, 32, 16, [1, 3, 90, 17], torch.float32, device, pages_per_split=pages_per_split)


@pytest.mark.parametrize("device", DEVICES)
def test_max_seq_len_bounds_the_grid(device):
    check(4, 2, 32, 16, [20, 33], torch.float32, device, max_seq_len=33, pages_per_split=1)


@pytest.mark.parametrize("device", DEVICES)
def test_small_pages_inside_one_tile(device):
    # Blocks of 4 rows: every tile gathers positions from several pages.
    check(4, 2, 32, 4, [1, 9, 30], torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_storage(device):
    check(8, 2, 64, 16, [5, 40], torch.bfloat16, device)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
def test_no_host_reads(device):
    query, pages, block_table, lens = (t.to(device) for t in paged_scenario(
        8, 2, 32, 16, [1, 40, 17], torch.float32))
    dense_paged_decode_attention(query, pages, block_table, lens, 1.0)  # warm-up (compiles)
    with _Ops() as mode:
        dense_paged_decode_attention(query, pages, block_table, lens, 1.0)
    assert not {"_local_scalar_dense", "nonzero", "item"} & set(mode.ops), mode.ops
    if device == "cuda":  # only allocations (the interpreter copies arguments itself)
        assert set(mode.ops) <= {"empty"}, mode.ops


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_and_replay():
    shapes = [paged_scenario(8, 2, 64, 16, lens, torch.float16, seed=seed)
              for seed, lens in ((0, [30, 1, 64]), (1, [5, 64, 33]))]
    static = [t.cuda() for t in shapes[0]]
    out = dense_paged_decode_attention(*static, 0.125)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dense_paged_decode_attention(*static, 0.125)
    for inputs in shapes:
        inputs = [t.cuda() for t in inputs]
        expected = dense_paged_decode_attention(*inputs, 0.125)
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)


def test_layout_is_checked():
    query, pages, block_table, lens = paged_scenario(4, 2, 32, 16, [5], torch.float32)
    with pytest.raises(AssertionError, match="head_size"):
        dense_paged_decode_attention(query[..., :16].contiguous(), pages, block_table, lens, 1.0)
    with pytest.raises(AssertionError, match="multiple"):
        dense_paged_decode_attention(query[:, :3].contiguous(), pages, block_table, lens, 1.0)
    with pytest.raises(AssertionError, match="pages"):
        dense_paged_decode_attention(query, pages[:, :, 0], block_table, lens, 1.0)


def test_native_half_dot_branch(monkeypatch):
    """The GPU branch (fp16 operands, fp32 accumulation) run under the interpreter, whose fp16 dot is right."""
    if not interpreted():
        pytest.skip("checks the GPU code path on CPU; on a GPU the other tests run it")
    from attentionpack_vllm.kernels import dense_paged_triton
    monkeypatch.setattr(dense_paged_triton, "_interpreted", lambda: False)
    check(8, 2, 64, 16, [1, 7, 40], torch.float16)
    check(4, 4, 32, 32, [33, 64], torch.float16)
