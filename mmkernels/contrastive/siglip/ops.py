"""Registered ops of the SigLIP unit (namespace ``mmkernels``).

``mmkernels::siglip_rows(q [N, D], k [M, D], scale [], bias [], targets [N] i64, backend)``
returns ``row_loss [N]``, float32 (float64 for float64 inputs), from the logits
``L = scale * q @ k.T + bias`` (never materialised):

    row_loss_i = sum_j softplus(-z_ij * L_ij),   z_ij = +1 if j == targets[i] else -1

(``softplus(x) = log(1 + exp(x)) = -log sigmoid(-x)``); ``targets[i] = -1`` gives row i no
positive. ``scale`` and ``bias`` are 0-dim float32 (float64 for float64 inputs).

``mmkernels::siglip_fused`` returns the sum of the row losses with its gradients already
computed (for a scalar loss: one pass instead of a forward and a backward recomputing the
logits); its autograd scales them by the incoming gradient.

Its backward is ``mmkernels::siglip_grads(q, k, scale, bias, targets, g_row [N], backend)``:
with ``G_ij = -g_row_i * z_ij * sigmoid(-z_ij * L_ij)`` (the gradient of row_loss_i * g_row_i
with respect to ``L_ij``) it returns ``dq = scale * G @ k`` ``[N, D]`` in q's dtype,
``dk = scale * G.T @ q`` ``[M, D]`` in k's dtype, ``dscale = sum(G * (q @ k.T))`` and
``dbias = sum(G)`` (0-dim, float32 or float64). No statistic is needed: each tile of G comes
from its own logits.

bfloat16 on a CPU with bf16 dot products (``_backend.cpu_bf16_gemm``) is multiplied with bf16
GEMMs on the ``cpu`` and ``blockwise`` backends, the products rounded to bf16 as eager code does;
elsewhere products are fp32.

``backend``: ``"cpu"`` (C++, ``mmkernels/csrc/siglip.cpp``), ``"triton"``
(``kernels.py``) or ``"blockwise"`` (row blocks of the logits from ``torch.mm``, ``paths.py``).
"""
from __future__ import annotations

import torch

from ... import _ext
from ..ops import stats_dtype


def _backend_fns(backend: str):
    """``(rows, grads, fwd_bwd)`` of ``backend``: ``fwd_bwd(q, k, scale, bias, targets)`` returns
    the row losses and the gradients for ``g_row = 1`` from one pass where the backend has one."""
    if backend == "cpu":
        from ..._backend import cpu_bf16_gemm
        fast = cpu_bf16_gemm()
        return ((lambda *a: _ext.C.siglip_rows(*a, fast)), (lambda *a: _ext.C.siglip_grads(*a, fast)),
                (lambda *a: _ext.C.siglip_fwd_bwd(*a, fast)))
    if backend == "triton":
        from . import kernels  # imported lazily: triton is optional
        return kernels.siglip_rows_triton, kernels.siglip_grads_triton, kernels.siglip_fwd_bwd_triton
    if backend == "blockwise":
        from . import paths
        return paths.blockwise_siglip_rows, paths.blockwise_siglip_grads, paths.blockwise_siglip_fwd_bwd
    raise ValueError(f"siglip: unknown backend {backend!r}")


@torch.library.custom_op("mmkernels::siglip_rows", mutates_args=())
def siglip_rows(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                targets: torch.Tensor, backend: str) -> torch.Tensor:
    return _backend_fns(backend)[0](q, k, scale, bias, targets)


@siglip_rows.register_fake
def _(q, k, scale, bias, targets, backend):
    return q.new_empty(q.shape[0], dtype=stats_dtype(q.dtype))


@torch.library.custom_op("mmkernels::siglip_grads", mutates_args=())
def siglip_grads(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 targets: torch.Tensor, g_row: torch.Tensor, backend: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_backend_fns(backend)[1](q, k, scale, bias, targets, g_row))


@siglip_grads.register_fake
def _(q, k, scale, bias, targets, g_row, backend):
    sd = stats_dtype(q.dtype)
    return torch.empty_like(q), torch.empty_like(k), q.new_empty((), dtype=sd), q.new_empty((), dtype=sd)


def _setup_context(ctx, inputs, output):
    q, k, scale, bias, targets, backend = inputs
    ctx.save_for_backward(q, k, scale, bias, targets)
    ctx.backend = backend


def _backward(ctx, g_row):
    q, k, scale, bias, targets = ctx.saved_tensors
    dq, dk, dscale, dbias = siglip_grads(q, k, scale, bias, targets,
                                         g_row.to(stats_dtype(q.dtype)), ctx.backend)
    return dq, dk, dscale, dbias, None, None


siglip_rows.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("mmkernels::siglip_fused", mutates_args=())
def siglip_fused(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 targets: torch.Tensor, backend: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, dq, dk, dscale, dbias)``: ``total = sum_i row_loss_i`` (0-dim, the statistics
    dtype) and its gradients, from one pass over the logits where the backend has one. Autograd
    scales the saved gradients by ``total``'s incoming gradient: a scalar loss's forward and
    backward for three products per logit tile instead of four."""
    rows, dq, dk, dscale, dbias = _backend_fns(backend)[2](q, k, scale, bias, targets)
    return rows.sum(), dq, dk, dscale, dbias


@siglip_fused.register_fake
def _(q, k, scale, bias, targets, backend):
    sd = stats_dtype(q.dtype)
    return (q.new_empty((), dtype=sd), torch.empty_like(q), torch.empty_like(k),
            q.new_empty((), dtype=sd), q.new_empty((), dtype=sd))


def _fused_setup_context(ctx, inputs, output):
    q, k, scale, bias, targets, backend = inputs
    _, dq, dk, dscale, dbias = output
    ctx.save_for_backward(dq, dk, dscale, dbias)
    ctx.mark_non_differentiable(dq, dk, dscale, dbias)
    ctx.dtypes = (scale.dtype, bias.dtype)


def _fused_backward(ctx, g_total, _g_dq, _g_dk, _g_ds, _g_db):
    dq, dk, dscale, dbias = ctx.saved_tensors
    if g_total is None:
        return None, None, None, None, None, None
    c = g_total.to(dscale.dtype)
    return ((dq * c).to(dq.dtype), (dk * c).to(dk.dtype), (dscale * c).to(ctx.dtypes[0]),
            (dbias * c).to(ctx.dtypes[1]), None, None)


siglip_fused.register_autograd(_fused_backward, setup_context=_fused_setup_context)
