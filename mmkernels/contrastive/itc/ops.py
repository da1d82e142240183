"""Registered ops of the ``itc`` unit (namespace ``mmkernels``): one direction of the ALBEF / BLIP /
BLIP-2 objectives over ``N x M`` similarities that are never materialised.

Shapes: ``q [N, Q, D]`` queries, ``k [M, P, D]`` keys (``Q = P = 1`` for plain features; float32,
bfloat16, float16 or float64, the same dtype), similarity ``S_ij = max_{a < Q, b < P} q[i, a] .
k[j, b]`` (products accumulated in fp32, fp64 for fp64 inputs; on ties the first ``(a, b)`` in
``a * P + b`` order wins, as ``torch.max`` resolves them), logits ``L = scale * S``. The teacher
pair ``tq [N, Q', D']``, ``tk [M, P', D']`` (``tk`` None: ``k``) gives ``TL = tscale * TS`` the
same way. ``pos_ij = row_ids[i] == col_ids[j]`` (int64 ``[N]``, ``[M]``), ``c_i = sum_j pos_ij``.
``scale``, ``tscale``: 0-dim, the statistics dtype (float32; float64 for float64 inputs).

A queue: ``kq [K, P, D]`` (or None) continues the keys without a copy: the keys are ``[k; kq]``
(``M = len(k) + K`` columns, ``col_ids`` has ``M`` entries), as ALBEF's ``[feat_m; queue]``;
``kq`` receives no gradient, and with a queue the teacher keys are the keys (``tk`` None).
Any strides are accepted (e.g. ``queue.T`` of a ``[D, K]`` queue).

``mmkernels::itc_rows(q, k, kq, tq, tk, scale, tscale, row_ids, col_ids, alpha, eps, backend)`` returns
``(loss, lse, tlse, count)``, each ``[N]`` in the statistics dtype:

    lse_i   = log sum_j exp(L_ij)
    tlse_i  = log sum_j exp(TL_ij)                  (0 when alpha == 0: tq is then None)
    count_i = c_i
    loss_i  = lse_i - (1 - eps) * (alpha * sum_j softmax_j(TL)_ij L_ij
                                   + (1 - alpha) * sum_j pos_ij L_ij / c_i) - (eps / M) * sum_j L_ij

(the cross-entropy against ``T_ij = (1 - eps) * (alpha * softmax_j(TL)_ij + (1 - alpha) *
pos_ij / c_i) + eps / M``; ``c_i = 0`` gives NaN, as the materialised code does; the ``alpha``
term is omitted when ``alpha == 0`` and the positive term when ``alpha == 1``). One pass: the
teacher's softmax-weighted sum is kept online (running max, sum of exponentials and their
weighted sum of ``L``, rescaled when the max grows).

``mmkernels::itc_grads(g, q, k, kq, tq, tk, scale, tscale, row_ids, col_ids, lse, tlse, count,
alpha, eps, need_dk, backend)`` returns ``(dq [N, Q, D] in q's dtype, dk, dscale [])``: with ``dL_ij =
g_i * (exp(L_ij - lse_i) - T_ij)`` (``T`` recomputed from ``TL``, ``tlse`` and ``count``),
``dq[i, a*] += scale * dL_ij * k[j, b*]``, ``dk[j, b*] += scale * dL_ij * q[i, a*]`` for the
arg-max pair ``(a*, b*)`` of ``S_ij``, ``dscale = sum_ij dL_ij * S_ij``. ``dk`` is k's
gradient (``[len(k), P, D]`` in k's dtype; the queue gets none), or an empty ``[0]`` tensor when ``need_dk`` is False (keys from a queue or a
momentum encoder need none). No gradient reaches the teacher or ``tscale``.

``mmkernels::itc_negatives(q, k, scale, row_ids, col_ids, seed, backend)`` returns ``[N]`` int64:
``argmax_j (L_ij + G_ij)`` over the ``j`` with ``pos_ij`` False (the smallest ``j`` on ties),
``-1`` for a row without such ``j``, where ``G`` is the Gumbel noise of ``random.py`` for the
0-dim int64 ``seed``; ``L_ij + G_ij`` is formed in float32. That is one draw per row from
``softmax_j(L_ij)`` over the negatives.

``backend``: ``"cpu"`` (C++, ``mmkernels/csrc/itc.cpp``), ``"triton"`` (``kernels.py``) or
``"blockwise"`` (row blocks of the products from ``torch.mm``, ``paths.py``).
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _ext
from ..ops import stats_dtype


def _backend_fns(backend: str):
    """``(rows, grads, negatives)`` of ``backend``, each taking the op's arguments but ``backend``
    (``rows(q, k, kq, tq, tk, ...)``, ``grads(g, q, k, kq, tq, tk, ...)``)."""
    if backend == "cpu":
        from ..._backend import cpu_bf16_gemm
        fast = cpu_bf16_gemm()
        C = _ext.C
        return ((lambda *a: C.itc_rows(*a, fast)), (lambda *a: C.itc_grads(*a, fast)),
                (lambda *a: C.itc_negatives(*a, fast)))
    if backend == "triton":
        from . import kernels  # imported lazily: triton is optional
        return kernels.itc_rows_triton, kernels.itc_grads_triton, kernels.itc_negatives_triton
    if backend == "blockwise":
        from . import paths
        return paths.blockwise_itc_rows, paths.blockwise_itc_grads, paths.blockwise_itc_negatives
    raise ValueError(f"itc: unknown backend {backend!r}")


@torch.library.custom_op("mmkernels::itc_rows", mutates_args=())
def itc_rows(q: torch.Tensor, k: torch.Tensor, kq: Optional[torch.Tensor], tq: Optional[torch.Tensor],
             tk: Optional[torch.Tensor], scale: torch.Tensor, tscale: torch.Tensor, row_ids: torch.Tensor, col_ids: torch.Tensor,
             alpha: float, eps: float, backend: str
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_backend_fns(backend)[0](q, k, kq, tq, tk, scale, tscale, row_ids, col_ids, alpha, eps))


@itc_rows.register_fake
def _(q, k, kq, tq, tk, scale, tscale, row_ids, col_ids, alpha, eps, backend):
    sd = stats_dtype(q.dtype)
    return tuple(q.new_empty(q.shape[0], dtype=sd) for _ in range(4))


@torch.library.custom_op("mmkernels::itc_grads", mutates_args=())
def itc_grads(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, kq: Optional[torch.Tensor],
              tq: Optional[torch.Tensor],
              tk: Optional[torch.Tensor], scale: torch.Tensor, tscale: torch.Tensor,
              row_ids: torch.Tensor, col_ids: torch.Tensor, lse: torch.Tensor, tlse: torch.Tensor,
              count: torch.Tensor, alpha: float, eps: float, need_dk: bool, backend: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_backend_fns(backend)[1](g, q, k, kq, tq, tk, scale, tscale, row_ids, col_ids, lse,
                                          tlse, count, alpha, eps, need_dk))


@itc_grads.register_fake
def _(g, q, k, kq, tq, tk, scale, tscale, row_ids, col_ids, lse, tlse, count, alpha, eps, need_dk, backend):
    dk = torch.empty_like(k) if need_dk else k.new_empty(0)
    return torch.empty_like(q), dk, q.new_empty((), dtype=stats_dtype(q.dtype))


def _setup_context(ctx, inputs, output):
    q, k, kq, tq, tk, scale, tscale, row_ids, col_ids, alpha, eps, backend = inputs
    _, lse, tlse, count = output
    ctx.save_for_backward(q, k, kq, tq, tk, scale, tscale, row_ids, col_ids, lse, tlse, count)
    ctx.mark_non_differentiable(lse, tlse, count)
    ctx.args = (alpha, eps, backend)


def _backward(ctx, g_loss, _g_lse, _g_tlse, _g_count):
    q, k, kq, tq, tk, scale, tscale, row_ids, col_ids, lse, tlse, count = ctx.saved_tensors
    alpha, eps, backend = ctx.args
    if g_loss is None:
        return (None,) * 12
    dq, dk, dscale = itc_grads(g_loss.to(lse.dtype), q, k, kq, tq, tk, scale, tscale, row_ids, col_ids,
                               lse, tlse, count, alpha, eps, ctx.needs_input_grad[1], backend)
    return (dq, dk if ctx.needs_input_grad[1] else None, None, None, None, dscale.to(scale.dtype),
            None, None, None, None, None, None)


itc_rows.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("mmkernels::itc_negatives", mutates_args=())
def itc_negatives(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, row_ids: torch.Tensor,
                  col_ids: torch.Tensor, seed: torch.Tensor, backend: str) -> torch.Tensor:
    return _backend_fns(backend)[2](q, k, scale, row_ids, col_ids, seed)


@itc_negatives.register_fake
def _(q, k, scale, row_ids, col_ids, seed, backend):
    return q.new_empty(q.shape[0], dtype=torch.int64)
