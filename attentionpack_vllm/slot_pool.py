"""Per-request state beside the pages: bases and the full-rank window, one slot per request.

One pool per layer, allocated once. A slot holds, for its request, the key and value
bases of each modality the plan has (text only, or text and image; zero rows past a
segment's rank) and its exact rows at full precision: the sink tokens (the request's
first `sink_tokens`), then the window of newest decode tokens, with those tokens'
importance scores. How many exact rows are valid is host-side state
(`windows.WindowTracker`), the same for every layer. `reset` clears everything a
previous request left.

With int8 storage (`plan.int8`) the bases and exact rows are int8 with one float32
scale per row and KV head (`scales`); `read` and `write` convert, so callers never
see the format.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kernels.storage import dequantize, quantize, take_rows
from .plan import CompressionPlan

ROW_TENSORS = ("basis_k", "basis_v", "window_k", "window_v")


@dataclass
class SlotPool:
    basis_k: torch.Tensor             # [num_slots, M, rank_k, kv_width] (M = plan.num_modalities)
    basis_v: torch.Tensor             # [num_slots, M, rank_v, kv_width]
    window_k: torch.Tensor            # [num_slots, exact_rows, kv_width]: sinks, then window
    window_v: torch.Tensor            # [num_slots, exact_rows, kv_width]
    window_importance: torch.Tensor   # [num_slots, exact_rows] float32
    # int8 storage: name in ROW_TENSORS -> float32 scales [..rows.., num_kv_heads]; else empty.
    scales: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def allocate(cls, plan: CompressionPlan, num_slots: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> "SlotPool":
        layout, width, window = plan.layout, plan.kv_width, plan.exact_rows
        row_dtype = torch.int8 if plan.int8 else dtype
        zeros = lambda *shape, dt=row_dtype: torch.zeros(*shape, dtype=dt, device=device)  # noqa: E731
        pool = cls(
            basis_k=zeros(num_slots, plan.num_modalities, layout.rank_k, width),
            basis_v=zeros(num_slots, plan.num_modalities, layout.rank_v, width),
            window_k=zeros(num_slots, window, width),
            window_v=zeros(num_slots, window, width),
            window_importance=zeros(num_slots, window, dt=torch.float32),
        )
        if plan.int8:
            pool.scales = {name: zeros(*getattr(pool, name).shape[:-1], plan.num_kv_heads, dt=torch.float32)
                           for name in ROW_TENSORS}
        return pool

    @property
    def num_slots(self) -> int:
        return self.basis_k.shape[0]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.basis_k, self.basis_v, self.window_k, self.window_v, self.window_importance,
                *self.scales.values())

    def nbytes(self) -> int:
        """Bytes actually allocated by this pool."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def read(self, name: str, index) -> torch.Tensor:
        """Rows `getattr(self, name)[index]` as float32 (`name` in ROW_TENSORS; `index`
        selects whole rows)."""
        rows = _read_rows(getattr(self, name), index)
        scale = self.scales.get(name)
        return rows.float() if scale is None else dequantize(rows, _read_rows(scale, index))

    def write(self, name: str, index, rows: torch.Tensor) -> None:
        """Store float rows [..., kv_width] at `getattr(self, name)[index]`."""
        target = getattr(self, name)
        scale = self.scales.get(name)
        if scale is None:
            target[index] = rows.to(target.dtype)
            return
        q, s = quantize(rows, scale.shape[-1])
        target[index] = q
        scale[index] = s

    def write_window(self, index, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store float key and value rows [..., kv_width] at `window_k[index]` and
        `window_v[index]` (int8: one quantize for both, the decode step's append)."""
        if not self.scales:
            self.write("window_k", index, keys)
            self.write("window_v", index, values)
            return
        q, s = quantize(torch.stack([keys, values]), self.scales["window_k"].shape[-1])
        for i, name in enumerate(("window_k", "window_v")):
            getattr(self, name)[index] = q[i]
            self.scales[name][index] = s[i]

    @staticmethod
    def slot_bytes(plan: CompressionPlan, dtype: torch.dtype) -> int:
        """Bytes of one slot (what `allocate` takes per slot)."""
        item = 1 if plan.int8 else torch.empty((), dtype=dtype).element_size()
        layout, width, window = plan.layout, plan.kv_width, plan.exact_rows
        rows = plan.num_modalities * (layout.rank_k + layout.rank_v) + 2 * window
        scales = rows * plan.num_kv_heads * 4 if plan.int8 else 0
        return rows * width * item + scales + window * 4

    def reset(self, slot: int) -> None:
        """Forget everything about the slot's previous request."""
        for t in self.tensors():
            t[slot].zero_()


def _read_rows(t: torch.Tensor, index) -> torch.Tensor:
    """t[index]; an index that starts with a tensor of slots and goes on with plain
    indices or slices reads the slots through `take_rows` (fast on CPU) first."""
    if isinstance(index, torch.Tensor):
        return take_rows(t, index)
    if (isinstance(index, tuple) and isinstance(index[0], torch.Tensor)
            and not any(isinstance(i, torch.Tensor) for i in index[1:])):
        return take_rows(t, index[0])[(slice(None),) * index[0].dim() + index[1:]]
    return t[index]
