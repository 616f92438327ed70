"""The per-token record stored in AttentionPack's paged KV cache.

One token of one layer occupies one row of a page:

    [ K' (rank_k) | V' (rank_v) | importance | flags ]

K' and V' are the token's low-rank factors (coordinates in its request's key and
value bases, singular values folded in); importance is the EMA of the token's
attention; flags = modality + 2 * group, with modality 0 = text, 1 = image and
group the partial-rank group (0 = full rank). All fields share the cache dtype;
flags are small integers, exact in fp16/bf16/fp32.

Pages are `[num_blocks, block_size, width]`, addressed like vLLM's: a token at
flat slot s lives in block s // block_size, row s % block_size.
"""
from __future__ import annotations

from dataclasses import dataclass

TEXT, IMAGE = 0, 1
NUM_MODALITIES = 2


@dataclass(frozen=True)
class RecordLayout:
    """Offsets of the fields of one token's record (in elements of the cache dtype)."""

    rank_k: int  # columns of K' (max of the image and text key ranks)
    rank_v: int  # columns of V' (max of the image and text value ranks)

    @property
    def k_offset(self) -> int:
        return 0

    @property
    def v_offset(self) -> int:
        return self.rank_k

    @property
    def importance_offset(self) -> int:
        return self.rank_k + self.rank_v

    @property
    def flags_offset(self) -> int:
        return self.rank_k + self.rank_v + 1

    @property
    def width(self) -> int:
        return self.rank_k + self.rank_v + 2


def encode_flags(modality, group):
    """flags = modality + 2 * group (works on ints and integer tensors)."""
    return modality + 2 * group


def decode_flags(flags):
    """Inverse of `encode_flags`: (modality, group)."""
    return flags % 2, flags // 2
