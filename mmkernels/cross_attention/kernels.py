"""Triton kernels for few-query cross-attention (contract: ``ops.py``).

``cross_attention_fwd_triton(q, k, v, key_padding_mask, seed, scale, dropout_p) -> (out, lse)``
and ``cross_attention_bwd_triton(q, k, v, out, lse, dout, key_padding_mask, seed, scale,
dropout_p) -> (dq, dk, dv)``; the math is that of :mod:`mmkernels.cross_attention.reference`.

The shapes this family is built for are a few queries (Lq = 32 .. 256) against a few hundred
keys, for many (batch, head) pairs (B = 128, H = 12 is 1536 pairs of tiny attention problems).
Every program therefore owns a *group* of consecutive (b, h) pairs, ``pairs_per_program`` of
them (a run-time argument, chosen so the launch still has a few programs per SM), and loops
over them.

Forward (``_xattn_fwd_kernel``), grid ``(pair groups, query blocks)``
    For each pair of its group: load the ``[BLOCK_M, D]`` query block once, walk the keys in
    ``BLOCK_N`` tiles with an online softmax (fp32, log2 domain: ``log2(e)`` is folded into the
    scale), keys outside ``Lk`` or padded (``key_padding_mask[b, j]`` False) get ``-inf``.  The
    running sum ``l`` takes the probabilities *before* dropout (``lse`` is that of the scores);
    the ``P V`` product takes them after (the keep mask from the counter hash, regenerated from
    ``(seed, b, h, i, j)``), and the ``1 / (1 - p)`` factor is applied once at the end.  Rows
    whose keys are all padded keep ``m = -inf``, ``l = 0``: out 0, lse -inf (no ``inf - inf``).
    ``BLOCK_M`` is the next power of two of ``Lq`` (16 .. 128, or 32/64 for fp32), so a
    Q-Former's 32 queries are one block; longer query sequences take more blocks (grid axis 1).

Backward (``_xattn_bwd_kernel``), grid ``(pair groups,)``
    A program owns whole pairs, so dk, dv and dq need no atomics.  For each pair it walks the
    key blocks; for each key block the query blocks.  Tiles are transposed (``S^T = K Q^T``,
    ``[BLOCK_N, BLOCK_M]``) so that the dk/dv products have ``BLOCK_N = 64`` rows.  Per tile:
    ``P = exp(S - lse)``, ``Pd = P * keep / (1 - p)``, ``dv += Pd^T dO``, ``dPd = dO V^T``,
    ``dP = dPd * keep / (1 - p)``, ``dS = scale * P * (dP - delta)`` (``delta = rowsum(dO * O)``),
    ``dk += dS^T Q``, ``dq += dS K``; dk and dv of the key block are stored once, in the input
    dtype.  When one query block covers Lq (``ONE_M``: the Q-Former case) q, dO, lse, delta and
    the dq accumulator stay in registers for the whole pair.  Otherwise ``delta`` is written to
    an fp32 scratch once per pair and dq accumulates across key blocks in an fp32 scratch the
    program owns (dq itself when the inputs are fp32; the last key block stores dq in the
    input dtype); a barrier after each key block orders those stores and loads between threads.

The dropout hash works on uint32 words (wrapping multiplication; literals >= 2**31 are uint32 in
Triton); the two seed words are loaded from the seed tensor in the kernel (no host sync), and
the uint32 threshold arrives biased by ``-2**31`` so that it is always an int32 argument
(``keep = (u ^ 0x80000000) as int32 >= threshold - 2**31``).  ``HAS_MASK``/``HAS_DROPOUT`` are
constexprs (a dummy pointer is passed without them).  The bool mask is read through a uint8
view.

The head dimension D is a constexpr, padded to ``BLOCK_D`` (next power of two, >= 16) with
masked loads, so D = 88 and 96 work.  Batch, head and sequence strides are passed divided by
``ALIGN`` (largest power of two <= 16 dividing them all) and multiplied back in the kernel, so
Triton can prove 16-byte aligned rows (as in mmkernels.attention.kernels).  q, k, v, out and
dout may have any strides (k/v are typically views into the fused K/V projection, row stride
``L * 2 * H * D``); outputs are contiguous.  All offsets are int64.  Products accumulate in fp32
with ``tl.dot`` on inputs in the input dtype (tensor cores for bf16/fp16; fp32 uses "ieee" or
tf32 as mmkernels._triton.input_precision decides).  Under ``TRITON_INTERPRET=1`` the same
kernels run on CPU tensors (bf16 products upcast there: ``DOT_UPCAST``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._triton import (aligned_strides, check_device, dot_upcast, input_precision, interpreting, stride_align,
                       triton_at_least)

_LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KERNEL_KINDS = ("fwd", "bwd")


class XAttnConfig(NamedTuple):
    BLOCK_M: int  # query rows per tile
    BLOCK_N: int  # key rows per tile
    num_warps: int
    num_stages: int


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


@triton.jit
def _mix32(x):
    """The 32-bit finaliser of the dropout hash (uint32 in, uint32 out, wrapping)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _row_hash(seed_ptr, pair64, Lq, rows64):
    """``a = mix(row * 0x9E3779B9 + s0)`` per query row (uint32 ``[BLOCK_M]``)."""
    s0 = tl.load(seed_ptr).to(tl.uint32)
    row = (pair64 * Lq + rows64).to(tl.uint32)  # wraps mod 2**32, as the reference's & 0xFFFFFFFF
    return _mix32(row * 0x9E3779B9 + s0)


@triton.jit
def _keep(a, cols, s1, thr_biased):
    """Keep mask ``[BLOCK_M, BLOCK_N]`` from the row hashes ``a`` and key indices ``cols``."""
    u = _mix32(a[:, None] + cols.to(tl.uint32)[None, :] * 0x85EBCA6B + s1)
    return (u ^ 0x80000000).to(tl.int32, bitcast=True) >= thr_biased


@triton.jit
def _keep_t(a, cols, s1, thr_biased):
    """Transposed keep mask ``[BLOCK_N, BLOCK_M]``."""
    u = _mix32(a[None, :] + cols.to(tl.uint32)[:, None] * 0x85EBCA6B + s1)
    return (u ^ 0x80000000).to(tl.int32, bitcast=True) >= thr_biased


@triton.jit
def _key_ok(mask_ptr, b64, stride_mb, stride_mk, cols64, col_ok, HAS_MASK: tl.constexpr):
    """Keys of the block that exist (``cols < Lk``) and, with a mask, are not padding."""
    if HAS_MASK:
        return col_ok & (tl.load(mask_ptr + b64 * stride_mb + cols64 * stride_mk, mask=col_ok, other=0) != 0)
    return col_ok


@triton.jit
def _kv_tile(base, cols64, stride_s, stride_d, offs_d64, kv_msk, DOT_UPCAST: tl.constexpr):
    """A ``[BLOCK_N, BLOCK_D]`` tile of k or v rows ``cols64`` (zeros outside ``kv_msk``)."""
    t = tl.load(base + cols64[:, None] * stride_s + offs_d64[None, :] * stride_d, mask=kv_msk, other=0.0)
    if DOT_UPCAST:  # interpreter only: its tl.dot mishandles bfloat16
        t = t.to(tl.float32)
    return t


@triton.jit
def _xattn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, mask_ptr, seed_ptr,
    qk_scale, inv_keep, thr_biased,
    n_pairs, pairs_per_program, H, Lq, Lk,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_mk,
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    D: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    stride_qb = tl.cast(stride_qb, tl.int64) * ALIGN
    stride_qh = tl.cast(stride_qh, tl.int64) * ALIGN
    stride_qs = tl.cast(stride_qs, tl.int64) * ALIGN
    stride_kb = tl.cast(stride_kb, tl.int64) * ALIGN
    stride_kh = tl.cast(stride_kh, tl.int64) * ALIGN
    stride_ks = tl.cast(stride_ks, tl.int64) * ALIGN
    stride_vb = tl.cast(stride_vb, tl.int64) * ALIGN
    stride_vh = tl.cast(stride_vh, tl.int64) * ALIGN
    stride_vs = tl.cast(stride_vs, tl.int64) * ALIGN
    pid_g = tl.program_id(0)
    pid_m = tl.program_id(1)
    first = pid_g * pairs_per_program
    last = tl.minimum(first + pairs_per_program, n_pairs)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_d64 = offs_d.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    qd_msk = row_ok[:, None] & d_ok[None, :]
    if HAS_DROPOUT:
        s1 = tl.load(seed_ptr + 1).to(tl.uint32)

    for pair in range(first, last):
        pair64 = tl.cast(pair, tl.int64)
        b64 = pair64 // H
        h64 = pair64 % H
        q = tl.load(q_ptr + b64 * stride_qb + h64 * stride_qh + rows64[:, None] * stride_qs
                    + offs_d64[None, :] * stride_qd, mask=qd_msk, other=0.0)
        if DOT_UPCAST:  # interpreter only: its tl.dot mishandles bfloat16
            q = q.to(tl.float32)
        k_base = k_ptr + b64 * stride_kb + h64 * stride_kh
        v_base = v_ptr + b64 * stride_vb + h64 * stride_vh
        if HAS_DROPOUT:
            a = _row_hash(seed_ptr, pair64, Lq, rows64)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(0, Lk, BLOCK_N):
            cols = n0 + offs_n
            col_ok = cols < Lk
            cols64 = cols.to(tl.int64)
            kv_msk = col_ok[:, None] & d_ok[None, :]
            key_ok = _key_ok(mask_ptr, b64, stride_mb, stride_mk, cols64, col_ok, HAS_MASK)
            kt = _kv_tile(k_base, cols64, stride_ks, stride_kd, offs_d64, kv_msk, DOT_UPCAST)
            s = tl.dot(q, tl.trans(kt), input_precision=INPUT_PRECISION) * qk_scale
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if HAS_DROPOUT:
                p = tl.where(_keep(a, cols, s1, thr_biased), p, 0.0)
            vt = _kv_tile(v_base, cols64, stride_vs, stride_vd, offs_d64, kv_msk, DOT_UPCAST)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=INPUT_PRECISION)
            m_i = m_new

        seen = l_i > 0.0
        l_safe = tl.where(seen, l_i, 1.0)
        if HAS_DROPOUT:
            out = acc * (inv_keep / l_safe)[:, None]
        else:
            out = acc / l_safe[:, None]
        lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        row_off = pair64 * Lq + rows64  # out [B, H, Lq, D] and lse [B, H, Lq] are contiguous
        tl.store(o_ptr + row_off[:, None] * D + offs_d64[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=qd_msk)
        tl.store(lse_ptr + row_off, lse, mask=row_ok)


@triton.jit
def _xattn_bwd_tile(qt, dot_, kt, vt, lse2, delta, key_ok, row_ok, keep_t, qk_scale, scale, inv_keep,
                    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One (key block, query block) tile: returns the transposed ``(P_d^T, dS^T)`` ``[BLOCK_N, BLOCK_M]``.

    ``dS^T`` already carries ``scale``; ``P_d`` is the dropped and rescaled probability.
    """
    st = tl.dot(kt, tl.trans(qt), input_precision=INPUT_PRECISION) * qk_scale
    ok = key_ok[:, None] & row_ok[None, :]
    # rows past Lq and rows that see nothing have lse2 = +inf: P = 0 there
    pt = tl.where(ok, tl.exp2(st - lse2[None, :]), 0.0)
    dpt = tl.dot(vt, tl.trans(dot_), input_precision=INPUT_PRECISION)
    if HAS_DROPOUT:
        pdt = tl.where(keep_t, pt * inv_keep, 0.0)
        dpt = tl.where(keep_t, dpt * inv_keep, 0.0)
    else:
        pdt = pt
    dst = pt * (dpt - delta[None, :]) * scale
    return pdt, dst


@triton.jit
def _xattn_bwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr, dqacc_ptr, delta_ptr,
    mask_ptr, seed_ptr,
    qk_scale, scale, inv_keep, thr_biased,
    n_pairs, pairs_per_program, H, Lq, Lk,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_mb, stride_mk,
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ONE_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    D: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    stride_qb = tl.cast(stride_qb, tl.int64) * ALIGN
    stride_qh = tl.cast(stride_qh, tl.int64) * ALIGN
    stride_qs = tl.cast(stride_qs, tl.int64) * ALIGN
    stride_kb = tl.cast(stride_kb, tl.int64) * ALIGN
    stride_kh = tl.cast(stride_kh, tl.int64) * ALIGN
    stride_ks = tl.cast(stride_ks, tl.int64) * ALIGN
    stride_vb = tl.cast(stride_vb, tl.int64) * ALIGN
    stride_vh = tl.cast(stride_vh, tl.int64) * ALIGN
    stride_vs = tl.cast(stride_vs, tl.int64) * ALIGN
    stride_ob = tl.cast(stride_ob, tl.int64) * ALIGN
    stride_oh = tl.cast(stride_oh, tl.int64) * ALIGN
    stride_os = tl.cast(stride_os, tl.int64) * ALIGN
    stride_dob = tl.cast(stride_dob, tl.int64) * ALIGN
    stride_doh = tl.cast(stride_doh, tl.int64) * ALIGN
    stride_dos = tl.cast(stride_dos, tl.int64) * ALIGN
    pid_g = tl.program_id(0)
    first = pid_g * pairs_per_program
    last = tl.minimum(first + pairs_per_program, n_pairs)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_d64 = offs_d.to(tl.int64)
    if HAS_DROPOUT:
        s1 = tl.load(seed_ptr + 1).to(tl.uint32)
    else:
        s1 = 0

    for pair in range(first, last):
        pair64 = tl.cast(pair, tl.int64)
        b64 = pair64 // H
        h64 = pair64 % H
        q_base = q_ptr + b64 * stride_qb + h64 * stride_qh
        o_base = o_ptr + b64 * stride_ob + h64 * stride_oh
        do_base = do_ptr + b64 * stride_dob + h64 * stride_doh
        k_base = k_ptr + b64 * stride_kb + h64 * stride_kh
        v_base = v_ptr + b64 * stride_vb + h64 * stride_vh
        row_base = pair64 * Lq  # lse, delta, dq (contiguous) rows of this pair
        kv_base = pair64 * Lk  # dk, dv (contiguous) rows of this pair
        if ONE_M:
            # one query block covers Lq: q, dO, lse, delta and dq stay in registers
            rows = offs_m
            row_ok = rows < Lq
            rows64 = rows.to(tl.int64)
            qd_msk = row_ok[:, None] & d_ok[None, :]
            qt = tl.load(q_base + rows64[:, None] * stride_qs + offs_d64[None, :] * stride_qd,
                         mask=qd_msk, other=0.0)
            dot_ = tl.load(do_base + rows64[:, None] * stride_dos + offs_d64[None, :] * stride_dod,
                           mask=qd_msk, other=0.0)
            ot = tl.load(o_base + rows64[:, None] * stride_os + offs_d64[None, :] * stride_od,
                         mask=qd_msk, other=0.0)
            delta = tl.sum(ot.to(tl.float32) * dot_.to(tl.float32), 1)
            if DOT_UPCAST:
                qt = qt.to(tl.float32)
                dot_ = dot_.to(tl.float32)
            lse = tl.load(lse_ptr + row_base + rows64, mask=row_ok, other=float("inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            if HAS_DROPOUT:
                a = _row_hash(seed_ptr, pair64, Lq, rows64)
            else:
                a = 0
            dqt = tl.zeros([BLOCK_D, BLOCK_M], tl.float32)  # dq^T: BLOCK_D rows per product
            for n0 in range(0, Lk, BLOCK_N):
                cols = n0 + offs_n
                col_ok = cols < Lk
                cols64 = cols.to(tl.int64)
                kv_msk = col_ok[:, None] & d_ok[None, :]
                key_ok = _key_ok(mask_ptr, b64, stride_mb, stride_mk, cols64, col_ok, HAS_MASK)
                kt = _kv_tile(k_base, cols64, stride_ks, stride_kd, offs_d64, kv_msk, DOT_UPCAST)
                vt = _kv_tile(v_base, cols64, stride_vs, stride_vd, offs_d64, kv_msk, DOT_UPCAST)
                if HAS_DROPOUT:
                    keep_t = _keep_t(a, cols, s1, thr_biased)
                else:
                    keep_t = key_ok[:, None]
                pdt, dst = _xattn_bwd_tile(qt, dot_, kt, vt, lse2, delta, key_ok, row_ok, keep_t,
                                           qk_scale, scale, inv_keep, HAS_DROPOUT, INPUT_PRECISION)
                dv = tl.dot(pdt.to(dot_.dtype), dot_, input_precision=INPUT_PRECISION)
                dk = tl.dot(dst.to(qt.dtype), qt, input_precision=INPUT_PRECISION)
                dqt += tl.dot(tl.trans(kt), dst.to(kt.dtype), input_precision=INPUT_PRECISION)
                kv_off = (kv_base + cols64)[:, None] * D + offs_d64[None, :]
                tl.store(dk_ptr + kv_off, dk.to(dk_ptr.dtype.element_ty), mask=kv_msk)
                tl.store(dv_ptr + kv_off, dv.to(dv_ptr.dtype.element_ty), mask=kv_msk)
            tl.store(dq_ptr + (row_base + rows64)[None, :] * D + offs_d64[:, None],
                     dqt.to(dq_ptr.dtype.element_ty), mask=row_ok[None, :] & d_ok[:, None])
        else:
            # several query blocks: delta once per pair into scratch, dq accumulates in fp32 scratch
            for m0 in range(0, Lq, BLOCK_M):
                rows = m0 + offs_m
                row_ok = rows < Lq
                rows64 = rows.to(tl.int64)
                qd_msk = row_ok[:, None] & d_ok[None, :]
                ot = tl.load(o_base + rows64[:, None] * stride_os + offs_d64[None, :] * stride_od,
                             mask=qd_msk, other=0.0).to(tl.float32)
                dot_ = tl.load(do_base + rows64[:, None] * stride_dos + offs_d64[None, :] * stride_dod,
                               mask=qd_msk, other=0.0).to(tl.float32)
                tl.store(delta_ptr + row_base + rows64, tl.sum(ot * dot_, 1), mask=row_ok)
            tl.debug_barrier()
            for n0 in range(0, Lk, BLOCK_N):
                cols = n0 + offs_n
                col_ok = cols < Lk
                cols64 = cols.to(tl.int64)
                kv_msk = col_ok[:, None] & d_ok[None, :]
                key_ok = _key_ok(mask_ptr, b64, stride_mb, stride_mk, cols64, col_ok, HAS_MASK)
                kt = _kv_tile(k_base, cols64, stride_ks, stride_kd, offs_d64, kv_msk, DOT_UPCAST)
                vt = _kv_tile(v_base, cols64, stride_vs, stride_vd, offs_d64, kv_msk, DOT_UPCAST)
                dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
                dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
                last_block = n0 + BLOCK_N >= Lk
                for m0 in range(0, Lq, BLOCK_M):
                    rows = m0 + offs_m
                    row_ok = rows < Lq
                    rows64 = rows.to(tl.int64)
                    qd_msk = row_ok[:, None] & d_ok[None, :]
                    qt = tl.load(q_base + rows64[:, None] * stride_qs + offs_d64[None, :] * stride_qd,
                                 mask=qd_msk, other=0.0)
                    dot_ = tl.load(do_base + rows64[:, None] * stride_dos + offs_d64[None, :] * stride_dod,
                                   mask=qd_msk, other=0.0)
                    if DOT_UPCAST:
                        qt = qt.to(tl.float32)
                        dot_ = dot_.to(tl.float32)
                    lse = tl.load(lse_ptr + row_base + rows64, mask=row_ok, other=float("inf"))
                    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
                    delta = tl.load(delta_ptr + row_base + rows64, mask=row_ok, other=0.0)
                    if HAS_DROPOUT:
                        keep_t = _keep_t(_row_hash(seed_ptr, pair64, Lq, rows64), cols, s1, thr_biased)
                    else:
                        keep_t = key_ok[:, None]
                    pdt, dst = _xattn_bwd_tile(qt, dot_, kt, vt, lse2, delta, key_ok, row_ok, keep_t,
                                               qk_scale, scale, inv_keep, HAS_DROPOUT, INPUT_PRECISION)
                    dv += tl.dot(pdt.to(dot_.dtype), dot_, input_precision=INPUT_PRECISION)
                    dk += tl.dot(dst.to(qt.dtype), qt, input_precision=INPUT_PRECISION)
                    dqb = tl.dot(tl.trans(dst.to(kt.dtype)), kt, input_precision=INPUT_PRECISION)
                    q_off = (row_base + rows64)[:, None] * D + offs_d64[None, :]
                    if n0 > 0:
                        dqb += tl.load(dqacc_ptr + q_off, mask=qd_msk, other=0.0)
                    if last_block:
                        tl.store(dq_ptr + q_off, dqb.to(dq_ptr.dtype.element_ty), mask=qd_msk)
                    else:
                        tl.store(dqacc_ptr + q_off, dqb, mask=qd_msk)
                kv_off = (kv_base + cols64)[:, None] * D + offs_d64[None, :]
                tl.store(dk_ptr + kv_off, dk.to(dk_ptr.dtype.element_ty), mask=kv_msk)
                tl.store(dv_ptr + kv_off, dv.to(dv_ptr.dtype.element_ty), mask=kv_msk)
                # the dq scratch written above is read by other threads at the next key block
                tl.debug_barrier()


# ---------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------


def block_d(D: int) -> int:
    """The padded head dimension: next power of two, at least 16."""
    return max(16, triton.next_power_of_2(int(D)))


def input_precisions(dtype: torch.dtype) -> tuple[str, ...]:
    """Values of INPUT_PRECISION the launchers can pass for this dtype."""
    return ("ieee", "tf32") if dtype == torch.float32 else ("tf32",)


def _block_m(Lq: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(int(Lq))))


def max_block_m(kind: str, dtype: torch.dtype, D: int, input_precision: str) -> int:
    """The largest BLOCK_M the launchers pick for (kind, dtype, D, precision)."""
    fma = dtype == torch.float32 and input_precision == "ieee"
    tf32 = dtype == torch.float32 and not fma
    if kind == "fwd":
        if fma:
            return 32
        if tf32:
            return 64 if block_d(D) <= 64 else 32
        return 128
    if kind == "bwd":
        if fma or tf32:
            return 16
        return 32 if block_d(D) <= 64 else 16
    raise ValueError(f"unknown kernel kind {kind!r}")


def heuristic_config(kind: str, dtype: torch.dtype, D: int, input_precision: str, Lq: int) -> XAttnConfig:
    """The tile configuration of kernel ``kind`` for (dtype, D, precision, query length).

    ``BLOCK_M`` is the next power of two of Lq (at least 16) up to :func:`max_block_m`.  The
    rest comes from the sm_90a compile reports (tests/test_sm90_cross_attention.py): no spills,
    shared memory within 227 KB, tensor cores for 16-bit inputs and for tf32.  The backward holds
    more than the forward (the transposed ``[BLOCK_N, BLOCK_M]`` tiles of S, dP, dS, the dk and dv
    tiles, and dq when one query block covers Lq), hence its smaller BLOCK_M.

    Triton >= 3.9 generates more register-hungry code for these kernels and has ptxas allocate
    with --regAllocOptLevel=2, so two tiles chosen with Triton 3.6 spill there; on Triton >= 3.9
    (only) they are replaced by the largest tile that compiles for sm_90a with no spills:
    the 16-bit forward with BLOCK_M = 128 and D > 64 takes one stage instead of two (same
    tile), and the exact-fp32 backward with D > 64 and one query block (dq in registers) takes
    8 warps instead of 4 (same tile, its state spread over twice the threads).
    """
    bd = block_d(D)
    bm = _block_m(Lq, max_block_m(kind, dtype, D, input_precision))
    fma = dtype == torch.float32 and input_precision == "ieee"  # exact fp32: FMA dot
    tf32 = dtype == torch.float32 and not fma
    if kind == "fwd":
        if fma:
            return XAttnConfig(bm, 32 if bd <= 64 else 16, 4, 2)
        if tf32:
            return XAttnConfig(bm, 32, 4, 2)
        stages = 1 if (bm == 128 and bd > 64 and triton_at_least(3, 9)) else 2
        return XAttnConfig(bm, 64, 8 if bm == 128 or (bd > 64 and bm == 64) else 4, stages)
    if kind == "bwd":
        one_m = Lq <= bm
        if fma:
            return XAttnConfig(bm, 16, 8 if (one_m and bd > 64 and triton_at_least(3, 9)) else 4, 1)
        if tf32:
            return XAttnConfig(bm, 64 if bd <= 64 else 16, 4, 1)
        if bd <= 64:
            return XAttnConfig(bm, 64, 4, 1)
        # D = 128: dq in registers (one query block) needs the second warpgroup
        return XAttnConfig(bm, 64, 8 if one_m else 4, 1)
    raise ValueError(f"unknown kernel kind {kind!r}")


#: query lengths that reach every configuration (each power of two, one past it, and a long one)
_LQ_PROBES = (1, 16, 17, 32, 33, 64, 65, 128, 129, 256, 300)


def candidate_launches(kind: str, dtype: torch.dtype, D: int, input_precision: str
                       ) -> list[tuple[XAttnConfig, bool]]:
    """Every (config, one query block) the launchers can pick for (kind, dtype, D, precision)."""
    out: list[tuple[XAttnConfig, bool]] = []
    for lq in _LQ_PROBES:
        c = heuristic_config(kind, dtype, D, input_precision, lq)
        key = (c, kind == "fwd" or lq <= c.BLOCK_M)
        if key not in out:
            out.append(key)
    return out


def candidate_configs(kind: str, dtype: torch.dtype, D: int, input_precision: str) -> list[XAttnConfig]:
    """Every configuration the launchers can pick for (kind, dtype, D, precision)."""
    out: list[XAttnConfig] = []
    for c, _ in candidate_launches(kind, dtype, D, input_precision):
        if c not in out:
            out.append(c)
    return out


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count  # cached: no sync
    return 4


def pairs_per_program(n_pairs: int, work_programs: int, device: torch.device) -> int:
    """(b, h) pairs per program: up to 8, keeping at least ~4 programs per SM in the launch."""
    target = 4 * _num_sms(device)
    return max(1, min(8, (n_pairs * work_programs) // max(1, target)))


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, seed):
    check_device(q)
    if q.dtype not in _DTYPES:
        raise TypeError(f"the triton cross_attention kernels take float32/bfloat16/float16, got {q.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported by the triton kernels")
    if dropout_p > 0 and seed is None:
        raise ValueError("dropout_p > 0 needs a seed")


def _mask_args(key_padding_mask, dummy):
    """(uint8 view of the mask, stride_b, stride_k) or a dummy when there is no mask."""
    if key_padding_mask is None:
        return dummy, 0, 0
    m = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask
    return m, m.stride(0), m.stride(1)


def _dropout_args(dropout_p: float, seed, dummy):
    """(seed pointer, 1 / (1 - p), threshold - 2**31) for the kernels."""
    if dropout_p <= 0:
        return dummy, 1.0, 0
    from .reference import dropout_threshold
    seed = seed if seed.is_contiguous() else seed.contiguous()
    return seed, 1.0 / (1.0 - float(dropout_p)), dropout_threshold(float(dropout_p)) - 2 ** 31


def _pick(kind, dtype, D, prec, Lq, config):
    if isinstance(config, dict):
        config = config.get(kind)
    if config is None:
        return heuristic_config(kind, dtype, D, prec, Lq)
    return config


def cross_attention_fwd_triton(q, k, v, key_padding_mask, seed, scale, dropout_p, *, config=None,
                               pairs=None):
    """(out [B, H, Lq, D] contiguous in q's dtype, lse [B, H, Lq] float32).

    ``config``: an :class:`XAttnConfig` (or a dict kind -> XAttnConfig) forcing the tiles and
    ``pairs`` the (b, h) pairs per program (tests).
    """
    dropout_p = float(dropout_p)
    _check(q, k, v, dropout_p, seed)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dev = q.device
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=dev)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=dev)
    prec = input_precision(q.dtype)
    cfg = _pick("fwd", q.dtype, D, prec, Lq, config)
    n_pairs = B * H
    n_mb = triton.cdiv(Lq, cfg.BLOCK_M)
    ppp = pairs if pairs is not None else pairs_per_program(n_pairs, n_mb, dev)
    mask, smb, smk = _mask_args(key_padding_mask, lse)
    seed_t, inv_keep, thr = _dropout_args(dropout_p, seed, lse)
    al = stride_align(q, k, v)
    _xattn_fwd_kernel[(triton.cdiv(n_pairs, ppp), n_mb)](
        q, k, v, out, lse, mask, seed_t,
        float(scale) * _LOG2E, inv_keep, thr,
        n_pairs, ppp, H, Lq, Lk,
        *aligned_strides(q, al), *aligned_strides(k, al), *aligned_strides(v, al), smb, smk,
        HAS_MASK=key_padding_mask is not None, HAS_DROPOUT=dropout_p > 0, INPUT_PRECISION=prec,
        DOT_UPCAST=dot_upcast(q.dtype), D=D, ALIGN=al,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=block_d(D),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def cross_attention_bwd_triton(q, k, v, out, lse, dout, key_padding_mask, seed, scale, dropout_p, *,
                               config=None, pairs=None):
    """(dq, dk, dv), contiguous, in the input dtypes (rows that see nothing pass no gradient)."""
    dropout_p = float(dropout_p)
    _check(q, k, v, dropout_p, seed)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dev = q.device
    prec = input_precision(q.dtype)
    scale = float(scale)
    lse = lse.to(torch.float32)
    lse = lse if lse.is_contiguous() else lse.contiguous()
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=dev)
    dk = torch.empty((B, H, Lk, D), dtype=k.dtype, device=dev)
    dv = torch.empty((B, H, Lk, D), dtype=v.dtype, device=dev)
    cfg = _pick("bwd", q.dtype, D, prec, Lq, config)
    one_m = Lq <= cfg.BLOCK_M
    if one_m:
        dqacc = delta = lse  # unused
    else:
        dqacc = dq if q.dtype == torch.float32 else torch.empty((B, H, Lq, D), dtype=torch.float32, device=dev)
        delta = torch.empty((B, H, Lq), dtype=torch.float32, device=dev)
    n_pairs = B * H
    ppp = pairs if pairs is not None else pairs_per_program(n_pairs, 1, dev)
    mask, smb, smk = _mask_args(key_padding_mask, lse)
    seed_t, inv_keep, thr = _dropout_args(dropout_p, seed, lse)
    al = stride_align(q, k, v, out, dout)
    _xattn_bwd_kernel[(triton.cdiv(n_pairs, ppp),)](
        q, k, v, out, dout, lse, dq, dk, dv, dqacc, delta, mask, seed_t,
        scale * _LOG2E, scale, inv_keep, thr,
        n_pairs, ppp, H, Lq, Lk,
        *aligned_strides(q, al), *aligned_strides(k, al), *aligned_strides(v, al), *aligned_strides(out, al),
        *aligned_strides(dout, al),
        smb, smk,
        HAS_MASK=key_padding_mask is not None, HAS_DROPOUT=dropout_p > 0, ONE_M=one_m,
        INPUT_PRECISION=prec, DOT_UPCAST=dot_upcast(q.dtype), D=D, ALIGN=al,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=block_d(D),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq, dk, dv


# ---------------------------------------------------------------------------
# Compile tier support: the exact specialisations launches produce
# ---------------------------------------------------------------------------

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
_DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
#: head dims compiled by the tier per dtype (64: BLOCK_D 64; 88: ALIGN 8, masked; 96, 128: BLOCK_D
#: 128; D = 96 differs from 128 only by the masked columns, compiled for bf16 only)
COMPILE_HEAD_DIMS = {torch.bfloat16: (64, 88, 96, 128), torch.float16: (64, 88, 128),
                     torch.float32: (64, 88, 128)}


def compile_spec(kind: str, dtype: torch.dtype, D: int, input_precision: str, config: XAttnConfig, *,
                 has_mask: bool = True, has_dropout: bool = True, one_m: bool = True):
    """(kernel, signature, constexprs, divisible_by_16) of one launch, for mmkernels.testing.sm90.

    Describes a launch with B = 128, H = 12, Lk = 577 (a ViT-L/14 image), Lq = BLOCK_M (one
    query block) or 4 * BLOCK_M (``one_m=False``), q/dout/out contiguous and k/v strided views
    of a fused K/V projection of L = 12 layers (row stride ``L * 2 * H * D``), as Triton would
    specialise it (ints equal to 1 become constexprs, ints divisible by 16 get the hint).
    """
    from ..testing.sm90 import launch_signature
    ptr = _PTR[dtype]
    B, H, Lk, L = 128, 12, 577, 12
    Lq = config.BLOCK_M if one_m else 4 * config.BLOCK_M
    kv_row = L * 2 * H * D
    q_st = (H * Lq * D, Lq * D, D, 1)
    kv_st = (Lk * kv_row, D, kv_row, 1)
    g = 0
    for s in q_st[:3] + kv_st[:3]:
        g = math.gcd(g, s)
    al = 16
    while al > 1 and g % al:
        al //= 2

    def div(st):
        return (st[0] // al, st[1] // al, st[2] // al, st[3])

    ints = {"n_pairs": B * H, "pairs_per_program": 3, "H": H, "Lq": Lq, "Lk": Lk,
            "thr_biased": (429496729 - 2 ** 31) if has_dropout else 0}
    groups = [("q", q_st), ("k", kv_st), ("v", kv_st)]
    if kind == "fwd":
        kernel = _xattn_fwd_kernel
        sig = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "o_ptr": ptr, "lse_ptr": "*fp32",
               "mask_ptr": "*u8" if has_mask else "*fp32", "seed_ptr": "*i64" if has_dropout else "*fp32"}
        floats = ["qk_scale", "inv_keep"]
        extra = {}
    elif kind == "bwd":
        kernel = _xattn_bwd_kernel
        sig = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "o_ptr": ptr, "do_ptr": ptr, "lse_ptr": "*fp32",
               "dq_ptr": ptr, "dk_ptr": ptr, "dv_ptr": ptr,
               "dqacc_ptr": "*fp32", "delta_ptr": "*fp32",
               "mask_ptr": "*u8" if has_mask else "*fp32", "seed_ptr": "*i64" if has_dropout else "*fp32"}
        floats = ["qk_scale", "scale", "inv_keep"]
        groups += [("o", q_st), ("do", q_st)]
        extra = {"ONE_M": bool(one_m)}
    else:
        raise ValueError(f"unknown kernel kind {kind!r}")
    for pre, st in groups:
        ints.update(zip([f"stride_{pre}{c}" for c in "bhsd"], div(st)))
    ints.update(stride_mb=Lk if has_mask else 0, stride_mk=1 if has_mask else 0)
    constexprs = {"HAS_MASK": bool(has_mask), "HAS_DROPOUT": bool(has_dropout),
                  "INPUT_PRECISION": input_precision, "DOT_UPCAST": False, "D": D, "ALIGN": al,
                  "BLOCK_M": config.BLOCK_M, "BLOCK_N": config.BLOCK_N, "BLOCK_D": block_d(D), **extra}
    return (kernel, *launch_signature(sig, ints, constexprs, floats))


def compile_specs(dtypes=_DTYPES, head_dims=None):
    """The sm_90 compile jobs (``mmkernels.testing.sm90.CompileJob``) of every config the launchers pick.

    For each kernel kind, dtype, input precision, head dim and candidate launch (config and,
    for the backward, one query block or several): the kernel with key padding mask and dropout
    (the most registers), and -- for the smallest and largest launch and BLOCK_M = 32 -- also
    without either.  Labels are unique.
    """
    from ..testing.sm90 import CompileJob
    jobs = []
    for kind in KERNEL_KINDS:
        for dtype in dtypes:
            for prec in input_precisions(dtype):
                for D in (head_dims or COMPILE_HEAD_DIMS[dtype]):
                    launches = candidate_launches(kind, dtype, D, prec)
                    for i, (cfg, one_m) in enumerate(launches):
                        flag_sets = [(True, True)]
                        if i in (0, len(launches) - 1):
                            flag_sets.append((False, False))
                        for has_mask, has_dropout in flag_sets:
                            kernel, sig, constexprs, div = compile_spec(
                                kind, dtype, D, prec, cfg, has_mask=has_mask,
                                has_dropout=has_dropout, one_m=one_m)
                            label = (f"{kind}-{_DT[dtype]}-{prec}-D{D}-{cfg.BLOCK_M}x{cfg.BLOCK_N}"
                                     f"-w{cfg.num_warps}-s{cfg.num_stages}"
                                     f"-{'mask' if has_mask else 'nomask'}"
                                     f"-{'drop' if has_dropout else 'nodrop'}"
                                     + ("" if kind == "fwd" else ("-onem" if one_m else "-multim")))
                            jobs.append(CompileJob(kernel, sig, constexprs, cfg.num_warps,
                                                   cfg.num_stages, div, label=label))
    return jobs
