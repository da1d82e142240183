"""The light kernels of the blockwise path (``contrastive/paths.py``): the arithmetic of one
block of rows of the product ``S = q @ k.T`` (fp32, ``[rows, M]``, from a cuBLAS GEMM).

``block_stats_kernel``: programs ``[0, row programs)`` fold BLOCK_R rows across all M columns
into their log-sum and sum relative to the max, the max and the positive logit (the contract
of ``ops.contrastive_stats``); the remaining programs each take BLOCK_C columns, reduce them
over the block's rows and merge the result into running column statistics (every column has
one owner: no locks, no atomics). Sums of logits are kept relative to the running max and
moved with it (``count * (old max - new max)``). ``block_grad_kernel``: one
program per BLOCK_R rows writes ``scale * G`` for the block and the rows' ``sum(G * S)``
(their share of ``dscale``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _triton  # noqa: F401  (fixes the interpreter before any kernel is defined)
from .jit import _shift

BLOCK_R = 32
BLOCK_C = 128
NUM_WARPS = 4


@triton.jit
def block_stats_kernel(
    s_ptr, scale_ptr, tgt_ptr,
    row_lse_ptr, row_max_ptr, row_sum_ptr, pos_ptr,
    col_max_ptr, col_d_ptr, col_sum_ptr,
    n_rows, M, stride_s, stride_t, n_row_progs, rows_before,
    WITH_COLUMNS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Row statistics of the block (first ``n_row_progs`` programs) and its column statistics
    merged into the running ``col_max``/``col_d`` (sum of exp(l - max))/``col_sum`` (sum of
    l - max; ``rows_before`` rows were merged by earlier blocks) (the rest)."""
    pid = tl.program_id(0)
    scale = tl.load(scale_ptr)
    if pid < n_row_progs:
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        tgt = tl.load(tgt_ptr + rows64 * stride_t, mask=row_ok, other=-1).to(tl.int32)
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        d_i = tl.zeros([BLOCK_R], tl.float32)
        s_i = tl.zeros([BLOCK_R], tl.float32)
        p_i = tl.zeros([BLOCK_R], tl.float32)
        offs_c = tl.arange(0, BLOCK_C)
        for c0 in range(0, M, BLOCK_C):
            col_ok = offs_c < M - c0
            ok = row_ok[:, None] & col_ok[None, :]
            l = tl.load(s_ptr + rows64[:, None] * stride_s + (c0 + offs_c)[None, :], mask=ok,
                        other=0.0) * scale
            p_i += tl.sum(tl.where(offs_c[None, :] == (tgt - c0)[:, None], l, 0.0), 1)
            lm = tl.where(col_ok[None, :], l, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(lm, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            m_old = tl.where(m_i == float("-inf"), 0.0, m_i)
            d_i = d_i * tl.exp(m_i - m_use) + tl.sum(tl.exp(lm - m_use[:, None]), 1)
            s_i = s_i + c0 * (m_old - m_use) \
                + tl.sum(tl.where(col_ok[None, :], l - m_use[:, None], 0.0), 1)
            m_i = m_new
        d_fin = tl.where(row_ok, d_i, 1.0)
        tl.store(row_lse_ptr + rows64, tl.log(d_fin), mask=row_ok)
        tl.store(row_max_ptr + rows64, m_i, mask=row_ok)
        tl.store(row_sum_ptr + rows64, s_i, mask=row_ok)
        tl.store(pos_ptr + rows64, p_i, mask=row_ok)
    elif WITH_COLUMNS:
        cols = (pid - n_row_progs) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < M
        cols64 = cols.to(tl.int64)
        m_c = tl.load(col_max_ptr + cols64, mask=col_ok, other=float("-inf"))
        d_c = tl.load(col_d_ptr + cols64, mask=col_ok, other=0.0)
        s_c = tl.load(col_sum_ptr + cols64, mask=col_ok, other=0.0)
        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, n_rows, BLOCK_R):
            row_ok = offs_r < n_rows - r0
            ok = row_ok[:, None] & col_ok[None, :]
            rows64 = (r0 + offs_r).to(tl.int64)
            l = tl.load(s_ptr + rows64[:, None] * stride_s + cols64[None, :], mask=ok,
                        other=0.0) * scale
            lm = tl.where(row_ok[:, None], l, float("-inf"))
            m_new = tl.maximum(m_c, tl.max(lm, 0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            m_old = tl.where(m_c == float("-inf"), 0.0, m_c)
            d_c = d_c * tl.exp(m_c - m_use) + tl.sum(tl.exp(lm - m_use[None, :]), 0)
            s_c = s_c + (rows_before + r0) * (m_old - m_use) \
                + tl.sum(tl.where(row_ok[:, None], l - m_use[None, :], 0.0), 0)
            m_c = m_new
        tl.store(col_max_ptr + cols64, m_c, mask=col_ok)
        tl.store(col_d_ptr + cols64, d_c, mask=col_ok)
        tl.store(col_sum_ptr + cols64, s_c, mask=col_ok)


@triton.jit
def block_grad_kernel(
    s_ptr, g_ptr, scale_ptr, tgt_ptr,
    row_max_ptr, row_lse_ptr, g_row_lse_ptr, g_row_sum_ptr, g_pos_ptr,
    col_max_ptr, col_lse_ptr, g_col_lse_ptr, g_col_sum_ptr, ds_rows_ptr,
    n_rows, M, stride_s, stride_g, stride_t,
    WITH_COLUMNS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``g = scale * G`` of BLOCK_R rows of the block, in ``g``'s dtype, and each row's
    ``sum_j G[i, j] * S[i, j]`` in ``ds_rows``; the softmax is ``exp((l - max) - logsum)``."""
    pid = tl.program_id(0)
    scale = tl.load(scale_ptr)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows64 * stride_t, mask=row_ok, other=-1).to(tl.int32)
    r_lse = tl.load(row_lse_ptr + rows64, mask=row_ok, other=0.0)
    r_max = _shift(tl.load(row_max_ptr + rows64, mask=row_ok, other=0.0))
    g_rl = tl.load(g_row_lse_ptr + rows64, mask=row_ok, other=0.0)
    g_rs = tl.load(g_row_sum_ptr + rows64, mask=row_ok, other=0.0)
    g_p = tl.load(g_pos_ptr + rows64, mask=row_ok, other=0.0)
    ds = tl.zeros([BLOCK_R], tl.float32)
    offs_c = tl.arange(0, BLOCK_C)
    for c0 in range(0, M, BLOCK_C):
        cols = c0 + offs_c
        col_ok = cols < M
        ok = row_ok[:, None] & col_ok[None, :]
        cols64 = cols.to(tl.int64)
        s = tl.load(s_ptr + rows64[:, None] * stride_s + cols64[None, :], mask=ok, other=0.0)
        l = s * scale
        g = g_rl[:, None] * tl.exp((l - r_max[:, None]) - r_lse[:, None]) + g_rs[:, None]
        g += tl.where(cols[None, :] == tgt[:, None], g_p[:, None], 0.0)
        if WITH_COLUMNS:
            c_lse = tl.load(col_lse_ptr + cols64, mask=col_ok, other=0.0)
            c_max = _shift(tl.load(col_max_ptr + cols64, mask=col_ok, other=0.0))
            g_cl = tl.load(g_col_lse_ptr + cols64, mask=col_ok, other=0.0)
            g_cs = tl.load(g_col_sum_ptr + cols64, mask=col_ok, other=0.0)
            g += g_cl[None, :] * tl.exp((l - c_max[None, :]) - c_lse[None, :]) + g_cs[None, :]
        g = tl.where(ok, g, 0.0)
        ds += tl.sum(g * s, 1)
        tl.store(g_ptr + rows64[:, None] * stride_g + cols64[None, :],
                 (g * scale).to(g_ptr.dtype.element_ty), mask=ok)
    tl.store(ds_rows_ptr + rows64, ds, mask=row_ok)


def _contiguous_rows(s: torch.Tensor) -> None:
    if s.stride(1) != 1:
        raise ValueError("the blockwise kernels take blocks with contiguous rows")


def block_stats(S, scale, targets, row_lse, row_max, row_sum, pos, col_max, col_d, col_sum,
                with_columns: bool, rows_before: int = 0) -> None:
    """Statistics of one block ``S [b, M]`` (fp32) into the block's row outputs (``[b]``
    views) and the running column statistics (``[M]``, merged from ``rows_before`` rows so
    far), in place; one launch."""
    _contiguous_rows(S)
    b, M = S.shape
    n_row = triton.cdiv(b, BLOCK_R)
    n_col = triton.cdiv(M, BLOCK_C) if with_columns else 0
    if not with_columns:
        col_max = col_d = col_sum = row_lse  # never read (WITH_COLUMNS is a constexpr)
    block_stats_kernel[(n_row + n_col,)](
        S, scale, targets, row_lse, row_max, row_sum, pos, col_max, col_d, col_sum,
        b, M, S.stride(0), targets.stride(0), n_row, rows_before,
        WITH_COLUMNS=bool(with_columns), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)


def block_grad(S, G, scale, targets, row_max, row_lse, g_row_lse, g_row_sum, g_pos, col_max,
               col_lse, g_col_lse, g_col_sum, ds_rows) -> None:
    """``G = scale * G`` of one block (``S [b, M]`` fp32 in, ``G [b, M]`` out) and the rows'
    ``sum(G * S)`` into ``ds_rows [b]``; the row vectors are the block's ``[b]`` views, the
    column vectors ``[M]`` or None without column terms. One launch."""
    _contiguous_rows(S)
    _contiguous_rows(G)
    b, M = S.shape
    with_columns = col_lse is not None
    if not with_columns:
        col_max = col_lse = g_col_lse = g_col_sum = row_lse  # never read
    block_grad_kernel[(triton.cdiv(b, BLOCK_R),)](
        S, G, scale, targets, row_max, row_lse, g_row_lse, g_row_sum, g_pos, col_max, col_lse,
        g_col_lse,
        g_col_sum, ds_rows, b, M, S.stride(0), G.stride(0), targets.stride(0),
        WITH_COLUMNS=with_columns, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
