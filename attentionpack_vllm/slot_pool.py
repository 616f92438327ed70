"""Per-request state beside the pages: bases and the full-rank window, one slot per request.

One pool per layer, allocated once. A slot holds, for its request, the key and value
bases of each modality the plan has (text only, or text and image, each plane only as
many rows as its own rank: see `_planes`; zero rows past a segment's rank up to it) and
its exact rows at full precision: the sink tokens (the request's
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
    # Bases: [num_slots, M, rank, kv_width] views (M = plan.num_modalities, rank = the
    # record's, plan.layout), each plane holding its own rank's rows (`_planes`).
    basis_k: torch.Tensor
    basis_v: torch.Tensor
    window_k: torch.Tensor            # [num_slots, exact_rows, kv_width]: sinks, then window
    window_v: torch.Tensor            # [num_slots, exact_rows, kv_width]
    window_importance: torch.Tensor   # [num_slots, exact_rows] float32
    # int8 storage: name in ROW_TENSORS -> float32 scales [..rows.., num_kv_heads]; else empty.
    scales: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def allocate(cls, plan: CompressionPlan, num_slots: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> "SlotPool":
        width, window = plan.kv_width, plan.exact_rows
        row_dtype = torch.int8 if plan.int8 else dtype
        zeros = lambda *shape, dt=row_dtype: torch.zeros(*shape, dtype=dt, device=device)  # noqa: E731
        planes = lambda ranks, rows, columns, dt=row_dtype: _planes(  # noqa: E731
            num_slots, ranks, rows, columns, dt, device)
        ranks_k, ranks_v = plan.ranks_k[:plan.num_modalities], plan.ranks_v[:plan.num_modalities]
        layout = plan.layout
        pool = cls(
            basis_k=planes(ranks_k, layout.rank_k, width),
            basis_v=planes(ranks_v, layout.rank_v, width),
            window_k=zeros(num_slots, window, width),
            window_v=zeros(num_slots, window, width),
            window_importance=zeros(num_slots, window, dt=torch.float32),
        )
        if plan.int8:
            heads = plan.num_kv_heads
            pool.scales = {"basis_k": planes(ranks_k, layout.rank_k, heads, torch.float32),
                           "basis_v": planes(ranks_v, layout.rank_v, heads, torch.float32),
                           "window_k": zeros(num_slots, window, heads, dt=torch.float32),
                           "window_v": zeros(num_slots, window, heads, dt=torch.float32)}
        return pool

    @property
    def num_slots(self) -> int:
        return self.basis_k.shape[0]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.basis_k, self.basis_v, self.window_k, self.window_v, self.window_importance,
                *self.scales.values())

    def nbytes(self) -> int:
        """Bytes actually allocated by this pool (each tensor's whole buffer, the basis
        views' spare rows included)."""
        return sum(t.untyped_storage().nbytes() for t in self.tensors())

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
        planes = range(plan.num_modalities)
        rows = sum(plan.ranks_k[m] + plan.ranks_v[m] for m in planes) + 2 * plan.exact_rows
        return rows * _row_bytes(plan, dtype) + plan.exact_rows * 4

    @staticmethod
    def spare_bytes(plan: CompressionPlan, dtype: torch.dtype) -> int:
        """Bytes a pool holds beyond its slots: the spare rows at the end of the basis
        buffers when the last plane is narrower than a record's rank (see `_planes`)."""
        last = plan.num_modalities - 1
        rows = (plan.layout.rank_k - plan.ranks_k[last]) + (plan.layout.rank_v - plan.ranks_v[last])
        return rows * _row_bytes(plan, dtype)

    def reset(self, slot: int) -> None:
        """Forget everything about the slot's previous request: the elements the slot owns in
        every tensor, `stride(0)` of them from its first (a basis plane's rows past its rank
        belong to the next plane or slot and are left alone)."""
        for t in self.tensors():
            t.as_strided((t.stride(0),), (1,), t.storage_offset() + slot * t.stride(0)).zero_()


def _row_bytes(plan: CompressionPlan, dtype: torch.dtype) -> int:
    """Bytes of one basis or exact row: kv_width elements, plus one float32 scale per KV
    head with int8 storage."""
    if plan.int8:
        return plan.kv_width + plan.num_kv_heads * 4
    return plan.kv_width * torch.empty((), dtype=dtype).element_size()


def _planes(num_slots: int, ranks: tuple[int, ...], widest: int, columns: int, dtype: torch.dtype,
            device) -> torch.Tensor:
    """A [num_slots, len(ranks), widest, columns] view of per-modality basis planes over
    one zeroed buffer, in which each plane takes only its own rank's rows (`widest`: the
    record's rank, at least every plane's; the rows the decode reads).

    Plane m of a slot starts right after plane m - 1's own rows, so the view's rows past a
    plane's rank are the next plane's (or the next slot's) first rows, not zeros. Nothing
    takes them for that plane's data: every record's factor columns past its modality's
    rank are zero, and stores and folds touch a plane's own rows only. The buffer ends
    with widest - ranks[-1] spare rows, so the last slot's view stays inside it.
    """
    rows = sum(ranks)
    buffer = torch.zeros(num_slots * rows + widest - ranks[-1], columns, dtype=dtype, device=device)
    return buffer.as_strided((num_slots, len(ranks), widest, columns), (rows * columns, ranks[0] * columns, columns, 1))


def _read_rows(t: torch.Tensor, index) -> torch.Tensor:
    """t[index]; an index that starts with a tensor of slots and goes on with plain
    indices or slices reads the slots through `take_rows` (fast on CPU) first."""
    if isinstance(index, torch.Tensor):
        return take_rows(t, index)
    if (isinstance(index, tuple) and isinstance(index[0], torch.Tensor)
            and not any(isinstance(i, torch.Tensor) for i in index[1:])):
        return take_rows(t, index[0])[(slice(None),) * index[0].dim() + index[1:]]
    return t[index]
