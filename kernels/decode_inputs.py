"""What one decode step hands every layer's latent-space attention.

Two objects, both built outside the layers:

* `LatentSpec`: what is constant for a compression plan (record layout, how many
  modalities the slots hold, the partial-rank column table). Python values only, so
  every branch a kernel or the PyTorch path takes on them is decided before the step
  and never by reading a tensor.
* `DecodeBatch`: the per-step tensors (block tables, slots, lengths and the
  index tensors of the PyTorch path), made once per step by `make_decode_batch`
  from lengths the host already knows, and reused by every layer. Making it reads
  no device value.

Modalities: plane TEXT (0) of a slot always exists; plane IMAGE (1) only when the
plan has images (`num_modalities == 2`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .layout import IMAGE, TEXT, RecordLayout


@dataclass(frozen=True)
class LatentSpec:
    """Plan constants of the latent-space decode."""

    layout: RecordLayout
    num_modalities: int                         # 1: text only; 2: text and image planes
    group_cols_k: tuple[tuple[int, ...], ...]   # [modality][group]: K' columns a token reads
    group_cols_v: tuple[tuple[int, ...], ...]   # [modality][group]: V' columns a token reads

    def __post_init__(self) -> None:
        if self.num_modalities not in (1, 2):
            raise ValueError(f"num_modalities must be 1 or 2, got {self.num_modalities}")
        for name in ("group_cols_k", "group_cols_v"):
            if len(getattr(self, name)) != 2:
                raise ValueError(f"{name} needs one row per modality (text, image)")

    @property
    def has_image(self) -> bool:
        return self.num_modalities == 2

    @property
    def num_groups(self) -> int:
        return len(self.group_cols_k[TEXT])

    @property
    def modalities(self) -> tuple[int, ...]:
        return (TEXT, IMAGE) if self.has_image else (TEXT,)

    def _partial(self, table, rank: int) -> bool:
        return any(c < rank for m in self.modalities for c in table[m])

    @functools.cached_property  # read by every layer's call
    def partial_k(self) -> bool:
        """Whether some (modality, group) reads fewer K' columns than the record holds."""
        return self._partial(self.group_cols_k, self.layout.rank_k)

    @functools.cached_property
    def partial_v(self) -> bool:
        return self._partial(self.group_cols_v, self.layout.rank_v)

    def column_bands(self, which: str) -> tuple[tuple[int, int], ...]:
        """Column ranges [lo, hi) that the same tokens read, over the modalities in use.

        A token reading c columns reads every band with hi <= c. With no partial rank
        this is one band, [0, rank).
        """
        table = self.group_cols_k if which == "k" else self.group_cols_v
        rank = self.layout.rank_k if which == "k" else self.layout.rank_v
        edges = sorted({0, rank} | {c for m in self.modalities for c in table[m] if 0 < c < rank})
        return tuple(zip(edges[:-1], edges[1:]))

    def cols_by_flag(self, which: str, device) -> torch.Tensor:
        """[2 * num_groups] int64: the columns a token reads, indexed by its flags value
        (modality + 2 * group), so one lookup replaces decoding the flags."""
        return _cols_by_flag(self.group_cols_k if which == "k" else self.group_cols_v, str(device))


@dataclass
class DecodeBatch:
    """Per-step decode inputs of B requests, one new token each; shared by every layer.

    The new token is already counted in `window_lens` (the step writes it into the
    window before attending). Index tensors for the PyTorch path and the importance
    EMA (`record_slots` onwards) are None when the step does not need them.
    """

    block_table: torch.Tensor       # [B, max_blocks] int32
    slot_ids: torch.Tensor          # [B] int64: the request's slot in the per-layer pools
    seq_lens: torch.Tensor          # [B] int32: tokens including the new one
    compressed_lens: torch.Tensor   # [B] int32: positions [0, c) are factors in the pages
    window_lens: torch.Tensor       # [B] int32: valid exact rows (sinks, then window) of the slot
    new_window_rows: torch.Tensor   # [B] int64: window row the new token is written to
    max_compressed_len: int         # host: max(compressed_lens), the padded length T
    window_size: int                # exact rows per slot (the plan's sinks + window)
    # The PyTorch path gathers whole pages: request b's first ceil(T / block_size) pages
    # in a row, T = max_compressed_len, padded with its first page.
    gather_blocks: torch.Tensor | None = None   # [B * pages_per_request] int64 page ids
    pad_rows: torch.Tensor | None = None        # [P] int64: rows of the gathered pages past a
                                                # request's length (zeroed: they hold stale bytes)
    compressed_pad: torch.Tensor | None = None  # [B, T] bool: True past the request's length
    window_pad: torch.Tensor | None = None      # [B, W] bool: True past the window's length
    # The valid compressed positions, flattened without padding (importance EMA):
    valid_index: torch.Tensor | None = None     # [N] int64: index into the flattened [B, T]
    valid_slots: torch.Tensor | None = None     # [N] int64: their flat page slots
    valid_seq_lens: torch.Tensor | None = None  # [N] float32: their request's seq_len

    # Buffers the PyTorch path reuses across the step's layers (allocated by the first).
    scratch: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.slot_ids.shape[0]

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        """A step-long scratch tensor: every layer of the step writes into the same memory
        instead of allocating (and faulting in) a fresh one."""
        buf = self.scratch.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != torch.device(device):
            buf = self.scratch[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf


@functools.lru_cache(maxsize=64)
def _cols_by_flag(table: tuple, device: str) -> torch.Tensor:
    by_flag = [table[flag % 2][flag // 2] for flag in range(2 * len(table[0]))]
    return torch.tensor(by_flag, dtype=torch.int64, device=device)


def page_slots_of(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat page slots of `positions` ([B, T] int64) through `block_table` ([B, max_blocks]).

    Positions past the table are clamped to its last block (callers mask them).
    """
    blocks = (positions // block_size).clamp_max(block_table.shape[1] - 1)
    return block_table.long().gather(1, blocks) * block_size + positions % block_size


def make_decode_batch(
    block_table: torch.Tensor,
    slot_ids: Sequence[int],
    seq_lens: Sequence[int],
    window_lens: Sequence[int],
    *,
    window_size: int,
    block_size: int,
    with_index: bool = True,
    pad_to: int | None = None,
) -> DecodeBatch:
    """Build a step's `DecodeBatch` from host-side lengths (window lengths after the append;
    a decode step always has at least its new token there).

    No device value is read: every shape comes from the host lists. `with_index`
    builds the PyTorch path's padded gather index and the flat EMA index. `pad_to`
    pads the compressed length to a fixed bound (a captured CUDA graph's shape).
    """
    device = block_table.device
    batch = len(seq_lens)
    compressed = [s - w for s, w in zip(seq_lens, window_lens)]
    if any(w < 0 or w > window_size for w in window_lens):
        raise ValueError(f"window lengths must lie in [0, {window_size}], got {list(window_lens)}")
    if any(c < 0 for c in compressed):
        raise ValueError("a window is longer than its request")
    as_tensor = lambda xs, dtype: torch.tensor(list(xs), dtype=dtype, device=device)  # noqa: E731
    max_len = max(compressed, default=0)
    if pad_to is not None:
        if pad_to < max_len:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest compressed length {max_len}")
        max_len = pad_to
    out = DecodeBatch(
        block_table=block_table.to(torch.int32),
        slot_ids=as_tensor(slot_ids, torch.int64),
        seq_lens=as_tensor(seq_lens, torch.int32),
        compressed_lens=as_tensor(compressed, torch.int32),
        window_lens=as_tensor(window_lens, torch.int32),
        new_window_rows=as_tensor([w - 1 for w in window_lens], torch.int64),
        max_compressed_len=max_len,
        window_size=window_size,
    )
    if not with_index:
        return out
    positions = torch.arange(max_len, device=device).expand(batch, max_len)
    out.compressed_pad = positions >= out.compressed_lens[:, None].long()
    out.window_pad = torch.arange(window_size, device=device)[None, :] >= out.window_lens[:, None].long()
    # Whole pages, gathered with one index_select: a request's pages past its length
    # repeat its first page, and every gathered row past its length is zeroed.
    pages_each = -(-max_len // block_size)
    table = block_table.long()[:, :pages_each]
    if table.shape[1] < pages_each:  # a padded bound past the table: repeat its first page
        table = torch.cat([table, table[:, :1].expand(-1, pages_each - table.shape[1])], dim=1)
    own = torch.arange(pages_each, device=device)[None, :] < ((out.compressed_lens.long() + block_size - 1)
                                                                // block_size)[:, None]
    out.gather_blocks = torch.where(own, table, table[:, :1]).reshape(-1)
    span = pages_each * block_size
    pad_counts = [span - c for c in compressed]
    rows, cols = ragged_positions(pad_counts, torch.tensor(pad_counts, device=device))
    out.pad_rows = rows * span + out.compressed_lens.long()[rows] + cols
    # The valid positions, flattened (importance EMA).
    rows, cols = ragged_positions(compressed, out.compressed_lens)
    out.valid_index = rows * max_len + cols
    out.valid_slots = block_table.long()[rows, cols // block_size] * block_size + cols % block_size
    out.valid_seq_lens = out.seq_lens.float()[rows]
    return out


def ragged_positions(lengths: Sequence[int], lengths_on_device: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of every valid entry of a ragged batch, in row-major order, [N] each.

    The total N comes from the host-side `lengths`, so nothing is read back from the
    device (no boolean-mask indexing, no nonzero).
    """
    device = lengths_on_device.device
    total = int(sum(lengths))
    counts = lengths_on_device.long()
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=device), counts, output_size=total)
    starts = torch.cumsum(counts, 0) - counts
    return rows, torch.arange(total, device=device) - starts[rows]
