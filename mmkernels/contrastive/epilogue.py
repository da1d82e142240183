"""The loss from the statistics as one registered op: ``mmkernels::contrastive_loss_epilogue``.

``api.py`` turns the seven statistics of ``contrastive_stats`` into the loss with O(N)
arithmetic. Done with torch ops that is a dozen launches forward and as many backward; this
op does it in one Triton launch each way (``backend="triton"``), and the same arithmetic with
torch ops (``backend="torch"``) serves CPU tensors and the registration tests.

``contrastive_loss_epilogue(row_logsum, row_max, row_sum, pos, col_logsum, col_max, col_sum,
n_classes, label_smoothing, reduction, out_dtype, backend) -> (loss, i2t_acc, t2i_acc)`` (the
statistics of ``ops.contrastive_stats``; ``*_sum`` the sums relative to the max): the per-row
cross-entropy ``logsum + (1 - eps) * (shift - pos) - eps / n_classes * row_sum``, with
``shift`` the max (0 where not finite), which is ``lse - (1 - eps) * pos - eps * mean_j L``
formed without cancelling large logits against each other (with column statistics, averaged
with the per-column one over N classes), reduced by ``reduction``, in ``out_dtype``; the
accuracies are the shares of rows (columns) whose positive logit is their maximum (0 without
columns). Gradients reach ``row_logsum``, ``row_sum``, ``pos``, ``col_logsum``, ``col_sum``
(the max cancels: it gets none).
"""
from __future__ import annotations

import torch

from .reference import reduce

BACKENDS = ("torch", "triton")


def shift(m: torch.Tensor) -> torch.Tensor:
    """The maxima where finite, else 0: what the statistics are taken relative to."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def cross_entropy(logsum, mx, ssum, pos, n_classes: int, label_smoothing: float) -> torch.Tensor:
    """Per-row cross-entropy from the statistics: ``logsum + (1 - eps) * (shift - pos) - eps /
    n_classes * ssum`` (every term relative to the row max, so nothing large cancels)."""
    eps = float(label_smoothing)
    gap = shift(mx) - pos
    per = logsum + (gap if eps == 0.0 else (1.0 - eps) * gap)
    if eps != 0.0:
        per = per - (eps / n_classes) * ssum
    return per


def _torch_forward(row_lse, row_max, row_sum, pos, col_lse, col_max, col_sum, n_classes,
                   label_smoothing, reduction, out_dtype):
    eps = float(label_smoothing)
    per = cross_entropy(row_lse, row_max, row_sum, pos, n_classes, eps)
    n = row_lse.shape[0]
    acc_c = torch.zeros((), dtype=torch.float32, device=row_lse.device)
    if col_lse.numel() > 0:
        per_c = cross_entropy(col_lse, col_max, col_sum, pos, n, eps)
        per = 0.5 * (per + per_c)
        acc_c = (pos >= col_max).to(torch.float32).mean()
    acc_r = (pos >= row_max).to(torch.float32).mean()
    return reduce(per, reduction).to(out_dtype), acc_r, acc_c


def _torch_backward(g_loss, like, with_columns, n_classes, label_smoothing, reduction):
    n = like.shape[0]
    eps = float(label_smoothing)
    w = g_loss.to(like.dtype)
    if reduction == "mean":
        w = w / n
    w = w.expand(n) if w.dim() == 0 else w
    half = 0.5 if with_columns else 1.0
    g_row_lse = half * w
    g_row_sum = (-(eps / n_classes) * half) * w
    g_pos = -(1.0 - eps) * w
    if with_columns:
        return g_row_lse, g_row_sum, g_pos, half * w, (-(eps / n) * half) * w
    empty = like.new_empty(0)
    return g_row_lse, g_row_sum, g_pos, empty, empty.clone()


def _kernels():
    from .kernels import epilogue  # imported lazily: triton is optional
    return epilogue


@torch.library.custom_op("mmkernels::contrastive_loss_epilogue", mutates_args=())
def contrastive_loss_epilogue(row_lse: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor,
                              pos: torch.Tensor, col_lse: torch.Tensor, col_max: torch.Tensor,
                              col_sum: torch.Tensor, n_classes: int, label_smoothing: float,
                              reduction: str, out_dtype: torch.dtype, backend: str
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (row_lse, row_max, row_sum, pos, col_lse, col_max, col_sum, n_classes,
            label_smoothing, reduction, out_dtype)
    if backend == "torch":
        loss, a, b = _torch_forward(*args)
        return loss.clone() if loss is row_lse else loss, a, b
    if backend == "triton":
        return tuple(_kernels().epilogue_fwd(*args))
    raise ValueError(f"contrastive_loss_epilogue: unknown backend {backend!r}")


@contrastive_loss_epilogue.register_fake
def _(row_lse, row_max, row_sum, pos, col_lse, col_max, col_sum, n_classes, label_smoothing,
      reduction, out_dtype, backend):
    shape = (row_lse.shape[0],) if reduction == "none" else ()
    f32 = dict(dtype=torch.float32)
    return row_lse.new_empty(shape, dtype=out_dtype), row_lse.new_empty((), **f32), row_lse.new_empty((), **f32)


@torch.library.custom_op("mmkernels::contrastive_loss_epilogue_backward", mutates_args=())
def contrastive_loss_epilogue_backward(g_loss: torch.Tensor, like: torch.Tensor, with_columns: bool,
                                       n_classes: int, label_smoothing: float, reduction: str,
                                       backend: str
                                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor, torch.Tensor]:
    """Gradients of ``row_lse, row_sum, pos, col_lse, col_sum`` (``like``: ``row_lse``)."""
    args = (g_loss, like, with_columns, n_classes, label_smoothing, reduction)
    if backend == "torch":
        return tuple(g.contiguous().clone() for g in _torch_backward(*args))
    if backend == "triton":
        return tuple(_kernels().epilogue_bwd(*args))
    raise ValueError(f"contrastive_loss_epilogue_backward: unknown backend {backend!r}")


@contrastive_loss_epilogue_backward.register_fake
def _(g_loss, like, with_columns, n_classes, label_smoothing, reduction, backend):
    n = like.shape[0]
    m = n if with_columns else 0
    return (like.new_empty(n), like.new_empty(n), like.new_empty(n), like.new_empty(m),
            like.new_empty(m))


def _setup_context(ctx, inputs, output):
    row_lse, *_rest = inputs
    ctx.save_for_backward(row_lse)
    ctx.with_columns = inputs[4].numel() > 0
    ctx.params = inputs[7:10] + (inputs[11],)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zeros for the accuracies' (absent) gradients


def _backward(ctx, g_loss, _g_acc_r, _g_acc_c):
    (row_lse,) = ctx.saved_tensors
    if g_loss is None:
        return (None,) * 12
    n_classes, eps, reduction, backend = ctx.params
    g_rl, g_rs, g_p, g_cl, g_cs = contrastive_loss_epilogue_backward(
        g_loss, row_lse, ctx.with_columns, n_classes, eps, reduction, backend)
    if not ctx.with_columns:
        g_cl = g_cs = None
    return g_rl, None, g_rs, g_p, g_cl, None, g_cs, None, None, None, None, None


contrastive_loss_epilogue.register_autograd(_backward, setup_context=_setup_context)
