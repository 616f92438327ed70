"""The decode step's cost in ops: a short fixed sequence per layer, no host reads.

Counted under a TorchDispatchMode (tests/op_counter.py) on the PyTorch path, which
runs the same structure as the Triton path around its kernels.
"""
import pytest
import torch

from attentionpack_vllm.config import AttentionPackConfig
from attentionpack_vllm.decode import decode_step, schedule_decode
from attentionpack_vllm.paged_store import fold_windows
from op_counter import OpCounter
from scenario import build_scenario, run_decode

# Per layer, plain step, batch 4, 16-bit storage (measured 32: 25 before the slot rows went
# through maps, which add an index_select per row tensor and the append's arena rows).
MAX_WORKING_OPS = 45
# int8 storage (the default): scaling the records, bases and windows, quantizing the new
# key and value rows together (measured 26 more: 58 against 32).
INT8_EXTRA_OPS = 30


def scenario_at(batch: int, *, window: int, with_images: bool, **settings):
    config = AttentionPackConfig.from_dict({"rank": 16, "window_size": window, **settings})
    lens = [37, 5, 64, 18] * (batch // 4)
    spans = [[(3, 20)], [], [(0, 15)], []] * (batch // 4) if with_images else None
    return build_scenario(config, num_kv_heads=2, head_size=32, prompt_lens=lens, image_spans=spans,
                          max_new_tokens=2 * window, has_image=with_images)


def next_step(sc):
    """Inputs of one more decode step, and its metadata (made outside the counted block)."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(sc.batch, 4, 32, generator=gen)
    k, v = torch.randn(sc.batch, 64, generator=gen), torch.randn(sc.batch, 64, generator=gen)
    sc.seq_lens = [s + 1 for s in sc.seq_lens]
    batch, folds = schedule_decode(sc.tracker, sc.plan, sc.block_table, sc.slot_ids.tolist(),
                                   sc.seq_lens, sc.pages.shape[1])
    return q, k, v, batch, folds


@pytest.mark.parametrize("storage", ["auto", "int8"])
@pytest.mark.parametrize("with_images", [False, True])
@pytest.mark.parametrize("partial", [False, True])
def test_plain_step_reads_nothing_back_and_stays_short(with_images, partial, storage):
    sc = scenario_at(4, window=8, with_images=with_images, partial_rank_values=partial, storage=storage)
    for _ in run_decode(sc, 4, steps=2, oracle=False):
        pass
    q, k, v, batch, folds = next_step(sc)
    assert folds is None
    with OpCounter() as counter:
        decode_step(q, k, v, sc.pages, sc.pool, sc.plan, batch, 0.2)
    assert counter.host_reads == 0, counter.working_ops()
    # Partial rank adds the importance EMA and the per-token column selection.
    limit = MAX_WORKING_OPS if not partial else MAX_WORKING_OPS + 20
    limit += INT8_EXTRA_OPS if storage == "int8" else 0
    assert counter.working <= limit, counter.working_ops()


@pytest.mark.parametrize("storage", ["auto", "int8"])
@pytest.mark.parametrize("partial", [False, True])
def test_fold_step_ops_do_not_grow_with_the_batch(partial, storage):
    counts = {}
    for size in (4, 16):
        sc = scenario_at(size, window=3, with_images=True, partial_rank_values=partial, storage=storage)
        for _ in run_decode(sc, 4, steps=2, oracle=False):
            pass
        q, k, v, batch, folds = next_step(sc)
        assert folds is not None and folds.size == size  # every window fills at this step
        with OpCounter() as counter:
            decode_step(q, k, v, sc.pages, sc.pool, sc.plan, batch, 0.2)
            fold_windows(sc.pages, sc.pool, sc.plan, folds)
        counts[size] = counter.working
    assert counts[16] <= 1.2 * counts[4], counts
