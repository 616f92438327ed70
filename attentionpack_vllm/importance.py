"""Attention-aware partial rank: the importance EMA and the grouping it drives.

After each decode step every cached token's importance is updated from the step's
head-averaged attention probability p, scaled by the context length so that
uniform attention scores 1 at any length:

    importance <- ema_weight * importance + (1 - ema_weight) * seq_len * p

Tokens stored as factors are then ranked by importance within their request and
assigned to groups in order: the first `group_fractions[0]` (rounded up) to group 0
(full rank), the next fraction to group 1, and so on. The decode path reads only
`group_cols[modality, group]` columns of a token's factors.
"""
from __future__ import annotations

import torch

from .kernels.layout import decode_flags, encode_flags
from .paged_store import batch_page_slots
from .plan import CompressionPlan


def group_of_rank(order_index: torch.Tensor, counts: torch.Tensor, fractions: tuple[float, ...]) -> torch.Tensor:
    """Group of the token at `order_index` (0 = most important) among `counts` tokens.

    order_index: [batch, T]; counts: [batch]. Group f ends at ceil(cumsum(fractions)[f] * count).
    """
    bounds = torch.cumsum(torch.tensor(fractions[:-1], dtype=torch.float64), 0)
    ends = torch.ceil(counts[:, None].double() * bounds[None, :].to(counts.device) - 1e-9).long()
    return (order_index[..., None] >= ends[:, None, :]).sum(-1)


def update_importance(
    pages: torch.Tensor,            # [num_blocks, block_size, width]
    block_table: torch.Tensor,      # [batch, max_blocks]
    compressed_lens: torch.Tensor,  # [batch] int
    window_lens: torch.Tensor,      # [batch] int
    compressed_probs: torch.Tensor,  # [batch, T_c] head-averaged probabilities
    window_probs: torch.Tensor,     # [batch, window]
    plan: CompressionPlan,
) -> None:
    """Apply one step's EMA to every position's importance and regroup the factor tokens."""
    batch = block_table.shape[0]
    if batch == 0:
        return
    layout, block_size = plan.layout, pages.shape[1]
    c_lens, w_lens = compressed_lens.long(), window_lens.long()
    seq_lens = c_lens + w_lens
    max_len = int(seq_lens.max())
    pos = torch.arange(max_len, device=pages.device)
    # Scores by position: factor tokens first, then the window.
    probs = torch.zeros(batch, max_len, dtype=torch.float32, device=pages.device)
    t_c = compressed_probs.shape[1]
    probs[:, :t_c] = compressed_probs[:, :max_len].float() * (pos[None, :t_c] < c_lens[:, None])
    w_pos = (pos[None, :] - c_lens[:, None])
    in_window = (w_pos >= 0) & (w_pos < w_lens[:, None])
    probs = torch.where(in_window, window_probs.float().gather(1, w_pos.clamp(0, window_probs.shape[1] - 1)), probs)
    valid = pos[None, :] < seq_lens[:, None]

    slots = batch_page_slots(block_table, max_len, block_size)[valid]
    flat = pages.view(-1, pages.shape[-1])
    old = flat[slots, layout.importance_offset].float()
    new = plan.ema_weight * old + (1.0 - plan.ema_weight) * (seq_lens[:, None] * probs)[valid]
    flat[slots, layout.importance_offset] = new.to(pages.dtype)
    if plan.num_groups > 1:
        assign_groups(pages, block_table, compressed_lens, plan)


def assign_groups(pages: torch.Tensor, block_table: torch.Tensor, compressed_lens: torch.Tensor,
                  plan: CompressionPlan) -> None:
    """Rewrite the group bits of every factor token from its importance rank."""
    c_lens = compressed_lens.long()
    max_len = int(c_lens.max()) if c_lens.numel() else 0
    if max_len == 0:
        return
    layout = plan.layout
    valid = torch.arange(max_len, device=pages.device)[None, :] < c_lens[:, None]
    slots = batch_page_slots(block_table, max_len, pages.shape[1])
    flat = pages.view(-1, pages.shape[-1])
    importance = flat[slots, layout.importance_offset].float().masked_fill(~valid, float("-inf"))
    order = torch.argsort(importance, dim=1, descending=True, stable=True)
    order_index = torch.empty_like(order)
    order_index.scatter_(1, order, torch.arange(max_len, device=pages.device).expand_as(order))
    groups = group_of_rank(order_index, c_lens, plan.group_fractions)
    modality, _ = decode_flags(flat[slots, layout.flags_offset].round().long())
    flat[slots[valid], layout.flags_offset] = encode_flags(modality, groups)[valid].to(pages.dtype)
