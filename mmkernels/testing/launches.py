"""Count the device kernels a piece of code launches, on any device (tests of launch budgets).

::

    with count_launches() as c:
        loss = mmkernels.contrastive_loss(a, b, s)
        loss.backward()
    assert c.total <= 10, c.summary()

What is counted, one each:

* every Triton kernel launch (``JITFunction.run``, and ``InterpretedFunction.run`` under
  ``TRITON_INTERPRET=1``, so kernels run by the interpreter count as on a GPU; the ATen ops
  the interpreter runs to move arguments are not counted); an autotuner's trial runs count
  too;
* every ATen op that reaches the dispatcher and would launch a device kernel (seen by a
  ``TorchDispatchMode``), that is every op except: views (``func.is_view``), allocations
  without a fill (``empty*``, ``new_empty*``, ``resize_``), metadata and aliasing ops
  (``detach``, ``alias``, ``lift_fresh``, ``sym_*``, ``is_*``, ``set_``), SDPA's kernel
  selector (``_fused_sdp_choice``), and ops whose tensor
  outputs all have no elements. A ``.to()`` that copies counts (``_to_copy``); one that
  returns its input never reaches the dispatcher. ``item()`` counts (``_local_scalar_dense``:
  a copy to the host and a synchronisation);
* for an op in the ``mmkernels`` namespace, what its Python implementation runs (its Triton
  launches and ATen ops), never the op itself.

Not counted: work of the CPU-only C++ kernels (one ``mmkernels._C`` call is not a device
launch), and cuBLAS's internal kernels beyond one per GEMM op.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_NOT_LAUNCHING = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_",
    "detach", "alias", "lift_fresh", "lift_fresh_copy", "set_", "_unsafe_view", "conj", "_conj",
    "_neg_view", "_reshape_alias", "unsqueeze_", "squeeze_", "t_", "transpose_", "as_strided_",
    "is_same_size", "is_nonzero", "is_contiguous", "is_coalesced", "is_pinned", "_nested_tensor_size",
    "size", "stride", "storage_offset", "numel", "dim", "sym_size", "sym_stride",
    "sym_storage_offset", "sym_numel", "record_stream", "_has_same_storage_numel",
    "_fused_sdp_choice",  # asks which SDPA kernel would run; runs none
}


@dataclass
class LaunchCount:
    """The launches counted inside :func:`count_launches`: ``triton`` kernel launches (by
    kernel name), ``aten`` ops (by op name), and their ``total``."""

    triton: Counter = field(default_factory=Counter)
    aten: Counter = field(default_factory=Counter)
    _inside_triton: int = 0

    @property
    def total(self) -> int:
        return sum(self.triton.values()) + sum(self.aten.values())

    def summary(self) -> str:
        """The total and each kernel / op with its count."""
        parts = [f"{n} x{c}" for n, c in self.triton.most_common()]
        parts += [f"{n} x{c}" for n, c in self.aten.most_common()]
        return f"{self.total} launches: " + ", ".join(parts)


def _launches(func) -> bool:
    if func.is_view:
        return False
    name = func.overloadpacket.__name__
    return name not in _NOT_LAUNCHING and not name.startswith(("sym_", "is_", "_is_"))


def _no_elements(out) -> bool:
    tensors = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return bool(tensors) and all(t.numel() == 0 for t in tensors)


class _AtenCounter(TorchDispatchMode):
    def __init__(self, count: LaunchCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "mmkernels":
            from torch._library.custom_ops import _maybe_get_opdef
            opdef = _maybe_get_opdef(func._schema.name)
            if opdef is not None:
                with self:  # count what the implementation runs, with this mode back on
                    return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if not self.count._inside_triton and _launches(func) and not _no_elements(out):
            self.count.aten[str(func.overloadpacket.__name__)] += 1
        return out


def _triton_run_classes():
    classes = []
    try:
        from triton.runtime.jit import JITFunction
        classes.append(JITFunction)
    except Exception:  # triton not installed
        return classes
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except Exception:  # a triton without the interpreter
        pass
    return classes


@contextlib.contextmanager
def count_launches() -> Iterator[LaunchCount]:
    """Count the launches of the code inside the block (see the module for what counts)."""
    count = LaunchCount()
    patched = []
    for cls in _triton_run_classes():
        original = cls.__dict__.get("run")
        if original is None:
            continue

        def run(self, *args, __original=original, **kwargs):
            fn = getattr(self, "fn", None)
            count.triton[getattr(fn, "__name__", None) or getattr(self, "__name__", "triton")] += 1
            count._inside_triton += 1  # the interpreter's own host copies are not launches
            try:
                return __original(self, *args, **kwargs)
            finally:
                count._inside_triton -= 1

        cls.run = run
        patched.append((cls, original))
    try:
        with _AtenCounter(count):
            yield count
    finally:
        for cls, original in patched:
            cls.run = original
