"""Per-request state beside the pages: bases and the full-rank window, one slot per request.

One pool per layer, allocated once. A slot holds, for its request, the key and value
bases of each modality (zero rows past a segment's rank) and the window of newest
decode tokens at full rank. `reset` clears everything a previous request left.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels.layout import NUM_MODALITIES
from .plan import CompressionPlan


@dataclass
class SlotPool:
    basis_k: torch.Tensor      # [num_slots, 2, rank_k, kv_width]
    basis_v: torch.Tensor      # [num_slots, 2, rank_v, kv_width]
    window_k: torch.Tensor     # [num_slots, window_size, kv_width]
    window_v: torch.Tensor     # [num_slots, window_size, kv_width]
    window_lens: torch.Tensor  # [num_slots] int32: valid tokens in the window

    @classmethod
    def allocate(cls, plan: CompressionPlan, num_slots: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> "SlotPool":
        layout, width, window = plan.layout, plan.kv_width, plan.window_size
        zeros = lambda *shape, dt=dtype: torch.zeros(*shape, dtype=dt, device=device)  # noqa: E731
        return cls(
            basis_k=zeros(num_slots, NUM_MODALITIES, layout.rank_k, width),
            basis_v=zeros(num_slots, NUM_MODALITIES, layout.rank_v, width),
            window_k=zeros(num_slots, window, width),
            window_v=zeros(num_slots, window, width),
            window_lens=zeros(num_slots, dt=torch.int32),
        )

    @property
    def num_slots(self) -> int:
        return self.basis_k.shape[0]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.basis_k, self.basis_v, self.window_k, self.window_v, self.window_lens)

    def nbytes(self) -> int:
        """Bytes actually allocated by this pool."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reset(self, slot: int) -> None:
        """Forget everything about the slot's previous request."""
        for t in self.tensors():
            t[slot].zero_()
