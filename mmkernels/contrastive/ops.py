"""Registered ops of the contrastive family (namespace ``mmkernels``).

Two ops carry the whole family; the losses in ``api.py`` are O(N) torch code
on top of them.

``mmkernels::contrastive_stats(q [N, D], k [M, D], scale [] f32, targets [N] i64,
with_columns, backend)`` returns seven float32 vectors, from the logits
``L = scale * q @ k.T`` (never materialised), each row (column) taken relative to its
``shift = max`` (0 where the max is not finite):

* ``row_logsum [N]``: ``log sum_j exp(L_ij - shift_i)``, ``row_max [N]``: the max,
  ``row_ssum [N]``: ``sum_j (L_ij - shift_i)``,
* ``pos [N]``: ``L[i, targets[i]]``, read from the same logits as the maxima
  (so ``pos >= row_max`` is an exact top-1 test),
* ``col_logsum [M]``, ``col_max [M]``, ``col_ssum [M]``: the same per column, or empty
  ``[0]`` vectors when ``with_columns`` is false.

The log-sum-exp is ``max + logsum`` and the plain sum ``ssum + M * max``, but they are never
formed: with logits in the thousands a rounded log-sum-exp carries an error of its own ulp
into every softmax (``exp(L - lse)``) and into a cross-entropy formed as ``lse - pos``; kept
apart, the loss is ``logsum + (max - pos)`` and the softmax ``exp((L - max) - logsum)``, each
exact to the rounding of quantities relative to the max, as eager ``log_softmax`` is.

The maxima are not differentiable; the gradients of ``logsum`` and ``ssum`` are those of the
log-sum-exp and of the plain sum (their derivatives with the max held fixed), which is exact
for every loss in which the max cancels, as it does in any cross-entropy. The backward is
``mmkernels::contrastive_grads``: with the incoming gradients of ``row_logsum``, ``row_ssum``,
``pos``, ``col_logsum``, ``col_ssum`` it forms, tile by tile,
``G = g_row_lse * softmax_rows(L) + g_col_lse * softmax_cols(L) + g_row_sum + g_col_sum
+ g_pos * onehot(targets)`` and returns ``dq = scale * G @ k``,
``dk = scale * G.T @ q``, ``dscale = sum(G * q @ k.T)``.

``backend`` is ``"cpu"`` (C++ kernels in ``mmkernels/csrc/``), ``"triton"``, or
``"blockwise"`` (row blocks of the logits from cuBLAS GEMMs, see ``paths.py``). Statistics are
float32 (float64 for float64 inputs, which the ``cpu`` and ``blockwise`` backends accept).
"""
from __future__ import annotations

import torch

from .. import _ext


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and ``dscale`` are float32, or float64 for float64 inputs (used by gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernels():
    from . import kernels  # imported lazily: triton is optional
    return kernels


@torch.library.custom_op("mmkernels::contrastive_stats", mutates_args=())
def contrastive_stats(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, targets: torch.Tensor,
                      with_columns: bool, backend: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "cpu":
        return tuple(_ext.C.contrastive_stats(q, k, scale, targets, with_columns))
    if backend == "triton":
        return tuple(_kernels().contrastive_stats_triton(q, k, scale, targets, with_columns))
    if backend == "blockwise":
        from .paths import blockwise_stats
        return tuple(blockwise_stats(q, k, scale, targets, with_columns))
    raise ValueError(f"contrastive_stats: unknown backend {backend!r}")


@contrastive_stats.register_fake
def _(q, k, scale, targets, with_columns, backend):
    n, m = q.shape[0], (k.shape[0] if with_columns else 0)
    dt = stats_dtype(q.dtype)
    row = [q.new_empty(n, dtype=dt) for _ in range(4)]
    col = [q.new_empty(m, dtype=dt) for _ in range(3)]
    return (*row, *col)


@torch.library.custom_op("mmkernels::contrastive_grads", mutates_args=())
def contrastive_grads(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, targets: torch.Tensor,
                      row_max: torch.Tensor, row_logsum: torch.Tensor, col_max: torch.Tensor,
                      col_logsum: torch.Tensor, g_row_lse: torch.Tensor, g_row_sum: torch.Tensor,
                      g_pos: torch.Tensor, g_col_lse: torch.Tensor, g_col_sum: torch.Tensor,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (q, k, scale, targets, row_max, row_logsum, col_max, col_logsum, g_row_lse, g_row_sum,
            g_pos, g_col_lse, g_col_sum)
    if backend == "cpu":
        return tuple(_ext.C.contrastive_grads(*args))
    if backend == "triton":
        return tuple(_kernels().contrastive_grads_triton(*args))
    if backend == "blockwise":
        from .paths import blockwise_grads
        return tuple(blockwise_grads(*args))
    raise ValueError(f"contrastive_grads: unknown backend {backend!r}")


@contrastive_grads.register_fake
def _(q, k, scale, targets, row_max, row_logsum, col_max, col_logsum, g_row_lse, g_row_sum, g_pos,
      g_col_lse, g_col_sum, backend):
    return torch.empty_like(q), torch.empty_like(k), scale.new_empty((), dtype=stats_dtype(q.dtype))


def _setup_context(ctx, inputs, output):
    q, k, scale, targets, with_columns, backend = inputs
    row_logsum, row_max, _, _, col_logsum, col_max, _ = output
    ctx.save_for_backward(q, k, scale, targets, row_max, row_logsum, col_max, col_logsum)
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1], output[5])  # the maxima
    ctx.set_materialize_grads(False)  # no zero vectors for outputs the loss does not use


def _backward(ctx, g_row_lse, _g_row_max, g_row_sum, g_pos, g_col_lse, _g_col_max, g_col_sum):
    q, k, scale, targets, row_max, row_logsum, col_max, col_logsum = ctx.saved_tensors
    if all(g is None for g in (g_row_lse, g_row_sum, g_pos, g_col_lse, g_col_sum)):
        return None, None, None, None, None, None

    def filled(g, like):  # outputs that did not reach the loss get no gradient
        return torch.zeros_like(like) if g is None else g.to(like.dtype)

    dq, dk, dscale = contrastive_grads(
        q, k, scale, targets, row_max, row_logsum, col_max, col_logsum,
        filled(g_row_lse, row_logsum), filled(g_row_sum, row_logsum), filled(g_pos, row_logsum),
        filled(g_col_lse, col_logsum), filled(g_col_sum, col_logsum), ctx.backend)
    return dq, dk, dscale, None, None, None


contrastive_stats.register_autograd(_backward, setup_context=_setup_context)
