"""The per-token record stored in AttentionPack's paged KV cache.

One token of one layer occupies one row of a page:

    [ K' (rank_k) | V' (rank_v) | importance | flags ]

K' and V' are the token's low-rank factors (coordinates in its request's key and
value bases, singular values folded in); importance is the EMA of the token's
attention; flags = modality + 2 * group, with modality 0 = text, 1 = image and
group the partial-rank group (0 = full rank).

Two storage formats (`kernels/storage.py` reads and writes both):
* 16-bit (the default): every field is one element of the cache dtype; flags are
  small integers, exact in fp16/bf16/fp32.
* int8 (`int8=True`): offsets count bytes. K' and V' are int8, each with a float32
  scale per token, importance is float32 and flags one byte:

    [ K' (rank_k) | V' (rank_v) | pad | K' scale (4) | V' scale (4) | importance (4) | flags (1) | pad ]

  The float32 fields start at a 4-byte boundary and a row is a multiple of
  `INT8_ROW_ALIGN` bytes, so it is whole elements of any cache dtype.

Pages are `[num_blocks, block_size, width]`, addressed like vLLM's: a token at
flat slot s lives in block s // block_size, row s % block_size.
"""
from __future__ import annotations

from dataclasses import dataclass

TEXT, IMAGE = 0, 1
NUM_MODALITIES = 2
FLOAT32_BYTES = 4
INT8_ROW_ALIGN = 4


@dataclass(frozen=True)
class RecordLayout:
    """Offsets of the fields of one token's record (elements of the cache dtype, or
    bytes when `int8`)."""

    rank_k: int         # columns of K' (max of the image and text key ranks)
    rank_v: int         # columns of V' (max of the image and text value ranks)
    int8: bool = False  # int8 factors with float32 scales, offsets in bytes

    @property
    def k_offset(self) -> int:
        return 0

    @property
    def v_offset(self) -> int:
        return self.rank_k

    @property
    def k_scale_offset(self) -> int:
        """int8 only: the float32 scale of K', at a 4-byte boundary (a kernel loads it as float32)."""
        return _round_up(self.rank_k + self.rank_v, INT8_ROW_ALIGN)

    @property
    def v_scale_offset(self) -> int:
        """int8 only: the float32 scale of V'."""
        return self.k_scale_offset + FLOAT32_BYTES

    @property
    def importance_offset(self) -> int:
        if self.int8:
            return self.v_scale_offset + FLOAT32_BYTES
        return self.rank_k + self.rank_v

    @property
    def flags_offset(self) -> int:
        if self.int8:
            return self.importance_offset + FLOAT32_BYTES
        return self.rank_k + self.rank_v + 1

    @property
    def width(self) -> int:
        """Columns of a page row: elements of the cache dtype, or bytes when int8."""
        if self.int8:
            return _round_up(self.flags_offset + 1, INT8_ROW_ALIGN)
        return self.rank_k + self.rank_v + 2


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def encode_flags(modality, group):
    """flags = modality + 2 * group (works on ints and integer tensors)."""
    return modality + 2 * group


def decode_flags(flags):
    """Inverse of `encode_flags`: (modality, group)."""
    return flags % 2, flags // 2
