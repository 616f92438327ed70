"""The vLLM attention backend: declarations, per-step metadata, and the layer forward.

Thin glue over the plain modules: the builder maps the batch's requests to slots and
splits decode rows from prefill rows once per step; `forward` unpacks that and calls
`prefill_request` / `decode_step` with the layer's pages and slot pool. The cache
write happens inside `forward` (`forward_includes_kv_cache_update`), where the
per-request boundaries that compression needs are known.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from vllm.config import VllmConfig, get_current_vllm_config, get_current_vllm_config_or_none
from vllm.logger import init_logger
from vllm.v1.attention.backend import (AttentionBackend, AttentionImpl, AttentionLayer,
                                       AttentionMetadataBuilder, AttentionType,
                                       CommonAttentionMetadata, MultipleOf)
from vllm.v1.kv_cache_interface import AttentionSpec

from . import runtime
from .decode import decode_and_fold, schedule_decode
from .factorize import describe as describe_factorisation
from .kernels.decode_inputs import DecodeBatch
from .memory import MemoryReport
from .paged_store import FoldBatch
from .plugin import install_worker_hooks
from .prefill import prefill_request
from .slot_pool import SlotPool
from .windows import WindowTracker

logger = init_logger("vllm.attentionpack")
DECODE_KERNEL_NAMES = {"triton": "Triton kernel", "cpu": "compiled CPU kernel",
                       "torch": "PyTorch latent-space path"}


class AttentionPackBackend(AttentionBackend):
    """AttentionPack: low-rank paged KV records, latent-space decode."""

    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]

    @staticmethod
    def get_name() -> str:
        # vLLM maps the name back to an enum member; ours is registered as CUSTOM.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["AttentionPackImpl"]:
        return AttentionPackImpl

    @staticmethod
    def get_builder_cls() -> type["AttentionPackMetadataBuilder"]:
        return AttentionPackMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any head size

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        return kv_cache_dtype in (None, "auto")

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        # We ask for vLLM's multimodal ranges to find image tokens; attention stays causal.
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Pages hold one record per token instead of K and V per KV head."""
        if spec.state_content_bytes is not None:
            return spec
        vllm_config = get_current_vllm_config_or_none()
        plan = runtime.plan_for(vllm_config, spec.num_kv_heads, spec.head_size)
        record_bytes = MemoryReport.of(plan, spec.dtype).record_bytes
        return dataclasses.replace(spec, num_head_slots=1, state_content_bytes=record_bytes)


@dataclass
class AttentionPackMetadata:
    num_actual_tokens: int
    query_start_loc: list[int]          # [num_reqs + 1], host
    context_lens: list[int]             # [num_reqs] tokens cached before this step
    block_table: torch.Tensor           # [num_reqs, max_blocks] int32, device
    slot_ids: list[int]                 # [num_reqs] host (empty on profiling runs)
    decode: DecodeBatch | None          # the decode rows' step inputs, shared by every layer
    decode_tokens: slice | torch.Tensor  # their tokens in the batch
    folds: FoldBatch | None             # windows that fill in this step and fold after it
    prefill_rows: list[int]
    prefill_exact_lens: dict[int, int]  # prefill row -> exact rows (sinks + window) it held
    image_masks: dict[int, torch.Tensor]  # prefill row -> [query_len] bool
    is_profiling: bool                  # rows that belong to no request (dummy runs)
    fresh_rows: torch.Tensor | None = None  # arena rows handed out this step, zeroed by every layer first


class AttentionPackMetadataBuilder(AttentionMetadataBuilder[AttentionPackMetadata]):
    """Per-step metadata, once for all layers: row kinds, slots, the decode batch and its folds.

    The host-side exact-row lengths of every slot (sinks and window) live here
    (`WindowTracker`): the builder sees every step, so it decides which windows fold
    without reading the device.
    """

    # Decode rows (one new token) first, so their tokens are one slice of the batch.
    reorder_batch_threshold: int = 1

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str],
                 vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.device = device
        self.runner = runtime.current_runner()  # names the batch rows (legacy model runner)
        config = runtime.active_config(vllm_config)
        self.plan = runtime.plan_for(vllm_config, kv_cache_spec.num_kv_heads, kv_cache_spec.head_size)
        self.block_size = kv_cache_spec.block_size
        num_slots = runtime.num_request_slots(vllm_config)
        self.windows = WindowTracker.for_plan(num_slots, self.plan)
        self.rows = runtime.row_allocator(self.plan, num_slots, device, vllm_config)
        self.tokens = np.zeros((num_slots, 2), dtype=np.int64)  # each slot's (text, image) tokens so far
        # Only the PyTorch path reads the padded gather index (the kernels read in place).
        self.with_index = runtime.decode_kernel_name(config, device, vllm_config.model_config.dtype) == "torch"

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> AttentionPackMetadata:
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        starts = cm.query_start_loc_cpu[: num_reqs + 1].numpy().astype(np.int64)
        qsl = starts.tolist()
        # The runners give host sequence lengths; only a batch without them reads the device's.
        seq_lens_host = (cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None
                         else cm.seq_lens)[:num_reqs].cpu().numpy()
        # Host arrays over the batch's rows (numpy: no Python loop over requests).
        query_lens = np.diff(starts)
        context_lens = seq_lens_host - query_lens
        slots = runtime.slots_for_rows(self.runner, cm.req_idx, num_reqs)
        block_table = cm.block_table_tensor[:num_reqs]
        md = AttentionPackMetadata(
            num_actual_tokens=cm.num_actual_tokens, query_start_loc=qsl, context_lens=context_lens.tolist(),
            block_table=block_table, slot_ids=slots or [], decode=None, decode_tokens=slice(0, 0),
            folds=None, prefill_rows=[], prefill_exact_lens={}, image_masks={},
            is_profiling=slots is None)
        if slots is None:
            return md
        slot_of = np.asarray(slots, dtype=np.int64)
        decoding = (query_lens == 1) & (context_lens > 0)
        decode_rows = np.flatnonzero(decoding)
        prefill_rows = np.flatnonzero((query_lens > 0) & ~decoding)
        md.prefill_rows = prefill_rows.tolist()
        ranges = cm.mm_req_doc_ranges or {}
        # Exact rows each scheduled request holds before this step (none for a new one).
        held = np.where(context_lens > 0, self.windows.lengths[slot_of], 0)
        md.fresh_rows = self._hand_out_rows(slot_of, held, decode_rows, prefill_rows, ranges, context_lens,
                                            seq_lens_host)
        # Prefill chunks fold what is left in their window first; then only sinks remain.
        md.prefill_exact_lens = dict(zip(md.prefill_rows, held[prefill_rows].tolist()))
        self.windows.prefilled(slot_of[prefill_rows], seq_lens_host[prefill_rows])
        if decode_rows.size:
            md.decode, md.folds = self._decode_inputs(decode_rows, block_table, slot_of, seq_lens_host)
            if decode_rows[-1] == decode_rows.size - 1 and qsl[decode_rows.size - 1] == decode_rows.size - 1:
                md.decode_tokens = slice(0, decode_rows.size)  # rows 0..n-1, one token each
            else:
                md.decode_tokens = torch.from_numpy(starts[decode_rows]).to(self.device)
        md.image_masks = self._image_masks(ranges, md.prefill_rows, context_lens, seq_lens_host)
        return md

    def _hand_out_rows(self, slot_of: np.ndarray, held: np.ndarray, decode_rows: np.ndarray,
                       prefill_rows: np.ndarray, ranges: dict, context_lens: np.ndarray,
                       seq_lens: np.ndarray) -> torch.Tensor | None:
        """Fit every scheduled request's arena rows to what this step uses (`row_pool`): first
        the windows that folded give rows back, then the step's rows are taken. Arrays over
        the batch's rows; `held`: each row's exact rows before the step. Returns the rows
        handed out fresh (device), or None."""
        new = prefill_rows[context_lens[prefill_rows] == 0]
        self.tokens[slot_of[new]] = 0
        # Image tokens of each prefill chunk (vLLM's ranges are per row; prefill rows are few).
        image = np.array([_count_in_spans(ranges.get(row), context_lens[row], seq_lens[row])
                          for row in prefill_rows.tolist()], dtype=np.int64)
        chunk = seq_lens[prefill_rows] - context_lens[prefill_rows]
        self.tokens[slot_of[prefill_rows]] += np.stack([chunk - image, image], 1)
        self.tokens[slot_of[decode_rows], 0] += 1
        scheduled = np.concatenate([decode_rows, prefill_rows])
        slots, exact = slot_of[scheduled], held[scheduled]
        text, image = self.tokens[slots, 0], self.tokens[slots, 1]
        self.rows.fit_many(slots, text, image, exact, grow=False)
        decoding = np.arange(scheduled.size) < decode_rows.size
        during = np.where(decoding, exact + 1,
                          np.maximum(exact, np.minimum(self.plan.sink_tokens, seq_lens[scheduled])))
        self.rows.fit_many(slots, text, image, during, grow=True)
        self.rows.sync()
        fresh = self.rows.take_fresh()
        return torch.tensor(fresh, dtype=torch.int64, device=self.device) if fresh else None

    def _decode_inputs(self, rows: np.ndarray, block_table: torch.Tensor, slot_of: np.ndarray,
                       seq_lens: np.ndarray) -> tuple[DecodeBatch, FoldBatch | None]:
        if rows[-1] != rows.size - 1:  # not rows 0..n-1
            block_table = block_table[torch.from_numpy(rows).to(block_table.device)]
        else:
            block_table = block_table[:rows.size]
        return schedule_decode(self.windows, self.plan, block_table, slot_of[rows].tolist(),
                               seq_lens[rows].tolist(), self.block_size, with_index=self.with_index)

    def _image_masks(self, ranges: dict, rows: list[int], context_lens: np.ndarray,
                     seq_lens: np.ndarray) -> dict[int, torch.Tensor]:
        """Prefill row -> [query_len] bool, True at image tokens (vLLM's ranges are inclusive)."""
        masks = {}
        for row in rows:
            spans = ranges.get(row)
            if spans:
                pos = torch.arange(context_lens[row], seq_lens[row])
                mask = torch.zeros_like(pos, dtype=torch.bool)
                for start, end in spans:
                    mask |= (pos >= start) & (pos <= end)
                masks[row] = mask.to(self.device)
        return masks


def _count_in_spans(spans, start: int, end: int) -> int:
    """Positions of [start, end) inside the inclusive spans (vLLM's image ranges)."""
    return sum(max(0, min(hi + 1, end) - max(lo, start)) for lo, hi in spans or ())


class AttentionPackImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks: torch.Tensor | None = None,
                 **unused) -> None:
        refused = {"alibi_slopes": alibi_slopes, "sliding_window": sliding_window,
                   "logits_soft_cap": logits_soft_cap, "sinks": sinks,
                   "kv_sharing_target_layer_name": kv_sharing_target_layer_name}
        refused = [name for name, value in refused.items() if value]
        if attn_type != AttentionType.DECODER:
            refused.append(f"attn_type={attn_type}")
        if refused:
            raise ValueError(f"AttentionPack does not support this layer's {', '.join(refused)}; "
                             "serve this model with another --attention-backend")
        self.num_heads, self.head_size, self.num_kv_heads = num_heads, head_size, num_kv_heads
        self.scale = float(scale)
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = None
        install_worker_hooks()
        vllm_config = get_current_vllm_config()
        self.config = runtime.active_config(vllm_config)
        self.plan = runtime.plan_for(vllm_config, num_kv_heads, head_size)
        self.num_slots = runtime.num_request_slots(vllm_config)
        self.device = vllm_config.device_config.device
        self.rows = runtime.row_allocator(self.plan, self.num_slots, self.device, vllm_config)
        self.pool: SlotPool | None = None
        kernel = runtime.decode_kernel_name(self.config, self.device, vllm_config.model_config.dtype)
        self.decode_attention = runtime.decode_attention_for(kernel)
        self.prefill_attention = runtime.prefill_attention_for(self.device)
        logger.info_once("AttentionPack: decode with the %s", DECODE_KERNEL_NAMES[kernel])
        if kernel == "torch" and self.config.decode_kernel == "auto" and str(self.device).startswith("cpu"):
            logger.warning_once("AttentionPack: the compiled CPU decode kernel is unavailable (%s); "
                                "decoding with the slower PyTorch path",
                                runtime.cpu_kernel_unavailable(self.config, vllm_config.model_config.dtype))
        logger.info_once("AttentionPack: prefill attention with %s",
                         "vLLM's CPU attention kernel" if "cpu_attention" in self.prefill_attention.__module__
                         else "PyTorch SDPA")
        logger.info_once("AttentionPack: factorisation %s", describe_factorisation(self.plan.svd, self.device))

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        # Allocated here, before vLLM sizes the KV cache, so the pools are counted.
        if self.pool is None:
            maps = (self.rows.num_rows, self.rows.device_maps)
            self.pool = SlotPool.allocate(self.plan, self.num_slots, act_dtype, self.device, maps)
            runtime.register_pool_bytes(self.pool.nbytes())

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: AttentionPackMetadata | None,
                output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        """query: [num_tokens, num_heads, head_size]; key, value: [num_tokens, num_kv_heads,
        head_size]; kv_cache: [num_blocks, 1, block_size, record_width]; output:
        [num_tokens, num_heads, head_size]."""
        if output_scale is not None or output_block_scale is not None:
            raise ValueError("AttentionPack does not support fused output quantization")
        if attn_metadata is None:
            return output  # warm-up
        md = attn_metadata
        if self.pool is None:
            self.process_weights_after_loading(query.dtype)
        width = self.plan.kv_width
        pages = kv_cache.view(kv_cache.shape[0], kv_cache.shape[-2], kv_cache.shape[-1])
        pages = pages.view(self.plan.page_dtype(pages.dtype))  # int8 storage: rows of bytes
        keys, values = key.reshape(-1, width), value.reshape(-1, width)
        qsl = md.query_start_loc
        if md.is_profiling:
            for row in range(len(qsl) - 1):
                tokens = slice(qsl[row], qsl[row + 1])
                output[tokens] = self.prefill_attention(query[tokens], keys[tokens], values[tokens], self.scale)
            return output
        if md.fresh_rows is not None:
            self.pool.clear_rows(md.fresh_rows)
        if md.decode is not None:
            idx = md.decode_tokens
            output[idx] = decode_and_fold(
                query[idx], keys[idx], values[idx], pages, self.pool, self.plan, md.decode, md.folds,
                self.scale, attention=self.decode_attention)
        for row in md.prefill_rows:
            tokens = slice(qsl[row], qsl[row + 1])
            n = qsl[row + 1] - qsl[row]
            is_image = md.image_masks.get(row)
            if is_image is None:
                is_image = torch.zeros(n, dtype=torch.bool, device=query.device)
            else:
                logger.info_once("AttentionPack: image tokens found in a prompt; they get "
                                 "their own key and value bases")
            output[tokens] = prefill_request(
                query[tokens], keys[tokens], values[tokens], is_image, pages, self.pool, self.plan,
                md.slot_ids[row], md.block_table[row], md.context_lens[row],
                md.prefill_exact_lens[row], self.scale, attention=self.prefill_attention)
        return output
