"""Tensors that lie back to back in one storage, used as one tensor without a copy.

Two ops read several parameters as one matrix: the fused K/V projection (every layer's K and V
weights as one ``[L * 2 * H * D, C]`` GEMM operand) and the experts ops (per-expert weights as
one ``[E, ...]`` stack, when each expert keeps its own ``nn.Parameter`` so that one expert can be
frozen). When the parameters are contiguous and adjacent in one storage, the combined tensor is
a view of it: no copy, and optimiser steps (in place) update it. :func:`pack_` arranges that;
otherwise the combination is a fresh copy on each call.
"""
from __future__ import annotations

from typing import Sequence

import torch


def contiguous_run(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """A detached view spanning ``tensors`` (concatenated on dim 0) when they are contiguous and
    back to back in one storage, in order; else ``None``.

    Shape ``[sum of dim 0, *tensors[0].shape[1:]]`` (1-D tensors: ``[sum of numel]``).
    """
    first = tensors[0]
    try:
        storage = first.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (fake, functional)
        return None
    offset = first.storage_offset()
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != storage or t.storage_offset() != offset:
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    size = (rows,) + tuple(first.shape[1:])
    stride = first.stride() if first.dim() > 1 else (1,)
    return first.detach().as_strided(size, stride, first.storage_offset())


def packed(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The dim-0 concatenation of ``tensors``, detached: a view of their storage when they are
    back to back in one (never while compiling), else a fresh ``torch.cat``."""
    if not torch.compiler.is_compiling():
        run = contiguous_run(tensors)
        if run is not None:
            return run
    return torch.cat([t.detach() for t in tensors])


@torch.no_grad()
def pack_(params: Sequence[torch.Tensor]) -> None:
    """Move ``params`` into one new storage, back to back in order, in place (``p.data = view``).

    Each tensor keeps its identity (an ``nn.Parameter`` stays the object optimisers and state
    dicts hold); only its data moves. Nothing happens when they already form a run.
    """
    params = list(params)
    if not params or contiguous_run(params) is not None:
        return
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        n = p.numel()
        p.data = flat[offset:offset + n].view_as(p)
        offset += n


class _Stack(torch.autograd.Function):
    """``[E, ...]`` from E same-shape tensors: a view of their storage when :func:`packed` can
    give one. The backward hands each tensor its slice of the gradient: views of one storage
    when every tensor wants one; copies when some do not, so that the unwanted slices (a frozen
    expert's) are freed with the stacked gradient instead of living on inside the others'."""

    @staticmethod
    def forward(ctx, *tensors):
        return packed(tensors).view(len(tensors), *tensors[0].shape)

    @staticmethod
    def backward(ctx, grad):
        slices = grad.unbind(0)
        if all(ctx.needs_input_grad):
            return slices
        return tuple(g.clone() if needed else None for g, needed in zip(slices, ctx.needs_input_grad))


def stacked(tensors: Sequence[torch.Tensor], name: str) -> torch.Tensor:
    """``torch.stack(tensors)`` with gradients, without a copy when the tensors lie back to back
    in one storage (:func:`pack_`). ``name`` is the argument's name for the errors: the tensors
    must share shape, dtype and device."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{name} is an empty sequence; give one tensor per expert")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__} ({name} is one "
                            "stacked tensor or a sequence of one tensor per expert)")
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"{name}[{i}] is {tuple(t.shape)} {t.dtype} on {t.device} but {name}[0] is "
                             f"{tuple(first.shape)} {first.dtype} on {first.device}; every expert's "
                             "tensor must match")
    return _Stack.apply(*tensors)
