"""The loss epilogue in one launch each way (``contrastive/epilogue.py`` registers the op).

``epilogue_fwd_kernel``: one program walks the ``[N]`` statistics and writes the loss (its
mean, sum, or the per-row vector) in the output dtype and the two top-1 accuracies.
``epilogue_bwd_kernel``: the gradients of the row (and column) log-sum-exps, sums and positive
logits for an incoming loss gradient, elementwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _triton  # noqa: F401  (fixes the interpreter before any kernel is defined)
from ..._triton import PTR

BLOCK = 1024
NUM_WARPS = 4
#: the forward is one program holding three [BLOCK] accumulators: 8 warps keep them at 4 values a
#: thread (with 4 warps Triton 3.9's register allocation spills on sm_90a)
FWD_NUM_WARPS = 8
REDUCTION_CODES = {"mean": 0, "sum": 1, "none": 2}


@triton.jit
def _row_loss(logsum, mx, ssum, p, eps, n_classes, SMOOTH: tl.constexpr):
    """One cross-entropy from the statistics relative to the max (nothing large cancels)."""
    gap = tl.where((mx == mx) & (tl.abs(mx) < float("inf")), mx, 0.0) - p
    if SMOOTH:
        return logsum + (1.0 - eps) * gap - eps / n_classes * ssum
    return logsum + gap


@triton.jit
def epilogue_fwd_kernel(
    row_lse_ptr, row_max_ptr, row_sum_ptr, pos_ptr, col_lse_ptr, col_max_ptr, col_sum_ptr,
    loss_ptr, acc_r_ptr, acc_c_ptr, N, n_classes, eps,
    WITH_COLUMNS: tl.constexpr, SMOOTH: tl.constexpr, REDUCTION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per row ``logsum + (1 - eps) * (max - pos) - eps / classes * sum`` (the statistics
    relative to the max, see ``ops.py``; the max taken as 0 where not finite), and the same per
    column, the two averaged, reduced by REDUCTION (0 mean, 1 sum, 2 none); ``acc_r`` /
    ``acc_c``: the shares of rows / columns whose positive logit is their maximum."""
    offs0 = tl.arange(0, BLOCK)
    tot = tl.zeros([BLOCK], tl.float32)
    hit_r = tl.zeros([BLOCK], tl.float32)
    hit_c = tl.zeros([BLOCK], tl.float32)
    for n0 in range(0, N, BLOCK):
        offs = n0 + offs0
        ok = offs < N
        p = tl.load(pos_ptr + offs, mask=ok, other=0.0)
        r_max = tl.load(row_max_ptr + offs, mask=ok, other=0.0)
        per = _row_loss(tl.load(row_lse_ptr + offs, mask=ok, other=0.0), r_max,
                        tl.load(row_sum_ptr + offs, mask=ok, other=0.0), p, eps, n_classes,
                        SMOOTH)
        hit_r += tl.where(ok & (p >= r_max), 1.0, 0.0)
        if WITH_COLUMNS:
            c_max = tl.load(col_max_ptr + offs, mask=ok, other=0.0)
            per_c = _row_loss(tl.load(col_lse_ptr + offs, mask=ok, other=0.0), c_max,
                              tl.load(col_sum_ptr + offs, mask=ok, other=0.0), p, eps, N, SMOOTH)
            per = 0.5 * (per + per_c)
            hit_c += tl.where(ok & (p >= c_max), 1.0, 0.0)
        if REDUCTION == 2:
            tl.store(loss_ptr + offs, per.to(loss_ptr.dtype.element_ty), mask=ok)
        else:
            tot += tl.where(ok, per, 0.0)
    if REDUCTION == 0:
        tl.store(loss_ptr, (tl.sum(tot, 0) / N).to(loss_ptr.dtype.element_ty))
    if REDUCTION == 1:
        tl.store(loss_ptr, tl.sum(tot, 0).to(loss_ptr.dtype.element_ty))
    tl.store(acc_r_ptr, tl.sum(hit_r, 0) / N)
    tl.store(acc_c_ptr, tl.sum(hit_c, 0) / N)


@triton.jit
def epilogue_bwd_kernel(
    g_loss_ptr, g_row_lse_ptr, g_row_sum_ptr, g_pos_ptr, g_col_lse_ptr, g_col_sum_ptr,
    N, n_classes, eps,
    WITH_COLUMNS: tl.constexpr, REDUCTION: tl.constexpr, BLOCK: tl.constexpr,
):
    """The gradients of the epilogue's inputs for the loss gradient ``g_loss`` (one element,
    or ``[N]`` for REDUCTION 2)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    if REDUCTION == 2:
        w = tl.load(g_loss_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        w = tl.zeros([BLOCK], tl.float32) + tl.load(g_loss_ptr).to(tl.float32)
        if REDUCTION == 0:
            w = w / N
    if WITH_COLUMNS:
        half = 0.5
    else:
        half = 1.0
    tl.store(g_row_lse_ptr + offs, half * w, mask=ok)
    tl.store(g_row_sum_ptr + offs, -(eps / n_classes) * half * w, mask=ok)
    tl.store(g_pos_ptr + offs, -(1.0 - eps) * w, mask=ok)
    if WITH_COLUMNS:
        tl.store(g_col_lse_ptr + offs, half * w, mask=ok)
        tl.store(g_col_sum_ptr + offs, -(eps / N) * half * w, mask=ok)


def epilogue_fwd(row_lse, row_max, row_sum, pos, col_lse, col_max, col_sum, n_classes: int,
                 label_smoothing: float, reduction: str, out_dtype: torch.dtype):
    """``(loss, i2t accuracy, t2i accuracy)``; one launch."""
    N = row_lse.shape[0]
    dev = row_lse.device
    with_columns = col_lse.numel() > 0
    loss = torch.empty(N if reduction == "none" else (), dtype=out_dtype, device=dev)
    acc_r = torch.empty((), dtype=torch.float32, device=dev)
    acc_c = torch.empty((), dtype=torch.float32, device=dev)
    if not with_columns:
        col_lse = col_max = col_sum = row_lse  # never read
    epilogue_fwd_kernel[(1,)](
        row_lse, row_max, row_sum, pos, col_lse, col_max, col_sum, loss, acc_r, acc_c,
        N, n_classes, float(label_smoothing), WITH_COLUMNS=with_columns,
        SMOOTH=float(label_smoothing) != 0.0, REDUCTION=REDUCTION_CODES[reduction], BLOCK=BLOCK,
        num_warps=FWD_NUM_WARPS)
    return loss, acc_r, acc_c


def epilogue_bwd(g_loss, like, with_columns: bool, n_classes: int, label_smoothing: float,
                 reduction: str):
    """The five gradients ``(g_row_lse, g_row_sum, g_pos, g_col_lse, g_col_sum)``, float32
    ``[N]`` (column ones ``[0]`` without columns); one launch."""
    N = like.shape[0]
    outs = [torch.empty(N, dtype=torch.float32, device=like.device) for _ in range(3)]
    cols = [torch.empty(N if with_columns else 0, dtype=torch.float32, device=like.device)
            for _ in range(2)]
    g_loss = g_loss.contiguous()
    epilogue_bwd_kernel[(triton.cdiv(max(N, 1), BLOCK),)](
        g_loss, *outs, *(cols if with_columns else (outs[0], outs[0])),
        N, n_classes, float(label_smoothing), WITH_COLUMNS=bool(with_columns),
        REDUCTION=REDUCTION_CODES[reduction], BLOCK=BLOCK, num_warps=NUM_WARPS)
    return (*outs, *cols)


def compile_specs(name: str, with_columns: bool, dtype: torch.dtype):
    """(kernel, signature, constexprs, divisible_by_16, num_warps) for the sm_90 tier
    (``dtype``: the loss's), mean reduction with label smoothing."""
    from ...testing.sm90 import launch_signature
    big = 4096
    if name == "epilogue_fwd":
        names = ("row_lse_ptr", "row_max_ptr", "row_sum_ptr", "pos_ptr", "col_lse_ptr",
                 "col_max_ptr", "col_sum_ptr")
        sig = {n: "*fp32" for n in names}
        sig.update({"loss_ptr": PTR[dtype], "acc_r_ptr": "*fp32", "acc_c_ptr": "*fp32"})
        constexprs = {"WITH_COLUMNS": bool(with_columns), "SMOOTH": True, "REDUCTION": 0,
                      "BLOCK": BLOCK}
        kernel = epilogue_fwd_kernel
    else:
        sig = {"g_loss_ptr": PTR[dtype]}
        sig.update({n: "*fp32" for n in ("g_row_lse_ptr", "g_row_sum_ptr", "g_pos_ptr",
                                          "g_col_lse_ptr", "g_col_sum_ptr")})
        constexprs = {"WITH_COLUMNS": bool(with_columns), "REDUCTION": 0, "BLOCK": BLOCK}
        kernel = epilogue_bwd_kernel
    return (kernel, *launch_signature(sig, {"N": big, "n_classes": big}, constexprs,
                                      floats=("eps",)), FWD_NUM_WARPS if name == "epilogue_fwd" else NUM_WARPS)
