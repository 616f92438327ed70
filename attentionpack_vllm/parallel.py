"""Tensor and pipeline parallelism: what each vLLM worker holds, and the startup lines that say so.

With `--tensor-parallel-size T` every worker runs the attention of its own shard of a
layer's KV heads (vLLM gives each `total // T` heads, or one replicated head when
T exceeds the KV heads). AttentionPack then works per worker, like the rest of the
engine: each worker factorises the keys and values of its shard (heads concatenated
within the shard), keeps its own slot pool and request-to-slot map, and frees slots
when the scheduler output it receives names finished or preempted requests.

`rank` (and the four per-modality ranks) therefore apply **per shard**: at the same
rank, T shards keep T times the directions of one worker (fewer where a rank is clamped
to the shard's width). Per layer and token the records of all shards take T times
the bytes of a single-worker record, against the same dense bytes, so the saving
over dense is T times smaller; the per-request bases add up to the same total (each
shard's bases are 1/T as wide; more where heads are replicated). The reconstruction
error of a prompt's (exact) SVD is at most that of one whole-layer basis of the same
rank: the best rank-r basis of the whole layer, cut to a shard's columns, is one
rank-r basis of that shard, and each shard's SVD finds the best one. To spend the
single-worker bytes instead, divide `rank` by T: together the shards then hold a
block-diagonal rank-r basis, at most as good as the whole layer's.

With `--pipeline-parallel-size P` each worker holds the layers of its stage only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WorkerShape:
    """What one worker of a (tensor x pipeline)-parallel engine holds of the model."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    total_kv_heads: int
    kv_heads: int                   # KV heads of one worker's shard
    stage_layers: tuple[int, ...]   # decoder layers of each pipeline stage

    @classmethod
    def of(cls, model_config: Any, parallel: Any = None) -> "WorkerShape":
        """`parallel`: anything with `tensor_parallel_size` and `pipeline_parallel_size`
        (vLLM's ParallelConfig, or the EngineArgs before it exists); None: one worker."""
        tp = int(getattr(parallel, "tensor_parallel_size", 1) or 1)
        pp = int(getattr(parallel, "pipeline_parallel_size", 1) or 1)
        total_heads = int(model_config.get_total_num_kv_heads())
        layers = int(model_config.hf_text_config.num_hidden_layers)
        if pp > 1:
            from vllm.distributed.utils import get_pp_indices
            stages = tuple(end - start for start, end in
                           (get_pp_indices(layers, rank, pp) for rank in range(pp)))
        else:
            stages = (layers,)
        # vLLM's own split (ModelConfig.get_num_kv_heads): at least one head, replicated.
        return cls(tp, pp, total_heads, max(1, total_heads // tp), stages)

    @property
    def workers(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def worker_layers(self) -> int:
        """Layers of the largest stage: the worker whose budget binds."""
        return max(self.stage_layers)

    @property
    def total_layers(self) -> int:
        return sum(self.stage_layers)

    @property
    def replicated(self) -> bool:
        return self.tensor_parallel_size > self.total_kv_heads

    def total(self, per_layer: int) -> int:
        """A per-worker, per-layer figure summed over every worker and the layers it holds."""
        return per_layer * self.tensor_parallel_size * self.total_layers

    def describe(self, report: Any, plan: Any) -> list[str]:
        """The startup lines for more than one worker: the shard, per-worker and total bytes."""
        tp = self.tensor_parallel_size
        if tp == 1:
            heads, ranks = f"all {self.total_kv_heads} KV heads (width {plan.kv_width})", ""
        else:
            shard = (f"1 of {self.total_kv_heads} KV heads (replicated: tensor parallel "
                     f"{tp} > {self.total_kv_heads} KV heads)" if self.replicated
                     else f"{self.kv_heads} of {self.total_kv_heads} KV heads")
            heads = (f"its own shard, {shard} (heads concatenated within the shard: width "
                     f"{plan.kv_width})")
            ranks = (f"; ranks apply per shard, so a layer keeps up to {tp}x the directions "
                     "of one worker at the same rank")
        layers = (f"{self.total_layers} layers" if self.pipeline_parallel_size == 1 else
                  f"the layers of its pipeline stage ({'/'.join(map(str, self.stage_layers))})")
        return [
            f"AttentionPack on {self.workers} workers (tensor parallel {tp} x pipeline "
            f"parallel {self.pipeline_parallel_size}): each worker compresses {heads}, in "
            f"{layers}{ranks}",
            f"AttentionPack bytes per token: {report.record_bytes * self.worker_layers} per "
            f"worker ({self.worker_layers} layers; dense "
            f"{report.dense_token_bytes * self.worker_layers}), "
            f"{self.total(report.record_bytes)} on all {self.workers} workers (dense "
            f"{self.total(report.dense_token_bytes)}); bytes per request beside its records, at "
            f"most: {report.slot_bytes * self.worker_layers} per worker, "
            f"{self.total(report.slot_bytes)} on all workers",
        ]

    def describe_capacity(self, report: Any, tokens: int, pool_bytes_per_layer: int) -> str:
        records = tokens * self.total(report.record_bytes)
        pools = self.total(pool_bytes_per_layer)
        return (f"AttentionPack KV cache on all {self.workers} workers: {tokens} tokens in "
                f"{records} bytes of records plus {pools} bytes of slot pools "
                f"({records + pools} bytes; the lines above are per worker)")
