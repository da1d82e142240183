"""What a piece of code fills with constants: to catch autograd materialising zero gradients.

A custom op that returns a tensor saved only for its backward (an attention ``lse``, the
experts FFN's ``h`` and ``a``) gets, unless its autograd context says
``set_materialize_grads(False)``, a zero-filled gradient for it on every backward: a memset of
the whole tensor, never read. ``fills(fn)`` runs ``fn`` under the CPU profiler and returns the
shapes that ``aten::zeros`` / ``zero_`` / ``fill_`` / ``zeros_like`` wrote.
"""
from __future__ import annotations

from typing import Callable

_FILL_OPS = ("aten::zeros", "aten::zero_", "aten::fill_", "aten::zeros_like")


def fills(fn: Callable[[], object]) -> list[tuple[str, tuple[int, ...]]]:
    """``[(op name, shape)]`` of every tensor ``fn()`` filled with a constant (CPU profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    out = []
    for ev in prof.key_averages(group_by_input_shape=True):
        if ev.key in _FILL_OPS:
            for shape in ev.input_shapes:
                if shape:
                    out.append((ev.key, tuple(shape)))
    return out
