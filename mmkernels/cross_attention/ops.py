"""Registered ops of the cross_attention family (namespace ``mmkernels``).

``mmkernels::cross_attention_fwd(q [B, H, Lq, D], k, v [B, H, Lk, D], key_padding_mask, seed,
scale, dropout_p, backend)`` returns ``out [B, H, Lq, D]`` (q's dtype), ``lse``, ``row_max`` and
``row_sum``, each ``[B, H, Lq]`` (float32; float64 for float64 inputs). ``row_max`` is the row
maximum m of the scaled scores in the backend's own domain (natural log on ``cpu``, log2 on
``triton``), ``row_sum`` is l = sum_j exp(s_j - m) before dropout, and ``lse = m + log l``
(natural log). ``key_padding_mask`` is bool ``[B, Lk]`` (True = attend)
or ``None``; ``seed`` is the int64 ``[2]`` dropout seed (``None`` when ``dropout_p == 0``). Rows
whose keys are all padding give ``out = 0``, ``lse = row_max = -inf``, ``row_sum = 0`` and zero gradient.

Its backward, ``mmkernels::cross_attention_bwd``, recomputes the probabilities as
``exp(s - row_max) / row_sum`` (m and l kept apart: a single rounded lse would put its rounding,
large at large scores, into every probability) and the same dropout mask from ``seed``, and
returns ``dq, dk, dv``. ``lse``, ``row_max`` and ``row_sum`` are not differentiable; ``lse`` is
for inspection only. ``backend`` is ``"cpu"`` (C++ in ``mmkernels/csrc/cross_attention.cpp``) or
``"triton"`` (``kernels/``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from .reference import compute_dtype


def _kernels():
    from . import kernels  # imported lazily: triton is optional
    return kernels


@torch.library.custom_op("mmkernels::cross_attention_fwd", mutates_args=())
def cross_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_padding_mask: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                        scale: float, dropout_p: float, backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (q, k, v, key_padding_mask, seed, scale, dropout_p)
    if backend == "cpu":
        return tuple(_ext.C.cross_attention_fwd(*args))
    if backend == "triton":
        return tuple(_kernels().cross_attention_fwd_triton(*args))
    raise ValueError(f"cross_attention_fwd: unknown backend {backend!r}")


@cross_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, seed, scale, dropout_p, backend):
    rows = q.shape[:3]
    ct = compute_dtype(q.dtype)
    return (torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(rows, dtype=ct),
            q.new_empty(rows, dtype=ct), q.new_empty(rows, dtype=ct))


@torch.library.custom_op("mmkernels::cross_attention_bwd", mutates_args=())
def cross_attention_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        row_max: torch.Tensor, row_sum: torch.Tensor, dout: torch.Tensor,
                        key_padding_mask: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                        scale: float, dropout_p: float, backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (q, k, v, out, row_max, row_sum, dout, key_padding_mask, seed, scale, dropout_p)
    if backend == "cpu":
        return tuple(_ext.C.cross_attention_bwd(*args))
    if backend == "triton":
        return tuple(_kernels().cross_attention_bwd_triton(*args))
    raise ValueError(f"cross_attention_bwd: unknown backend {backend!r}")


@cross_attention_bwd.register_fake
def _(q, k, v, out, row_max, row_sum, dout, key_padding_mask, seed, scale, dropout_p, backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, seed, scale, dropout_p, backend = inputs
    out, lse, row_max, row_sum = output
    ctx.save_for_backward(q, k, v, out, row_max, row_sum, key_padding_mask, seed)
    ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, backend
    ctx.mark_non_differentiable(lse, row_max, row_sum)
    ctx.set_materialize_grads(False)  # no zero [B, H, S] gradients filled for the statistics


def _backward(ctx, dout, _dlse, _dmax, _dsum):
    q, k, v, out, row_max, row_sum, key_padding_mask, seed = ctx.saved_tensors
    if dout is None:  # the output did not reach the loss
        return (None,) * 8
    dq, dk, dv = cross_attention_bwd(q, k, v, out, row_max, row_sum, dout.contiguous(),
                                     key_padding_mask, seed, ctx.scale, ctx.dropout_p, ctx.backend)
    return dq, dk, dv, None, None, None, None, None


cross_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
