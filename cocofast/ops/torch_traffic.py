"""Count the memory traffic of eager torch code: bytes each aten op reads and writes, op by op.

An eager op on a GPU streams its operands from HBM and its result back, so the sum over ops is the traffic
a roofline of eager code needs (cocofast.ops.roofline). Views move nothing. An op reads its tensor arguments,
each distinct tensor once (an `out=` buffer is only written), and writes its results; indexing and
index_put_ count only the indices and values they gather or scatter; allocations count nothing, fills only
their writes. Run the code on small CPU tensors: the bytes of the map-sized passes scale with B·N.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_SCATTERS = {"index_put_", "index_put"}
_GATHERS = {"index"}
# Allocations move nothing; fills only write (their tensor argument is a template for dtype and device).
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
_FILLS = {"new_ones", "new_zeros", "new_full", "zeros_like", "ones_like", "full_like", "fill_", "zero_"}


def _tensor_bytes(values) -> int:
    """Bytes of the distinct tensors among `values`: one op reading a tensor twice (x * x, or y and yᵀ in a
    Gram product) streams it from memory once."""
    seen = {(v.data_ptr(), v.numel() * v.element_size()) for v in tree_flatten(values)[0]
            if isinstance(v, torch.Tensor)}
    return sum(size for _, size in seen)


class TrafficCounter(TorchDispatchMode):
    """`with TrafficCounter() as c: ...` then c.total_bytes, c.by_op {aten op name: bytes}, c.calls."""

    def __init__(self):
        super().__init__()
        self.by_op: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not func.is_view:
            name = func.overloadpacket.__name__
            reads = {k: v for k, v in kwargs.items() if k != "out"}
            if name in _ALLOCATIONS:
                moved = 0
            elif name in _FILLS:
                moved = _tensor_bytes(result)
            elif name in _GATHERS:
                moved = _tensor_bytes(args[1:]) + _tensor_bytes(result)
            elif name in _SCATTERS:
                moved = 2 * _tensor_bytes((args[1:], reads))
            else:
                moved = _tensor_bytes((args, reads)) + _tensor_bytes(result)
            self.by_op[name] += moved
            self.calls[name] += 1
        return result

    @property
    def total_bytes(self) -> int:
        return sum(self.by_op.values())


__all__ = ["TrafficCounter"]
