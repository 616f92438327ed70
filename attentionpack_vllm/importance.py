"""Attention-aware partial rank: the importance EMA and the grouping it drives.

After each decode step every cached token's importance is updated from the step's
head-averaged attention probability p, scaled by the context length so that
uniform attention scores 1 at any length:

    importance <- ema_weight * importance + (1 - ema_weight) * seq_len * p

Factor tokens keep their score in their page record; window tokens in their slot
(`SlotPool.window_importance`) until they fold. The update is a few in-place
elementwise ops per layer.

Groups are reassigned when a request's factors change anyway, at its window folds
and after each prefill chunk, not at every step: tokens stored as factors are ranked
by importance within their request and assigned to groups in order, the first
`group_fractions[0]` (rounded up) to group 0 (full rank), the next fraction to
group 1, and so on. Between folds a token keeps its group; a fold comes every
`window_size` steps. The decode path reads only `group_cols[modality, group]`
columns of a token's factors.
"""
from __future__ import annotations

import torch

from .kernels.decode_inputs import DecodeBatch
from .kernels.layout import encode_flags
from .kernels.storage import read_importance, take_rows, write_record_fields
from .plan import CompressionPlan
from .slot_pool import SlotPool


def group_of_rank(order_index: torch.Tensor, counts: torch.Tensor, fractions: tuple[float, ...]) -> torch.Tensor:
    """Group of the token at `order_index` (0 = most important) among `counts` tokens.

    order_index: [batch, T]; counts: [batch]. Group f ends at ceil(cumsum(fractions)[f] * count).
    """
    bounds = torch.cumsum(torch.tensor(fractions[:-1], dtype=torch.float64), 0)
    ends = torch.ceil(counts[:, None].double() * bounds[None, :].to(counts.device) - 1e-9).long()
    return (order_index[..., None] >= ends[:, None, :]).sum(-1)


def groups_by_importance(importance: torch.Tensor, lengths: torch.Tensor,
                         fractions: tuple[float, ...]) -> torch.Tensor:
    """[batch, T] group of every position from its importance ([batch, T], padding ignored).

    lengths: [batch] valid positions per row. Ties keep position order.
    """
    t = importance.shape[1]
    pad = torch.arange(t, device=importance.device)[None, :] >= lengths[:, None]
    scores = importance.float().masked_fill(pad, float("-inf"))
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    order_index = torch.empty_like(order)
    order_index.scatter_(1, order, torch.arange(t, device=importance.device).expand_as(order))
    return group_of_rank(order_index, lengths.long(), fractions)


def regroup_records(pages: torch.Tensor, plan: CompressionPlan, record_slots: torch.Tensor,
                    lengths: torch.Tensor, valid_index: torch.Tensor, valid_slots: torch.Tensor) -> None:
    """Reassign the groups of F requests' factor tokens from the importance their records hold.

    record_slots: [F, L] flat page slots of positions [0, L) of each request (positions
    past its length are ignored); lengths: [F]; valid_index, valid_slots: the valid
    positions in the flattened [F, L] and their flat page slots. Only the flags change.
    """
    layout = plan.layout
    flat = pages.view(-1, layout.width)
    importance = read_importance(flat, record_slots.reshape(-1), layout).view(record_slots.shape)
    groups = groups_by_importance(importance, lengths, plan.group_fractions).reshape(-1)[valid_index]
    modality = flat[valid_slots, layout.flags_offset].long() % 2
    write_record_fields(flat, valid_slots, layout, flags=encode_flags(modality, groups))


def update_importance(
    pages: torch.Tensor,             # [num_blocks, block_size, width]
    pool: SlotPool,
    batch: DecodeBatch,              # built with its index tensors
    compressed_probs: torch.Tensor,  # [B, T] head-averaged probabilities
    window_probs: torch.Tensor,      # [B, window]
    plan: CompressionPlan,
) -> None:
    """Apply one step's EMA to every factor token's and window token's importance, in place."""
    keep = plan.ema_weight
    layout = plan.layout
    flat = pages.view(-1, layout.width)
    old = read_importance(flat, batch.valid_slots, layout)
    target = compressed_probs.reshape(-1)[batch.valid_index] * batch.valid_seq_lens
    write_record_fields(flat, batch.valid_slots, layout, importance=torch.lerp(target, old, keep))
    window = pool.window_importance
    target_w = window_probs * batch.seq_lens[:, None]
    window.index_put_((batch.slot_ids,), torch.lerp(target_w, take_rows(window, batch.slot_ids), keep))
