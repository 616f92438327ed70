"""AttentionPack inside a transformers model, for quality measurements without vLLM.

A custom attention function, registered with transformers' `AttentionInterface`
under the name "attentionpack", hands every decoder attention call to the cache
object that is active (`active(cache)`), one request at a time (batch 1):

* `PackedCache`: AttentionPack's own state per layer (paged records + one-slot
  `SlotPool`, block table with shuffled blocks). A multi-token call with no context
  goes through `prefill_request` (exact attention, then compression); a later
  multi-token call is a prefill chunk over the compressed context; a one-token call
  goes through `decode_step` (latent-space attention, importance EMA, window folds).
* `DenseCache`: plain exact attention over every key and value seen so far (the same
  `causal_attention` the prefill uses), the reference.
* `Fp8DenseCache`: the same over keys and values rounded to fp8, as vLLM's fp8 KV
  cache stores them.
* `CaptureCache`: exact attention, and it keeps the post-RoPE keys and values of
  chosen layers (heads concatenated, as vLLM hands them to the backend).

Keys reach the function after RoPE, exactly where vLLM's attention backend gets them.
transformers builds no attention mask for an implementation it has no mask function
for, so causality is the cache's business (prefill is causal; decode is one token).
Attention modules that are not causal decoder layers (a CLIP vision tower) fall
back to SDPA.
"""
from __future__ import annotations

import contextlib

import torch

from attentionpack_vllm.config import AttentionPackConfig
from attentionpack_vllm.decode import decode_and_fold, schedule_decode
from attentionpack_vllm.factorize import directions_in_use
from attentionpack_vllm.kernels.layout import TEXT
from attentionpack_vllm.plan import CompressionPlan
from attentionpack_vllm.prefill import causal_attention, prefill_request
from attentionpack_vllm.slot_pool import SlotPool
from attentionpack_vllm.windows import WindowTracker

IMPLEMENTATION = "attentionpack"
_active: list = []


class DenseCache:
    """Exact attention over everything seen so far (one request)."""

    name = "dense"

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def attend(self, layer: int, query, keys, values, scale, is_image=None):
        if self.keys[layer] is not None:
            keys = torch.cat([self.keys[layer], keys])
            values = torch.cat([self.values[layer], values])
        self.keys[layer], self.values[layer] = keys, values
        return causal_attention(query, keys, values, scale)


class Fp8DenseCache(DenseCache):
    """Exact attention over keys and values rounded to fp8 e4m3 as they are cached, with
    scale 1 and saturation at +-448: what vLLM's `--kv-cache-dtype fp8` stores by default
    (no calibrated scales). The new tokens' own keys and values are rounded too."""

    name = "dense-fp8"
    FP8_MAX = 448.0

    @classmethod
    def round(cls, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-cls.FP8_MAX, cls.FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)

    def attend(self, layer: int, query, keys, values, scale, is_image=None):
        return super().attend(layer, query, self.round(keys), self.round(values), scale)


class CaptureCache(DenseCache):
    """Exact attention; keeps the post-RoPE K/V of `layers` (heads concatenated)."""

    name = "capture"

    def __init__(self, num_layers: int, layers):
        super().__init__(num_layers)
        self.layers = set(layers)

    def captured(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer].float(), self.values[layer].float()

    def attend(self, layer, query, keys, values, scale, is_image=None):
        out = super().attend(layer, query, keys, values, scale)
        if layer not in self.layers:  # only the chosen layers are kept
            self.keys[layer] = self.values[layer] = None
        return out


class PackedCache:
    """AttentionPack state of one request in every layer, driven like the vLLM backend.

    `is_image` (a [num_tokens] bool tensor or None) marks image tokens of the next
    forward call's prefill; decode tokens are text.
    """

    name = "attentionpack"

    def __init__(self, config: AttentionPackConfig, num_layers: int, num_kv_heads: int,
                 head_size: int, max_tokens: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, seed: int = 0, has_image: bool = False):
        self.config = config
        # A text-only model gets text-only slots, as in vLLM; set `has_image` to pass image masks.
        self.plan = CompressionPlan.build(config, num_kv_heads, head_size, has_image=has_image)
        num_blocks = -(-max_tokens // block_size)
        gen = torch.Generator().manual_seed(seed)
        # Blocks in shuffled order, with spare blocks, as vLLM's allocator hands them out.
        total = num_blocks + 3
        self.block_table = torch.randperm(total, generator=gen)[:num_blocks].to(torch.int32)[None]
        self.slot = 1  # a slot other than 0, in a pool of two
        self.slot_ids = torch.tensor([self.slot], dtype=torch.int32)
        self.pages = [torch.zeros(total, block_size, self.plan.layout.width, dtype=self.plan.page_dtype(dtype))
                      for _ in range(num_layers)]
        self.pools = [SlotPool.allocate(self.plan, 2, dtype) for _ in range(num_layers)]
        self.seq_lens = [0] * num_layers
        # Each layer sees the same steps; one window tracker per layer keeps them independent.
        self.windows = [WindowTracker.for_plan(2, self.plan) for _ in range(num_layers)]
        self.max_tokens = max_tokens
        self.is_image: torch.Tensor | None = None

    def text_ranks_kept(self) -> dict[str, float]:
        """Mean over layers of the text basis rows in use (K and V): below the text rank
        only with `rank_text_energy`, or while a request has fewer tokens than its rank."""
        kept = lambda name: sum(  # noqa: E731
            int(directions_in_use(p.read(name, (self.slot, TEXT)))) for p in self.pools) / len(self.pools)
        return {"key": kept("basis_k"), "value": kept("basis_v")}

    def attend(self, layer, query, keys, values, scale, is_image=None):
        n, ctx = query.shape[0], self.seq_lens[layer]
        if ctx + n > self.max_tokens:
            raise RuntimeError(f"PackedCache holds {self.max_tokens} tokens; {ctx + n} asked for")
        pages, pool = self.pages[layer], self.pools[layer]
        if n == 1 and ctx > 0:
            batch, folds = schedule_decode(self.windows[layer], self.plan, self.block_table, [self.slot],
                                           [ctx + 1], pages.shape[1])
            out = decode_and_fold(query, keys, values, pages, pool, self.plan, batch, folds, scale)
        else:
            mask = self.is_image
            if mask is None:
                mask = torch.zeros(n, dtype=torch.bool)
            out = prefill_request(query, keys, values, mask, pages, pool, self.plan, self.slot,
                                  self.block_table[0], ctx, self.windows[layer].length(self.slot), scale)
            self.windows[layer].prefilled([self.slot], [ctx + n])
        self.seq_lens[layer] = ctx + n
        return out


@contextlib.contextmanager
def active(caches):
    """Route the model's decoder attention through `caches` (one per batch row) inside the block."""
    _active.append(list(caches))
    try:
        yield caches
    finally:
        _active.pop()


def attention_function(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       **kwargs):
    """transformers attention hook: query [1, H, T, D], key/value [1, Hkv, T, D] (post-RoPE).

    Returns ([1, T, H, D], None) like the built-in implementations.
    """
    layer = getattr(module, "layer_idx", None)
    if not _active or layer is None or not getattr(module, "is_causal", False):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    caches = _active[-1]
    if query.shape[0] != len(caches):
        raise ValueError(f"batch of {query.shape[0]} rows for {len(caches)} caches")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    n = query.shape[2]
    outs = []
    for row, cache in enumerate(caches):  # each row is its own request with its own cache
        q = query[row].transpose(0, 1)                             # [T, H, D]
        k = key[row].transpose(0, 1).reshape(n, -1)                # [T, Hkv * D]
        v = value[row].transpose(0, 1).reshape(n, -1)
        outs.append(cache.attend(layer, q, k, v, scale))
    return torch.stack(outs).to(query.dtype), None


def register() -> str:
    """Register the hook with transformers (idempotent); returns the implementation name."""
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, attention_function)
    return IMPLEMENTATION


def load_causal_lm(path, dtype: torch.dtype = torch.float32):
    """A causal LM whose attention goes through the hook."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=register())
    return model.eval()


@torch.inference_mode()
def teacher_forced(model, ids: list[int], prefix: int, caches, progress=None,
                   prefill_chunk: int | None = None):
    """Score ids[prefix:] under each cache: the prefix prefilled in one call (or in calls
    of `prefill_chunk` tokens, as a chunked prefill feeds it), then one token per call.

    The same text runs as one batch row per cache (the weights are read once per step
    for all of them; every row's attention goes through its own cache). Each later
    token is fed alone (no transformers cache, explicit position), so every attention
    call after the prefill is a decode step. Returns (nll, top1), both
    [len(caches), len(ids) - prefix]: float64 NLL (nats) of each true next token, and
    the token each row ranks first at that position (for next-token agreement). The
    first column is predicted by the prefill.
    """
    rows = len(caches)
    ids_t = torch.tensor(ids)[None].expand(rows, -1)
    target = torch.tensor(ids)
    nll, top1 = [], []
    chunk = prefill_chunk or prefix
    with active(caches):
        for start in range(0, prefix, chunk):
            end = min(start + chunk, prefix)
            out = model(input_ids=ids_t[:, start:end],
                        position_ids=torch.arange(start, end)[None].expand(rows, -1),
                        use_cache=False, logits_to_keep=1)
        for t in range(prefix, len(ids)):
            logp = torch.log_softmax(out.logits[:, -1].double(), -1)
            nll.append(logp[:, target[t]].neg())
            top1.append(logp.argmax(-1))
            if t + 1 == len(ids):
                break
            out = model(input_ids=ids_t[:, t:t + 1], position_ids=torch.full((rows, 1), t),
                        use_cache=False)
            if progress is not None:
                progress(t + 1 - prefix, len(ids) - prefix)
    return torch.stack(nll, dim=1), torch.stack(top1, dim=1)


@torch.inference_mode()
def native_nll(model, ids: list[int], prefix: int) -> torch.Tensor:
    """NLL of ids[prefix:] from one ordinary forward (transformers' own SDPA attention)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        logits = model(input_ids=torch.tensor(ids)[None], use_cache=False).logits[0]
    finally:
        model.set_attn_implementation(previous)
    logp = torch.log_softmax(logits.double(), -1)[prefix - 1:-1]
    return logp.gather(1, torch.tensor(ids[prefix:])[:, None])[:, 0].neg()
