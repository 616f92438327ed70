"""Per-request state beside the pages: bases and the full-rank window, one slot per request.

One pool per layer, allocated once. A slot holds, for its request, the key and value
bases of each modality the plan has (text only, or text and image; zero rows past a
segment's rank) and its exact rows at full precision: the sink tokens (the request's
first `sink_tokens`), then the window of newest decode tokens, with those tokens'
importance scores. How many exact rows are valid is host-side state
(`windows.WindowTracker`), the same for every layer. `reset` clears everything a
previous request left.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import CompressionPlan


@dataclass
class SlotPool:
    basis_k: torch.Tensor             # [num_slots, M, rank_k, kv_width] (M = plan.num_modalities)
    basis_v: torch.Tensor             # [num_slots, M, rank_v, kv_width]
    window_k: torch.Tensor            # [num_slots, exact_rows, kv_width]: sinks, then window
    window_v: torch.Tensor            # [num_slots, exact_rows, kv_width]
    window_importance: torch.Tensor   # [num_slots, exact_rows] float32

    @classmethod
    def allocate(cls, plan: CompressionPlan, num_slots: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> "SlotPool":
        layout, width, window = plan.layout, plan.kv_width, plan.exact_rows
        zeros = lambda *shape, dt=dtype: torch.zeros(*shape, dtype=dt, device=device)  # noqa: E731
        return cls(
            basis_k=zeros(num_slots, plan.num_modalities, layout.rank_k, width),
            basis_v=zeros(num_slots, plan.num_modalities, layout.rank_v, width),
            window_k=zeros(num_slots, window, width),
            window_v=zeros(num_slots, window, width),
            window_importance=zeros(num_slots, window, dt=torch.float32),
        )

    @property
    def num_slots(self) -> int:
        return self.basis_k.shape[0]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.basis_k, self.basis_v, self.window_k, self.window_v, self.window_importance)

    def nbytes(self) -> int:
        """Bytes actually allocated by this pool."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @staticmethod
    def slot_bytes(plan: CompressionPlan, dtype: torch.dtype) -> int:
        """Bytes of one slot (what `allocate` takes per slot)."""
        item = torch.empty((), dtype=dtype).element_size()
        layout, width, window = plan.layout, plan.kv_width, plan.exact_rows
        elements = plan.num_modalities * (layout.rank_k + layout.rank_v) * width + 2 * window * width
        return elements * item + window * 4

    def reset(self, slot: int) -> None:
        """Forget everything about the slot's previous request."""
        for t in self.tensors():
            t[slot].zero_()
