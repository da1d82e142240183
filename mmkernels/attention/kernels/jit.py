"""The Triton kernels of multimodal masked attention (launched by :mod:`.launch`).

Tensors are ``[B, H, S, D]`` with any strides; batch/head/sequence strides arrive divided by
``ALIGN`` (see :func:`mmkernels._triton.stride_align`). ``lse``/``delta`` are fp32 ``[B, Hq, Sq]``,
and so are the row statistics the backward reads: ``m`` (row max of the scores in the log2
domain, ``s * scale * log2(e)``) and ``l`` (row sum of ``exp2(s - m)``), kept apart so that
``P = exp2(s - m) / l`` carries no rounding of a combined lse.
The tile map is int8 ``[B, Tm, Tn]`` (0 EMPTY, 1 FULL, 2 PARTIAL) at ``BLOCK_M x BLOCK_N``; the
mask metadata are int32 ``[B, S]`` per side and the int8 ``[NM, NM]`` rule table.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..._triton import (block_range, bwd_query_rows_stats, head_dim_range, load_rows, scaled_strides,
                        softmax_lse)


@triton.jit
def _token_meta(mod_ptr, seg_ptr, pos_ptr, run_ptr, offs, ok, SEG_PAD: tl.constexpr):
    """(modality, segment, position, run) int32 vectors of the tokens at ``offs``; tokens outside
    ``ok`` get segment ``SEG_PAD`` (-1 for queries: see nothing; -2 for keys: match no query)."""
    return (tl.load(mod_ptr + offs, mask=ok, other=0), tl.load(seg_ptr + offs, mask=ok, other=SEG_PAD),
            tl.load(pos_ptr + offs, mask=ok, other=0), tl.load(run_ptr + offs, mask=ok, other=0))


@triton.jit
def _visible(qm, qs, qp, qr, km, ks, kp, kr, rules_ptr, NM):
    """Per-element visibility ``[BM, BN]`` from the query-side and key-side metadata vectors."""
    rule = tl.load(rules_ptr + (qm[:, None] * NM + km[None, :]))
    causal = kp[None, :] <= qp[:, None]
    same_run = kr[None, :] == qr[:, None]
    vis = (rule == 1) | ((rule == 2) & causal) | ((rule == 3) & (causal | same_run))
    seg_ok = (qs[:, None] >= 0) & (qs[:, None] == ks[None, :])
    return vis & seg_ok


@triton.jit
def _visible_t(qm, qs, qp, qr, km, ks, kp, kr, rules_ptr, NM):
    """Transposed visibility ``[BN, BM]`` (keys along the rows)."""
    rule = tl.load(rules_ptr + (qm[None, :] * NM + km[:, None]))
    causal = kp[:, None] <= qp[None, :]
    same_run = kr[:, None] == qr[None, :]
    vis = (rule == 1) | ((rule == 2) & causal) | ((rule == 3) & (causal | same_run))
    seg_ok = (qs[None, :] >= 0) & (qs[None, :] == ks[:, None])
    return vis & seg_ok


@triton.jit
def _query_block(Sq, Hq, GROUP, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """This program's query block in a grid ``(query blocks, B * Hq)``: ``(pid_m, pid_bh, b64,
    h64, hk64, row_ok, rows64, d_ok, offs_d64, offs_n)``; ``hk64`` is the K/V head of query head
    ``h`` (GQA groups of ``GROUP``), ``offs_n`` the key offsets within a key block."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    _, row_ok, rows64 = block_range(pid_m, BLOCK_M, Sq)
    _, d_ok, offs_d64 = head_dim_range(D, BLOCK_D)
    return (pid_m, pid_bh, b.to(tl.int64), h.to(tl.int64), (h // GROUP).to(tl.int64), row_ok,
            rows64, d_ok, offs_d64, tl.arange(0, BLOCK_N))


@triton.jit
def _tile_class(tile_ptr, HAS_MASK: tl.constexpr):
    """Class of one tile of the tile map (0 EMPTY, 1 FULL, 2 PARTIAL); FULL without a mask."""
    if HAS_MASK:
        return tl.load(tile_ptr).to(tl.int32)
    return 1


@triton.jit
def _partial_visible(ok, tcls, qm, qs, qp, qr, kmod_ptr, kseg_ptr, kpos_ptr, krun_ptr, kmeta, col_ok,
                     rules_ptr, NM):
    """``ok [BLOCK_M, BLOCK_N]`` narrowed by the mask rule per element on PARTIAL tiles
    (``tcls == 2``); FULL tiles keep ``ok``. ``kmeta`` indexes the key-side metadata."""
    if tcls == 2:
        km, ks, kp, kr = _token_meta(kmod_ptr, kseg_ptr, kpos_ptr, krun_ptr, kmeta, col_ok, -2)
        ok = ok & _visible(qm, qs, qp, qr, km, ks, kp, kr, rules_ptr, NM)
    return ok


@triton.jit
def attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, m_ptr, l_ptr, tile_ptr,
    qmod_ptr, kmod_ptr, qseg_ptr, kseg_ptr, qpos_ptr, kpos_ptr, qrun_ptr, krun_ptr, rules_ptr,
    qk_scale, Sq, Sk, Hq, GROUP, NM, n_tm, n_tn,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    HAS_MASK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    D: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Forward, grid ``(query blocks, B * Hq)``: out in the input dtype and fp32 ``lse``, ``m``,
    ``l`` of one query block, walking the key blocks the tile map does not mark EMPTY."""
    stride_qb, stride_qh, stride_qs = scaled_strides(stride_qb, stride_qh, stride_qs, ALIGN)
    stride_kb, stride_kh, stride_ks = scaled_strides(stride_kb, stride_kh, stride_ks, ALIGN)
    stride_vb, stride_vh, stride_vs = scaled_strides(stride_vb, stride_vh, stride_vs, ALIGN)
    stride_ob, stride_oh, stride_os = scaled_strides(stride_ob, stride_oh, stride_os, ALIGN)
    pid_m, pid_bh, b64, h64, hk64, row_ok, rows64, d_ok, offs_d64, offs_n = _query_block(
        Sq, Hq, GROUP, D, BLOCK_M, BLOCK_N, BLOCK_D)
    q = load_rows(q_ptr + b64 * stride_qb + h64 * stride_qh, rows64, stride_qs, stride_qd, offs_d64,
                  row_ok[:, None] & d_ok[None, :], DOT_UPCAST)
    k_base = k_ptr + b64 * stride_kb + hk64 * stride_kh
    v_base = v_ptr + b64 * stride_vb + hk64 * stride_vh
    tile_row = tile_ptr + (b64 * n_tm + pid_m) * n_tn  # this query block's row of the tile map
    if HAS_MASK:
        qm, qs, qp, qr = _token_meta(qmod_ptr, qseg_ptr, qpos_ptr, qrun_ptr, b64 * Sq + rows64, row_ok, -1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for nb in range(0, n_tn):
        tcls = _tile_class(tile_row + nb, HAS_MASK)
        if tcls != 0:  # EMPTY tiles: K/V never loaded
            cols = nb * BLOCK_N + offs_n
            col_ok = cols < Sk
            cols64 = cols.to(tl.int64)
            kv_msk = col_ok[:, None] & d_ok[None, :]
            kt = load_rows(k_base, cols64, stride_ks, stride_kd, offs_d64, kv_msk, DOT_UPCAST)
            s = tl.dot(q, tl.trans(kt), input_precision=INPUT_PRECISION) * qk_scale
            ok = tl.broadcast_to(col_ok[None, :], (BLOCK_M, BLOCK_N))
            if HAS_MASK:
                ok = _partial_visible(ok, tcls, qm, qs, qp, qr, kmod_ptr, kseg_ptr, kpos_ptr, krun_ptr,
                                      b64 * Sk + cols64, col_ok, rules_ptr, NM)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = load_rows(v_base, cols64, stride_vs, stride_vd, offs_d64, kv_msk, DOT_UPCAST)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=INPUT_PRECISION)
            m_i = m_new

    l_safe, lse = softmax_lse(m_i, l_i)
    out = acc / l_safe[:, None]
    o_base = o_ptr + b64 * stride_ob + h64 * stride_oh
    tl.store(o_base + rows64[:, None] * stride_os + offs_d64[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    row_idx = pid_bh.to(tl.int64) * Sq + rows64
    tl.store(lse_ptr + row_idx, lse, mask=row_ok)
    tl.store(m_ptr + row_idx, m_i, mask=row_ok)
    tl.store(l_ptr + row_idx, l_i, mask=row_ok)


@triton.jit
def attn_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr,
    Sq, Hq,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_dob, stride_doh, stride_dos, stride_dod,
    D: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta[b, h, i] = sum_d dout[b, h, i, d] * out[b, h, i, d] (fp32)."""
    stride_ob, stride_oh, stride_os = scaled_strides(stride_ob, stride_oh, stride_os, ALIGN)
    stride_dob, stride_doh, stride_dos = scaled_strides(stride_dob, stride_doh, stride_dos, ALIGN)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // Hq).to(tl.int64)
    h64 = (pid_bh % Hq).to(tl.int64)
    _, row_ok, rows64 = block_range(pid_m, BLOCK_M, Sq)
    _, d_ok, offs_d64 = head_dim_range(D, BLOCK_D)
    msk = row_ok[:, None] & d_ok[None, :]
    o = tl.load(o_ptr + b64 * stride_ob + h64 * stride_oh + rows64[:, None] * stride_os
                + offs_d64[None, :] * stride_od, mask=msk, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b64 * stride_dob + h64 * stride_doh + rows64[:, None] * stride_dos
                 + offs_d64[None, :] * stride_dod, mask=msk, other=0.0).to(tl.float32)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * Sq + rows64, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, m_ptr, l_ptr, delta_ptr, dk_ptr, dv_ptr, tile_ptr,
    qmod_ptr, kmod_ptr, qseg_ptr, kseg_ptr, qpos_ptr, kpos_ptr, qrun_ptr, krun_ptr, rules_ptr,
    qk_scale, scale, Sq, Sk, Hq, Hkv, GROUP, NM, n_tm, n_tn,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    HAS_MASK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    D: tl.constexpr,
    ALIGN: tl.constexpr,
    PART: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dk/dv of one key block, grid ``(key blocks, B * Hkv)``, over the query heads of its GQA
    group on transposed ``[BLOCK_N, BLOCK_M]`` tiles; ``PART``: 0 both, 1 dv only, 2 dk only."""
    stride_qb, stride_qh, stride_qs = scaled_strides(stride_qb, stride_qh, stride_qs, ALIGN)
    stride_kb, stride_kh, stride_ks = scaled_strides(stride_kb, stride_kh, stride_ks, ALIGN)
    stride_vb, stride_vh, stride_vs = scaled_strides(stride_vb, stride_vh, stride_vs, ALIGN)
    stride_dob, stride_doh, stride_dos = scaled_strides(stride_dob, stride_doh, stride_dos, ALIGN)
    stride_dkb, stride_dkh, stride_dks = scaled_strides(stride_dkb, stride_dkh, stride_dks, ALIGN)
    stride_dvb, stride_dvh, stride_dvs = scaled_strides(stride_dvb, stride_dvh, stride_dvs, ALIGN)
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = pid_bk // Hkv
    hk = pid_bk % Hkv
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)

    cols, col_ok, cols64 = block_range(pid_n, BLOCK_N, Sk)
    offs_d, d_ok, offs_d64 = head_dim_range(D, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    kv_msk = col_ok[:, None] & d_ok[None, :]

    kt = tl.load(k_ptr + b64 * stride_kb + hk64 * stride_kh + cols64[:, None] * stride_ks
                 + offs_d64[None, :] * stride_kd, mask=kv_msk, other=0.0)
    vt = tl.load(v_ptr + b64 * stride_vb + hk64 * stride_vh + cols64[:, None] * stride_vs
                 + offs_d64[None, :] * stride_vd, mask=kv_msk, other=0.0)
    if DOT_UPCAST:
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)
    # PART: 0 dk and dv, 1 dv only, 2 dk only (large D: one [BLOCK_N, BLOCK_D] accumulator)
    tile_col = tile_ptr + b64 * n_tm * n_tn + pid_n  # this key block's column of the tile map
    if HAS_MASK:
        km, ks, kp, kr = _token_meta(kmod_ptr, kseg_ptr, kpos_ptr, krun_ptr, b64 * Sk + cols64, col_ok, -2)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    for g in range(0, GROUP):
        h64 = (hk * GROUP + g).to(tl.int64)
        q_base = q_ptr + b64 * stride_qb + h64 * stride_qh
        do_base = do_ptr + b64 * stride_dob + h64 * stride_doh
        row_base = (b64 * Hq + h64) * Sq
        for mb in range(0, n_tm):
            tcls = _tile_class(tile_col + mb * n_tn, HAS_MASK)
            if tcls != 0:
                rows = mb * BLOCK_M + offs_m
                row_ok = rows < Sq
                rows64 = rows.to(tl.int64)
                qd_msk, qt, dot_, m2, inv_l, delta = bwd_query_rows_stats(
                    q_base, do_base, m_ptr, l_ptr, delta_ptr, row_base, rows64, row_ok, d_ok, offs_d64,
                    stride_qs, stride_qd, stride_dos, stride_dod, DOT_UPCAST)
                # transposed tiles [BLOCK_N, BLOCK_M]: every product has BLOCK_N rows (wgmma M)
                st = tl.dot(kt, tl.trans(qt), input_precision=INPUT_PRECISION) * qk_scale
                ok = tl.broadcast_to(row_ok[None, :], (BLOCK_N, BLOCK_M))
                if HAS_MASK:
                    if tcls == 2:
                        qmeta = b64 * Sq + rows64
                        qm, qs, qp, qr = _token_meta(qmod_ptr, qseg_ptr, qpos_ptr, qrun_ptr, qmeta, row_ok, -1)
                        ok = ok & _visible_t(qm, qs, qp, qr, km, ks, kp, kr, rules_ptr, NM)
                pt = tl.where(ok, tl.exp2(st - m2[None, :]) * inv_l[None, :], 0.0)
                if PART != 2:
                    dv += tl.dot(pt.to(dot_.dtype), dot_, input_precision=INPUT_PRECISION)
                if PART != 1:
                    dpt = tl.dot(vt, tl.trans(dot_), input_precision=INPUT_PRECISION)
                    dst = pt * (dpt - delta[None, :])
                    dk += tl.dot(dst.to(qt.dtype), qt, input_precision=INPUT_PRECISION)

    if PART != 1:
        dk = dk * scale
        tl.store(dk_ptr + b64 * stride_dkb + hk64 * stride_dkh + cols64[:, None] * stride_dks
                 + offs_d64[None, :] * stride_dkd, dk.to(dk_ptr.dtype.element_ty), mask=kv_msk)
    if PART != 2:
        tl.store(dv_ptr + b64 * stride_dvb + hk64 * stride_dvh + cols64[:, None] * stride_dvs
                 + offs_d64[None, :] * stride_dvd, dv.to(dv_ptr.dtype.element_ty), mask=kv_msk)


@triton.jit
def attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, m_ptr, l_ptr, delta_ptr, dq_ptr, tile_ptr,
    qmod_ptr, kmod_ptr, qseg_ptr, kseg_ptr, qpos_ptr, kpos_ptr, qrun_ptr, krun_ptr, rules_ptr,
    qk_scale, scale, Sq, Sk, Hq, GROUP, NM, n_tm, n_tn,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    HAS_MASK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    D: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dq of one query block, grid ``(query blocks, B * Hq)``: ``dq = scale * dS K``."""
    stride_qb, stride_qh, stride_qs = scaled_strides(stride_qb, stride_qh, stride_qs, ALIGN)
    stride_kb, stride_kh, stride_ks = scaled_strides(stride_kb, stride_kh, stride_ks, ALIGN)
    stride_vb, stride_vh, stride_vs = scaled_strides(stride_vb, stride_vh, stride_vs, ALIGN)
    stride_dob, stride_doh, stride_dos = scaled_strides(stride_dob, stride_doh, stride_dos, ALIGN)
    stride_dqb, stride_dqh, stride_dqs = scaled_strides(stride_dqb, stride_dqh, stride_dqs, ALIGN)
    pid_m, pid_bh, b64, h64, hk64, row_ok, rows64, d_ok, offs_d64, offs_n = _query_block(
        Sq, Hq, GROUP, D, BLOCK_M, BLOCK_N, BLOCK_D)
    qd_msk, qt, dot_, m2, inv_l, delta = bwd_query_rows_stats(
        q_ptr + b64 * stride_qb + h64 * stride_qh, do_ptr + b64 * stride_dob + h64 * stride_doh,
        m_ptr, l_ptr, delta_ptr, pid_bh.to(tl.int64) * Sq, rows64, row_ok, d_ok, offs_d64,
        stride_qs, stride_qd, stride_dos, stride_dod, DOT_UPCAST)
    k_base = k_ptr + b64 * stride_kb + hk64 * stride_kh
    v_base = v_ptr + b64 * stride_vb + hk64 * stride_vh
    tile_row = tile_ptr + (b64 * n_tm + pid_m) * n_tn
    if HAS_MASK:
        qm, qs, qp, qr = _token_meta(qmod_ptr, qseg_ptr, qpos_ptr, qrun_ptr, b64 * Sq + rows64, row_ok, -1)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for nb in range(0, n_tn):
        tcls = _tile_class(tile_row + nb, HAS_MASK)
        if tcls != 0:
            cols = nb * BLOCK_N + offs_n
            col_ok = cols < Sk
            cols64 = cols.to(tl.int64)
            kv_msk = col_ok[:, None] & d_ok[None, :]
            kt = load_rows(k_base, cols64, stride_ks, stride_kd, offs_d64, kv_msk, DOT_UPCAST)
            vt = load_rows(v_base, cols64, stride_vs, stride_vd, offs_d64, kv_msk, DOT_UPCAST)
            s = tl.dot(qt, tl.trans(kt), input_precision=INPUT_PRECISION) * qk_scale
            ok = tl.broadcast_to(col_ok[None, :], (BLOCK_M, BLOCK_N))
            if HAS_MASK:
                ok = _partial_visible(ok, tcls, qm, qs, qp, qr, kmod_ptr, kseg_ptr, kpos_ptr, krun_ptr,
                                      b64 * Sk + cols64, col_ok, rules_ptr, NM)
            p = tl.where(ok, tl.exp2(s - m2[:, None]) * inv_l[:, None], 0.0)
            dp = tl.dot(dot_, tl.trans(vt), input_precision=INPUT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kt.dtype), kt, input_precision=INPUT_PRECISION)

    dq = dq * scale
    tl.store(dq_ptr + b64 * stride_dqb + h64 * stride_dqh + rows64[:, None] * stride_dqs
             + offs_d64[None, :] * stride_dqd, dq.to(dq_ptr.dtype.element_ty), mask=qd_msk)

