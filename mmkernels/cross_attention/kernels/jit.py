"""The Triton kernels of few-query cross-attention (launched by :mod:`.launch`).

``q``/``k``/``v``/``out``/``dout`` are ``[B, H, L, D]`` with any strides (batch/head/sequence
strides divided by ``ALIGN``, see :func:`mmkernels._triton.stride_align`); ``lse``, ``row_max``
(log2 domain) and ``row_sum`` fp32 ``[B, H, Lq]``, dq/dk/dv contiguous; the key padding mask is read as uint8 ``[B, Lk]``, the
dropout seed as int64 ``[2]``. Each program owns ``pairs_per_program`` consecutive (b, h) pairs.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..._triton import block_range, head_dim_range, load_rows, scaled_strides, softmax_lse


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
def _key_block(cols, Lk, d_ok, mask_ptr, b64, stride_mb, stride_mk, HAS_MASK: tl.constexpr):
    """The key block ``cols`` of pair batch ``b64``: ``(cols64, kv_msk [BLOCK_N, BLOCK_D], key_ok
    [BLOCK_N])``; ``key_ok``: keys that exist (``cols < Lk``) and, with a mask, are not padding."""
    col_ok = cols < Lk
    cols64 = cols.to(tl.int64)
    key_ok = col_ok
    if HAS_MASK:
        key_ok = col_ok & (tl.load(mask_ptr + b64 * stride_mb + cols64 * stride_mk, mask=col_ok, other=0) != 0)
    return cols64, col_ok[:, None] & d_ok[None, :], key_ok


@triton.jit
def _row_stats(max_ptr, sum_ptr, row_off, row_ok):
    """The saved softmax statistics of query rows ``row_off`` as the backward uses them:
    ``(m2, inv_l)`` fp32 ``[BLOCK_M]``, so that ``P = exp2(s - m2) * inv_l``. Rows past the end
    and rows that saw no key (``row_sum = 0``) get ``m2 = +inf`` and ``inv_l = 0``: P = 0 there."""
    m2 = tl.load(max_ptr + row_off, mask=row_ok, other=float("inf"))
    l = tl.load(sum_ptr + row_off, mask=row_ok, other=0.0)
    seen = l > 0.0
    return tl.where(seen, m2, float("inf")), tl.where(seen, 1.0 / tl.where(seen, l, 1.0), 0.0)


@triton.jit
def xattn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, max_ptr, sum_ptr, mask_ptr, seed_ptr,
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
    """Forward, grid ``(pair groups, query blocks)``: for each pair, an online softmax over the
    key blocks (fp32, log2 domain); ``l`` sums the probabilities before dropout, ``P V`` takes
    them after (keep mask regenerated from the seed), ``1 / (1 - p)`` applied once at the end.
    Saves the row max ``m`` (log2 domain) and the sum ``l`` apart for the backward, and
    ``lse = (m + log2 l) ln 2`` for inspection. Rows whose keys are all padded: out 0, lse -inf,
    m -inf, l 0."""
    stride_qb, stride_qh, stride_qs = scaled_strides(stride_qb, stride_qh, stride_qs, ALIGN)
    stride_kb, stride_kh, stride_ks = scaled_strides(stride_kb, stride_kh, stride_ks, ALIGN)
    stride_vb, stride_vh, stride_vs = scaled_strides(stride_vb, stride_vh, stride_vs, ALIGN)
    pid_g = tl.program_id(0)
    pid_m = tl.program_id(1)
    first = pid_g * pairs_per_program
    last = tl.minimum(first + pairs_per_program, n_pairs)

    rows, row_ok, rows64 = block_range(pid_m, BLOCK_M, Lq)
    offs_d, d_ok, offs_d64 = head_dim_range(D, BLOCK_D)
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
            cols64, kv_msk, key_ok = _key_block(cols, Lk, d_ok, mask_ptr, b64, stride_mb, stride_mk, HAS_MASK)
            kt = load_rows(k_base, cols64, stride_ks, stride_kd, offs_d64, kv_msk, DOT_UPCAST)
            s = tl.dot(q, tl.trans(kt), input_precision=INPUT_PRECISION) * qk_scale
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if HAS_DROPOUT:
                p = tl.where(_keep(a, cols, s1, thr_biased), p, 0.0)
            vt = load_rows(v_base, cols64, stride_vs, stride_vd, offs_d64, kv_msk, DOT_UPCAST)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=INPUT_PRECISION)
            m_i = m_new

        l_safe, lse = softmax_lse(m_i, l_i)
        if HAS_DROPOUT:
            out = acc * (inv_keep / l_safe)[:, None]
        else:
            out = acc / l_safe[:, None]
        row_off = pair64 * Lq + rows64  # out [B, H, Lq, D] and lse [B, H, Lq] are contiguous
        tl.store(o_ptr + row_off[:, None] * D + offs_d64[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=qd_msk)
        tl.store(lse_ptr + row_off, lse, mask=row_ok)
        tl.store(max_ptr + row_off, m_i, mask=row_ok)
        tl.store(sum_ptr + row_off, l_i, mask=row_ok)


@triton.jit
def _xattn_bwd_tile(qt, dot_, kt, vt, m2, inv_l, delta, key_ok, row_ok, keep_t, qk_scale, scale, inv_keep,
                    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One (key block, query block) tile: returns the transposed ``(P_d^T, dS^T)`` ``[BLOCK_N, BLOCK_M]``.

    ``dS^T`` already carries ``scale``; ``P_d`` is the dropped and rescaled probability.
    """
    st = tl.dot(kt, tl.trans(qt), input_precision=INPUT_PRECISION) * qk_scale
    ok = key_ok[:, None] & row_ok[None, :]
    # P = exp2(s - m2) / l with the row max and sum kept apart (exact subtraction of the max, as
    # eager softmax); rows past Lq and rows that see nothing have m2 = +inf, inv_l = 0: P = 0
    pt = tl.where(ok, tl.exp2(st - m2[None, :]) * inv_l[None, :], 0.0)
    dpt = tl.dot(vt, tl.trans(dot_), input_precision=INPUT_PRECISION)
    if HAS_DROPOUT:
        pdt = tl.where(keep_t, pt * inv_keep, 0.0)
        dpt = tl.where(keep_t, dpt * inv_keep, 0.0)
    else:
        pdt = pt
    dst = pt * (dpt - delta[None, :]) * scale
    return pdt, dst


@triton.jit
def xattn_bwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, max_ptr, sum_ptr, dq_ptr, dk_ptr, dv_ptr, dqacc_ptr, delta_ptr,
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
    """Backward, grid ``(pair groups,)``: a program owns whole pairs, so dq/dk/dv need no atomics.
    Tiles are transposed (``[BLOCK_N, BLOCK_M]``). ``ONE_M`` (Lq fits one query block): q, dO,
    the row statistics, delta and dq stay in registers; otherwise delta goes to an fp32 scratch once per pair
    and dq accumulates in the fp32 scratch ``dqacc`` across key blocks."""
    stride_qb, stride_qh, stride_qs = scaled_strides(stride_qb, stride_qh, stride_qs, ALIGN)
    stride_kb, stride_kh, stride_ks = scaled_strides(stride_kb, stride_kh, stride_ks, ALIGN)
    stride_vb, stride_vh, stride_vs = scaled_strides(stride_vb, stride_vh, stride_vs, ALIGN)
    stride_ob, stride_oh, stride_os = scaled_strides(stride_ob, stride_oh, stride_os, ALIGN)
    stride_dob, stride_doh, stride_dos = scaled_strides(stride_dob, stride_doh, stride_dos, ALIGN)
    pid_g = tl.program_id(0)
    first = pid_g * pairs_per_program
    last = tl.minimum(first + pairs_per_program, n_pairs)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d, d_ok, offs_d64 = head_dim_range(D, BLOCK_D)
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
            # one query block covers Lq: q, dO, the row statistics, delta and dq stay in registers
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
            m2, inv_l = _row_stats(max_ptr, sum_ptr, row_base + rows64, row_ok)
            if HAS_DROPOUT:
                a = _row_hash(seed_ptr, pair64, Lq, rows64)
            else:
                a = 0
            dqt = tl.zeros([BLOCK_D, BLOCK_M], tl.float32)  # dq^T: BLOCK_D rows per product
            for n0 in range(0, Lk, BLOCK_N):
                cols = n0 + offs_n
                cols64, kv_msk, key_ok = _key_block(cols, Lk, d_ok, mask_ptr, b64, stride_mb, stride_mk,
                                                    HAS_MASK)
                kt = load_rows(k_base, cols64, stride_ks, stride_kd, offs_d64, kv_msk, DOT_UPCAST)
                vt = load_rows(v_base, cols64, stride_vs, stride_vd, offs_d64, kv_msk, DOT_UPCAST)
                if HAS_DROPOUT:
                    keep_t = _keep_t(a, cols, s1, thr_biased)
                else:
                    keep_t = key_ok[:, None]
                pdt, dst = _xattn_bwd_tile(qt, dot_, kt, vt, m2, inv_l, delta, key_ok, row_ok, keep_t,
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
                cols64, kv_msk, key_ok = _key_block(cols, Lk, d_ok, mask_ptr, b64, stride_mb, stride_mk,
                                                    HAS_MASK)
                kt = load_rows(k_base, cols64, stride_ks, stride_kd, offs_d64, kv_msk, DOT_UPCAST)
                vt = load_rows(v_base, cols64, stride_vs, stride_vd, offs_d64, kv_msk, DOT_UPCAST)
                dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
                dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
                last_block = n0 + BLOCK_N >= Lk
                for m0 in range(0, Lq, BLOCK_M):
                    rows = m0 + offs_m
                    row_ok = rows < Lq
                    rows64 = rows.to(tl.int64)
                    qd_msk = row_ok[:, None] & d_ok[None, :]
                    qt = load_rows(q_base, rows64, stride_qs, stride_qd, offs_d64, qd_msk, DOT_UPCAST)
                    dot_ = load_rows(do_base, rows64, stride_dos, stride_dod, offs_d64, qd_msk, DOT_UPCAST)
                    m2, inv_l = _row_stats(max_ptr, sum_ptr, row_base + rows64, row_ok)
                    delta = tl.load(delta_ptr + row_base + rows64, mask=row_ok, other=0.0)
                    if HAS_DROPOUT:
                        keep_t = _keep_t(_row_hash(seed_ptr, pair64, Lq, rows64), cols, s1, thr_biased)
                    else:
                        keep_t = key_ok[:, None]
                    pdt, dst = _xattn_bwd_tile(qt, dot_, kt, vt, m2, inv_l, delta, key_ok, row_ok, keep_t,
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
