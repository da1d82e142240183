"""Registered ops of the SigLIP unit (namespace ``mmkernels``).

``mmkernels::siglip_rows(q [N, D], k [M, D], scale [], bias [], targets [N] i64, backend)``
returns ``row_loss [N]``, float32 (float64 for float64 inputs), from the logits
``L = scale * q @ k.T + bias`` (never materialised):

    row_loss_i = sum_j softplus(-z_ij * L_ij),   z_ij = +1 if j == targets[i] else -1

(``softplus(x) = log(1 + exp(x)) = -log sigmoid(-x)``); ``targets[i] = -1`` gives row i no
positive. ``scale`` and ``bias`` are 0-dim float32 (float64 for float64 inputs).

Its backward is ``mmkernels::siglip_grads(q, k, scale, bias, targets, g_row [N], backend)``:
with ``G_ij = -g_row_i * z_ij * sigmoid(-z_ij * L_ij)`` (the gradient of row_loss_i * g_row_i
with respect to ``L_ij``) it returns ``dq = scale * G @ k`` ``[N, D]`` in q's dtype,
``dk = scale * G.T @ q`` ``[M, D]`` in k's dtype, ``dscale = sum(G * (q @ k.T))`` and
``dbias = sum(G)`` (0-dim, float32 or float64). No statistic is needed: each tile of G comes
from its own logits.

``backend``: ``"cpu"`` (C++, ``mmkernels/csrc/siglip.cpp``), ``"triton"``
(``kernels.py``) or ``"blockwise"`` (row blocks of the logits from ``torch.mm``, ``paths.py``).
"""
from __future__ import annotations

import torch

from ... import _ext
from ..ops import stats_dtype


def _backend_fns(backend: str):
    if backend == "cpu":
        return _ext.C.siglip_rows, _ext.C.siglip_grads
    if backend == "triton":
        from . import kernels  # imported lazily: triton is optional
        return kernels.siglip_rows_triton, kernels.siglip_grads_triton
    if backend == "blockwise":
        from . import paths
        return paths.blockwise_siglip_rows, paths.blockwise_siglip_grads
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
