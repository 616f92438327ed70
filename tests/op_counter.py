"""Count the aten ops and host reads of a block of PyTorch code (TorchDispatchMode)."""
from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

# Ops that only reinterpret or allocate memory: not counted as work.
VIEW_OR_ALLOC = {
    "view", "_unsafe_view", "reshape", "slice", "select", "expand", "permute", "transpose", "t",
    "unsqueeze", "squeeze", "as_strided", "alias", "detach", "split", "unbind", "narrow",
    "empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "full", "new_empty",
    "new_zeros", "scalar_tensor", "lift_fresh", "lift_fresh_copy", "_to_copy_noop",
}
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "item"}


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched inside the block, by name."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def working(self) -> int:
        """Ops that compute or copy (views and allocations left out)."""
        return sum(n for name, n in self.ops.items() if name not in VIEW_OR_ALLOC)

    @property
    def host_reads(self) -> int:
        return sum(n for name, n in self.ops.items() if name in HOST_READS)

    def working_ops(self) -> dict[str, int]:
        return {name: n for name, n in sorted(self.ops.items()) if name not in VIEW_OR_ALLOC}
