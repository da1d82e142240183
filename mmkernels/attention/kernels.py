"""Triton kernels for multimodal masked attention (contract: ``ops.py`` and docs/architecture.md).

``attention_fwd_triton(q, k, v, meta, scale) -> (out, lse)`` and
``attention_bwd_triton(q, k, v, out, lse, dout, meta, scale) -> (dq, dk, dv)``.

``meta`` is ``[]`` (full attention) or the 9 metadata tensors of a
:class:`~mmkernels.attention.mask.MultimodalMask` ``[q_mod, k_mod, q_seg, k_seg,
q_pos, k_pos, q_run, k_run, rules]``.  The launcher rebuilds a mask object from
them (no validation) and asks it for the tile map at the kernel's
``BLOCK_M x BLOCK_N``: int8 ``[B, Tm, Tn]``, 0 EMPTY / 1 FULL / 2 PARTIAL.

Forward (``_attn_fwd_kernel``), grid ``(query blocks, B * Hq)``
    Loads the query block once, then walks the key blocks.  For each it reads
    the tile class: EMPTY tiles are skipped without touching K/V; FULL tiles
    only bound-check the ragged last key block; PARTIAL tiles evaluate the
    visibility rule per element from the metadata (segment equality, padding
    ``-1``, rule looked up in the small ``[NM, NM]`` table by ``(q_mod,
    k_mod)``, CAUSAL ``k_pos <= q_pos``, SPAN same run or causal).  Online
    softmax in fp32 in the log2 domain (``log2(e)`` folded into the scale),
    ``tl.dot`` for ``Q K^T`` and ``P V``.  Rows that see nothing: out 0,
    ``lse = -inf`` (the running max is guarded, no ``inf - inf``).

Backward
    ``_attn_bwd_preprocess_kernel``: ``delta = rowsum(dout * out)`` (fp32).
    ``_attn_bwd_dkdv_kernel``, grid ``(key blocks, B * Hkv)``: keeps ``dk``/``dv``
    of one key block in fp32 registers, loops over the query heads of its GQA
    group and over the query blocks (same tile skipping), recomputing ``P``
    from ``lse``.  It works on transposed ``[BLOCK_N, BLOCK_M]`` tiles
    (``S^T = K Q^T``) so that every product has BLOCK_N = 64 rows (one wgmma
    warpgroup) while BLOCK_M stays small: ``dv += P^T dout``,
    ``dk += dS^T q`` with ``dS = P * (dout V^T - delta)``; written once, in the
    input dtype: no atomics and no per-query-head buffers.  Where the two
    accumulators do not fit in registers (D = 256, fp32 tf32 with D > 64) the
    launcher runs it twice (``PART`` 1: dv only, 2: dk only; ``split`` configs).
    ``_attn_bwd_dq_kernel``, grid ``(query blocks, B * Hq)``: ``dq += dS K``.

The head dimension D is a constexpr, padded to ``BLOCK_D`` = the next power of
two (at least 16) with masked loads, so D = 80, 88, 96 work (D <= 256).  Batch,
head and sequence strides are passed divided by ``ALIGN`` (the largest power of
two <= 16 dividing all of them) and multiplied back in the kernel: Triton then
knows rows are 16-byte aligned even when D % 16 != 0 (D = 88: vector loads,
168 -> 46 registers in the preprocess kernel, no spills elsewhere).  Every
pointer offset is int64; q/k/v/out/dout/dq/dk/dv may have any strides.  Under
``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (bf16 products
are upcast there: ``DOT_UPCAST``, see mmkernels.contrastive.kernels).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._triton import (aligned_strides, check_device, dot_upcast, input_precision, interpreting, stride_align,
                       triton_at_least)

from .mask import MultimodalMask

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
MAX_HEAD_DIM = 256


class AttnConfig(NamedTuple):
    BLOCK_M: int  # query rows per tile
    BLOCK_N: int  # key rows per tile
    num_warps: int
    num_stages: int
    split: bool = False  # bwd_dkdv only: dv and dk in two launches (one fp32 accumulator each)


KERNEL_KINDS = ("fwd", "bwd_pre", "bwd_dkdv", "bwd_dq")


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


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
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, tile_ptr,
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
    # strides arrive divided by ALIGN (a power of two dividing them all): multiplying back by the
    # constexpr lets Triton prove 16-byte alignment of rows (vector loads) when D % 16 != 0
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
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Sq
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_d64 = offs_d.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)

    q_base = q_ptr + b64 * stride_qb + h64 * stride_qh
    q = tl.load(q_base + rows64[:, None] * stride_qs + offs_d64[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_UPCAST:  # interpreter only: its tl.dot mishandles bfloat16
        q = q.to(tl.float32)
    k_base = k_ptr + b64 * stride_kb + hk64 * stride_kh
    v_base = v_ptr + b64 * stride_vb + hk64 * stride_vh

    if HAS_MASK:
        qmeta = b64 * Sq + rows64
        qm = tl.load(qmod_ptr + qmeta, mask=row_ok, other=0)
        qs = tl.load(qseg_ptr + qmeta, mask=row_ok, other=-1)
        qp = tl.load(qpos_ptr + qmeta, mask=row_ok, other=0)
        qr = tl.load(qrun_ptr + qmeta, mask=row_ok, other=0)
        tile_row = tile_ptr + (b64 * n_tm + pid_m) * n_tn

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for nb in range(0, n_tn):
        if HAS_MASK:
            tcls = tl.load(tile_row + nb).to(tl.int32)
        else:
            tcls = 1
        if tcls != 0:  # EMPTY tiles: K/V never loaded
            n0 = nb * BLOCK_N
            cols = n0 + offs_n
            col_ok = cols < Sk
            cols64 = cols.to(tl.int64)
            kt = tl.load(k_base + cols64[:, None] * stride_ks + offs_d64[None, :] * stride_kd,
                         mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, tl.trans(kt), input_precision=INPUT_PRECISION) * qk_scale
            ok = tl.broadcast_to(col_ok[None, :], (BLOCK_M, BLOCK_N))
            if HAS_MASK:
                if tcls == 2:  # PARTIAL: evaluate the rule per element
                    kmeta = b64 * Sk + cols64
                    km = tl.load(kmod_ptr + kmeta, mask=col_ok, other=0)
                    ks = tl.load(kseg_ptr + kmeta, mask=col_ok, other=-2)
                    kp = tl.load(kpos_ptr + kmeta, mask=col_ok, other=0)
                    kr = tl.load(krun_ptr + kmeta, mask=col_ok, other=0)
                    ok = ok & _visible(qm, qs, qp, qr, km, ks, kp, kr, rules_ptr, NM)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(v_base + cols64[:, None] * stride_vs + offs_d64[None, :] * stride_vd,
                         mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_UPCAST:
                vt = vt.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=INPUT_PRECISION)
            m_i = m_new

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_base = o_ptr + b64 * stride_ob + h64 * stride_oh
    tl.store(o_base + rows64[:, None] * stride_os + offs_d64[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * Sq + rows64, lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
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
    # strides arrive divided by ALIGN (a power of two dividing them all): multiplying back by the
    # constexpr lets Triton prove 16-byte alignment of rows (vector loads) when D % 16 != 0
    stride_ob = tl.cast(stride_ob, tl.int64) * ALIGN
    stride_oh = tl.cast(stride_oh, tl.int64) * ALIGN
    stride_os = tl.cast(stride_os, tl.int64) * ALIGN
    stride_dob = tl.cast(stride_dob, tl.int64) * ALIGN
    stride_doh = tl.cast(stride_doh, tl.int64) * ALIGN
    stride_dos = tl.cast(stride_dos, tl.int64) * ALIGN
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // Hq).to(tl.int64)
    h64 = (pid_bh % Hq).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Sq
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_d64 = offs_d.to(tl.int64)
    msk = row_ok[:, None] & (offs_d < D)[None, :]
    o = tl.load(o_ptr + b64 * stride_ob + h64 * stride_oh + rows64[:, None] * stride_os
                + offs_d64[None, :] * stride_od, mask=msk, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b64 * stride_dob + h64 * stride_doh + rows64[:, None] * stride_dos
                 + offs_d64[None, :] * stride_dod, mask=msk, other=0.0).to(tl.float32)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * Sq + rows64, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, tile_ptr,
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
    # strides arrive divided by ALIGN (a power of two dividing them all): multiplying back by the
    # constexpr lets Triton prove 16-byte alignment of rows (vector loads) when D % 16 != 0
    stride_qb = tl.cast(stride_qb, tl.int64) * ALIGN
    stride_qh = tl.cast(stride_qh, tl.int64) * ALIGN
    stride_qs = tl.cast(stride_qs, tl.int64) * ALIGN
    stride_kb = tl.cast(stride_kb, tl.int64) * ALIGN
    stride_kh = tl.cast(stride_kh, tl.int64) * ALIGN
    stride_ks = tl.cast(stride_ks, tl.int64) * ALIGN
    stride_vb = tl.cast(stride_vb, tl.int64) * ALIGN
    stride_vh = tl.cast(stride_vh, tl.int64) * ALIGN
    stride_vs = tl.cast(stride_vs, tl.int64) * ALIGN
    stride_dob = tl.cast(stride_dob, tl.int64) * ALIGN
    stride_doh = tl.cast(stride_doh, tl.int64) * ALIGN
    stride_dos = tl.cast(stride_dos, tl.int64) * ALIGN
    stride_dkb = tl.cast(stride_dkb, tl.int64) * ALIGN
    stride_dkh = tl.cast(stride_dkh, tl.int64) * ALIGN
    stride_dks = tl.cast(stride_dks, tl.int64) * ALIGN
    stride_dvb = tl.cast(stride_dvb, tl.int64) * ALIGN
    stride_dvh = tl.cast(stride_dvh, tl.int64) * ALIGN
    stride_dvs = tl.cast(stride_dvs, tl.int64) * ALIGN
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = pid_bk // Hkv
    hk = pid_bk % Hkv
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < Sk
    cols64 = cols.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_d64 = offs_d.to(tl.int64)
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
    if HAS_MASK:
        kmeta = b64 * Sk + cols64
        km = tl.load(kmod_ptr + kmeta, mask=col_ok, other=0)
        ks = tl.load(kseg_ptr + kmeta, mask=col_ok, other=-2)
        kp = tl.load(kpos_ptr + kmeta, mask=col_ok, other=0)
        kr = tl.load(krun_ptr + kmeta, mask=col_ok, other=0)
        tile_col = tile_ptr + b64 * n_tm * n_tn + pid_n

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    for g in range(0, GROUP):
        h64 = (hk * GROUP + g).to(tl.int64)
        q_base = q_ptr + b64 * stride_qb + h64 * stride_qh
        do_base = do_ptr + b64 * stride_dob + h64 * stride_doh
        row_base = (b64 * Hq + h64) * Sq
        for mb in range(0, n_tm):
            if HAS_MASK:
                tcls = tl.load(tile_col + mb * n_tn).to(tl.int32)
            else:
                tcls = 1
            if tcls != 0:
                rows = mb * BLOCK_M + offs_m
                row_ok = rows < Sq
                rows64 = rows.to(tl.int64)
                qd_msk = row_ok[:, None] & d_ok[None, :]
                qt = tl.load(q_base + rows64[:, None] * stride_qs + offs_d64[None, :] * stride_qd,
                             mask=qd_msk, other=0.0)
                dot_ = tl.load(do_base + rows64[:, None] * stride_dos + offs_d64[None, :] * stride_dod,
                               mask=qd_msk, other=0.0)
                if DOT_UPCAST:
                    qt = qt.to(tl.float32)
                    dot_ = dot_.to(tl.float32)
                # rows past the end / rows that see nothing: lse = +inf, so P = 0 there
                lse = tl.load(lse_ptr + row_base + rows64, mask=row_ok, other=float("inf"))
                lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
                delta = tl.load(delta_ptr + row_base + rows64, mask=row_ok, other=0.0)
                # transposed tiles [BLOCK_N, BLOCK_M]: every product has BLOCK_N rows (wgmma M)
                st = tl.dot(kt, tl.trans(qt), input_precision=INPUT_PRECISION) * qk_scale
                ok = tl.broadcast_to(row_ok[None, :], (BLOCK_N, BLOCK_M))
                if HAS_MASK:
                    if tcls == 2:
                        qmeta = b64 * Sq + rows64
                        qm = tl.load(qmod_ptr + qmeta, mask=row_ok, other=0)
                        qs = tl.load(qseg_ptr + qmeta, mask=row_ok, other=-1)
                        qp = tl.load(qpos_ptr + qmeta, mask=row_ok, other=0)
                        qr = tl.load(qrun_ptr + qmeta, mask=row_ok, other=0)
                        ok = ok & _visible_t(qm, qs, qp, qr, km, ks, kp, kr, rules_ptr, NM)
                pt = tl.where(ok, tl.exp2(st - lse2[None, :]), 0.0)
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
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, tile_ptr,
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
    # strides arrive divided by ALIGN (a power of two dividing them all): multiplying back by the
    # constexpr lets Triton prove 16-byte alignment of rows (vector loads) when D % 16 != 0
    stride_qb = tl.cast(stride_qb, tl.int64) * ALIGN
    stride_qh = tl.cast(stride_qh, tl.int64) * ALIGN
    stride_qs = tl.cast(stride_qs, tl.int64) * ALIGN
    stride_kb = tl.cast(stride_kb, tl.int64) * ALIGN
    stride_kh = tl.cast(stride_kh, tl.int64) * ALIGN
    stride_ks = tl.cast(stride_ks, tl.int64) * ALIGN
    stride_vb = tl.cast(stride_vb, tl.int64) * ALIGN
    stride_vh = tl.cast(stride_vh, tl.int64) * ALIGN
    stride_vs = tl.cast(stride_vs, tl.int64) * ALIGN
    stride_dob = tl.cast(stride_dob, tl.int64) * ALIGN
    stride_doh = tl.cast(stride_doh, tl.int64) * ALIGN
    stride_dos = tl.cast(stride_dos, tl.int64) * ALIGN
    stride_dqb = tl.cast(stride_dqb, tl.int64) * ALIGN
    stride_dqh = tl.cast(stride_dqh, tl.int64) * ALIGN
    stride_dqs = tl.cast(stride_dqs, tl.int64) * ALIGN
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Sq
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_d64 = offs_d.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    qd_msk = row_ok[:, None] & d_ok[None, :]

    qt = tl.load(q_ptr + b64 * stride_qb + h64 * stride_qh + rows64[:, None] * stride_qs
                 + offs_d64[None, :] * stride_qd, mask=qd_msk, other=0.0)
    dot_ = tl.load(do_ptr + b64 * stride_dob + h64 * stride_doh + rows64[:, None] * stride_dos
                   + offs_d64[None, :] * stride_dod, mask=qd_msk, other=0.0)
    if DOT_UPCAST:
        qt = qt.to(tl.float32)
        dot_ = dot_.to(tl.float32)
    row_base = pid_bh.to(tl.int64) * Sq
    lse = tl.load(lse_ptr + row_base + rows64, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(delta_ptr + row_base + rows64, mask=row_ok, other=0.0)
    k_base = k_ptr + b64 * stride_kb + hk64 * stride_kh
    v_base = v_ptr + b64 * stride_vb + hk64 * stride_vh

    if HAS_MASK:
        qmeta = b64 * Sq + rows64
        qm = tl.load(qmod_ptr + qmeta, mask=row_ok, other=0)
        qs = tl.load(qseg_ptr + qmeta, mask=row_ok, other=-1)
        qp = tl.load(qpos_ptr + qmeta, mask=row_ok, other=0)
        qr = tl.load(qrun_ptr + qmeta, mask=row_ok, other=0)
        tile_row = tile_ptr + (b64 * n_tm + pid_m) * n_tn

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for nb in range(0, n_tn):
        if HAS_MASK:
            tcls = tl.load(tile_row + nb).to(tl.int32)
        else:
            tcls = 1
        if tcls != 0:
            cols = nb * BLOCK_N + offs_n
            col_ok = cols < Sk
            cols64 = cols.to(tl.int64)
            kv_msk = col_ok[:, None] & d_ok[None, :]
            kt = tl.load(k_base + cols64[:, None] * stride_ks + offs_d64[None, :] * stride_kd,
                         mask=kv_msk, other=0.0)
            vt = tl.load(v_base + cols64[:, None] * stride_vs + offs_d64[None, :] * stride_vd,
                         mask=kv_msk, other=0.0)
            if DOT_UPCAST:
                kt = kt.to(tl.float32)
                vt = vt.to(tl.float32)
            s = tl.dot(qt, tl.trans(kt), input_precision=INPUT_PRECISION) * qk_scale
            ok = tl.broadcast_to(col_ok[None, :], (BLOCK_M, BLOCK_N))
            if HAS_MASK:
                if tcls == 2:
                    kmeta = b64 * Sk + cols64
                    km = tl.load(kmod_ptr + kmeta, mask=col_ok, other=0)
                    ks = tl.load(kseg_ptr + kmeta, mask=col_ok, other=-2)
                    kp = tl.load(kpos_ptr + kmeta, mask=col_ok, other=0)
                    kr = tl.load(krun_ptr + kmeta, mask=col_ok, other=0)
                    ok = ok & _visible(qm, qs, qp, qr, km, ks, kp, kr, rules_ptr, NM)
            p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(dot_, tl.trans(vt), input_precision=INPUT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kt.dtype), kt, input_precision=INPUT_PRECISION)

    dq = dq * scale
    tl.store(dq_ptr + b64 * stride_dqb + h64 * stride_dqh + rows64[:, None] * stride_dqs
             + offs_d64[None, :] * stride_dqd, dq.to(dq_ptr.dtype.element_ty), mask=qd_msk)


# ---------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def block_d(D: int) -> int:
    """The padded head dimension: next power of two, at least 16."""
    return max(16, triton.next_power_of_2(int(D)))


# Triton >= 3.9 generates more register-hungry code for these kernels and has ptxas allocate
# with --regAllocOptLevel=2: the tiles picked with Triton 3.6 spill there for the cases listed
# below, so on Triton >= 3.9 those cases take the tile given here instead, the largest one that
# compiles for sm_90a with no spills, shared memory within 227 KB and the same tensor-core
# instructions (tests/test_sm90_attention.py compiles them).  BLOCK_M, num_warps and the
# dk/dv split are kept where a smaller BLOCK_N or BLOCK_M suffices.  Every other case, and
# every case on older Triton, keeps its tile.  (No tile with wgmma was found that compiles
# without spills on Triton 3.9 for fp32-with-tf32 at D > 128 (forward with a mask, dq, dk/dv)
# nor for the masked 16-bit dk/dv at D > 128: those keep their tile.)
# Key: (kind, "16bit" | "tf32" | "fma", block_d(D), has_mask).
_TRITON39_TILES = {
    ("fwd", "16bit", 128, True): AttnConfig(128, 16, 8, 2),
    ("fwd", "16bit", 256, True): AttnConfig(64, 16, 8, 2),
    ("fwd", "tf32", 128, True): AttnConfig(64, 16, 4, 2),
    ("bwd_dq", "16bit", 128, True): AttnConfig(64, 32, 8, 2),
    # two warpgroups of 64 query rows: each holds what one held at 64 x 16 with 4 warps, and
    # ptxas fits it (the 4- and 8-warp 64 x 16 tiles both spill)
    ("bwd_dq", "16bit", 256, True): AttnConfig(128, 16, 8, 1),
    ("bwd_dkdv", "16bit", 128, True): AttnConfig(16, 64, 8, 2),
    ("bwd_dkdv", "16bit", 256, False): AttnConfig(16, 64, 8, 2, True),
    # exact fp32: same tile with two stages, which ptxas fits without spills
    ("bwd_dkdv", "fma", 128, False): AttnConfig(16, 32, 8, 2),
}


def heuristic_config(kind: str, dtype: torch.dtype, D: int, input_precision: str,
                     has_mask: bool = True) -> AttnConfig:
    """The tile configuration of kernel ``kind`` for (dtype, D, precision, masked or not).

    Chosen from the sm_90a compile reports (tests/test_sm90_attention.py): no spills, shared
    memory within 227 KB, wgmma for 16-bit inputs and for fp32 with tf32.  (ptxas allocates
    differently with and without the per-element mask code, hence ``has_mask``.)  With
    Triton >= 3.9 the cases of ``_TRITON39_TILES`` take the tile given there.
    """
    cfg = _heuristic_config_triton36(kind, dtype, D, input_precision, has_mask)
    if kind != "bwd_pre" and triton_at_least(3, 9):
        fma = dtype == torch.float32 and input_precision == "ieee"
        cls = "fma" if fma else ("tf32" if dtype == torch.float32 else "16bit")
        cfg = _TRITON39_TILES.get((kind, cls, block_d(D), bool(has_mask)), cfg)
    return cfg


def _heuristic_config_triton36(kind: str, dtype: torch.dtype, D: int, input_precision: str,
                               has_mask: bool) -> AttnConfig:
    """The tiles chosen from Triton 3.6's compile reports (see :func:`heuristic_config`)."""
    bd = block_d(D)
    fma = dtype == torch.float32 and input_precision == "ieee"  # exact fp32: FMA dot, no tensor cores
    tf32 = dtype == torch.float32 and not fma
    if kind == "bwd_pre":
        return AttnConfig(64 if bd <= 128 else 32, 0, 4, 1)
    if kind == "fwd":
        if fma:
            return AttnConfig(32, 32, 4, 2) if bd <= 64 else AttnConfig(32, 16, 4, 2)
        if tf32:
            return AttnConfig(64, 32, 4, 2) if bd <= 128 else AttnConfig(64, 32, 8, 2)
        if bd <= 64:
            return AttnConfig(128, 64, 8, 3)
        return AttnConfig(128, 64, 8, 2) if bd <= 128 else AttnConfig(64, 64, 8, 2)
    if kind == "bwd_dkdv":
        # products are [BLOCK_N, *]: BLOCK_N = 64 rows per warpgroup for wgmma; two fp32
        # [BLOCK_N, BLOCK_D] accumulators, split into two launches when they do not fit
        if fma:
            return AttnConfig(16, 32, 8, 1)
        if tf32:
            if bd <= 64:
                return AttnConfig(32, 64, 4, 1)
            if bd <= 128:
                return AttnConfig(16, 64, 4, 1, True)
            return AttnConfig(16, 64, 8 if has_mask else 4, 1, True)
        if bd <= 64:
            return AttnConfig(32, 64, 4, 2)
        return AttnConfig(32, 64, 8, 2) if bd <= 128 else AttnConfig(32, 64, 8, 2, True)
    if kind == "bwd_dq":
        if fma:
            return AttnConfig(16, 16, 4, 1)
        if tf32:
            return AttnConfig(64, 16, 8 if (has_mask and bd > 128) else 4, 1)
        if bd <= 64:
            return AttnConfig(64, 64, 4, 2)
        return AttnConfig(64, 64, 8, 2) if bd <= 128 else AttnConfig(64, 16, 4, 1)
    raise ValueError(f"unknown kernel kind {kind!r}")


def dkdv_parts(config: AttnConfig) -> tuple[int, ...]:
    """Values of PART the dk/dv launcher runs with ``config``: (0,) or (1, 2) when split."""
    return (1, 2) if config.split else (0,)


def input_precisions(dtype: torch.dtype) -> tuple[str, ...]:
    """Values of INPUT_PRECISION the launchers can pass for this dtype."""
    return ("ieee", "tf32") if dtype == torch.float32 else ("tf32",)


def candidate_configs(kind: str, dtype: torch.dtype | None = None, D: int | None = None,
                      input_precision: str | None = None,
                      has_mask: bool | None = None) -> list[AttnConfig]:
    """Every configuration the launchers can pick for ``kind`` (deduplicated).

    Leave out dtype / D / precision / has_mask to take the union over all of them (D only
    matters through its padded size ``block_d(D)``: 16, 32, 64, 128, 256).
    """
    dtypes = _DTYPES if dtype is None else (dtype,)
    Ds = (16, 32, 64, 128, 256) if D is None else (D,)
    out: list[AttnConfig] = []
    for dt in dtypes:
        for prec in (input_precisions(dt) if input_precision is None else (input_precision,)):
            for d in Ds:
                for hm in ((True, False) if has_mask is None else (has_mask,)):
                    c = heuristic_config(kind, dt, d, prec, hm)
                    if c not in out:
                        out.append(c)
    return out








def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    check_device(q)
    if q.dtype not in _DTYPES:
        raise TypeError(f"the triton attention kernels take float32/bfloat16/float16, got {q.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported by the triton kernels")


def _mask_from_meta(meta) -> MultimodalMask | None:
    if meta is None or len(meta) == 0:
        return None
    if len(meta) != 9:
        raise ValueError(f"meta must be [] or the 9 mask metadata tensors, got {len(meta)}")
    return MultimodalMask.from_metadata(meta)  # no validation: the caller built a valid mask


def _mask_args(mask: MultimodalMask | None, B: int, Sq: int, Sk: int, bm: int, bn: int,
               dummy: torch.Tensor):
    """(tile map, the 9 metadata tensors, NM) for a launch at BLOCK_M x BLOCK_N."""
    if mask is None:
        return dummy, (dummy,) * 9, 1
    tiles = mask.tile_map(bm, bn).contiguous()
    return tiles, mask.metadata(), mask.num_modalities


def _pick(kind, dtype, D, prec, config, has_mask):
    if isinstance(config, dict):
        config = config.get(kind)
    if config is None:
        return heuristic_config(kind, dtype, D, prec, has_mask)
    return config


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------


def attention_fwd_triton(q, k, v, meta, scale, *, config=None):
    """(out [B, Hq, Sq, D] q.dtype, lse [B, Hq, Sq] float32).

    ``config``: an :class:`AttnConfig` (or a dict kind -> AttnConfig) forcing the tiles (tests).
    """
    _check(q, k, v)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dev = q.device
    out = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=dev)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=dev)
    prec = input_precision(q.dtype)
    mask = _mask_from_meta(meta)
    cfg = _pick("fwd", q.dtype, D, prec, config, mask is not None)
    tiles, fields, nm = _mask_args(mask, B, Sq, Sk, cfg.BLOCK_M, cfg.BLOCK_N, lse)
    n_tm, n_tn = triton.cdiv(Sq, cfg.BLOCK_M), triton.cdiv(Sk, cfg.BLOCK_N)
    al = stride_align(q, k, v, out)
    _attn_fwd_kernel[(n_tm, B * Hq)](
        q, k, v, out, lse, tiles, *fields,
        float(scale) * _LOG2E, Sq, Sk, Hq, Hq // Hkv, nm, n_tm, n_tn,
        *aligned_strides(q, al), *aligned_strides(k, al), *aligned_strides(v, al), *aligned_strides(out, al),
        HAS_MASK=mask is not None, INPUT_PRECISION=prec, DOT_UPCAST=dot_upcast(q.dtype),
        D=D, ALIGN=al,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=block_d(D),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def attention_bwd_triton(q, k, v, out, lse, dout, meta, scale, *, config=None):
    """(dq, dk, dv) in the input dtypes (rows that see nothing pass no gradient)."""
    _check(q, k, v)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dev = q.device
    group = Hq // Hkv
    prec = input_precision(q.dtype)
    bd = block_d(D)
    scale = float(scale)
    lse = lse.to(torch.float32).contiguous()
    delta = torch.empty((B, Hq, Sq), dtype=torch.float32, device=dev)
    dq = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=dev)
    dk = torch.empty((B, Hkv, Sk, D), dtype=k.dtype, device=dev)
    dv = torch.empty((B, Hkv, Sk, D), dtype=v.dtype, device=dev)
    mask = _mask_from_meta(meta)

    pre = _pick("bwd_pre", q.dtype, D, prec, None, mask is not None)
    al = stride_align(out, dout)
    _attn_bwd_preprocess_kernel[(triton.cdiv(Sq, pre.BLOCK_M), B * Hq)](
        out, dout, delta, Sq, Hq, *aligned_strides(out, al), *aligned_strides(dout, al), D=D, ALIGN=al,
        BLOCK_M=pre.BLOCK_M, BLOCK_D=bd, num_warps=pre.num_warps, num_stages=pre.num_stages)

    al = stride_align(q, k, v, dout, dq, dk, dv)
    common = dict(HAS_MASK=mask is not None, INPUT_PRECISION=prec, DOT_UPCAST=dot_upcast(q.dtype),
                  D=D, ALIGN=al, BLOCK_D=bd)
    cfg = _pick("bwd_dkdv", q.dtype, D, prec, config, mask is not None)
    tiles, fields, nm = _mask_args(mask, B, Sq, Sk, cfg.BLOCK_M, cfg.BLOCK_N, lse)
    n_tm, n_tn = triton.cdiv(Sq, cfg.BLOCK_M), triton.cdiv(Sk, cfg.BLOCK_N)
    for part in dkdv_parts(cfg):
        _attn_bwd_dkdv_kernel[(n_tn, B * Hkv)](
            q, k, v, dout, lse, delta, dk, dv, tiles, *fields,
            scale * _LOG2E, scale, Sq, Sk, Hq, Hkv, group, nm, n_tm, n_tn,
            *aligned_strides(q, al), *aligned_strides(k, al), *aligned_strides(v, al), *aligned_strides(dout, al),
            *aligned_strides(dk, al), *aligned_strides(dv, al),
            **common, PART=part, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    cfg = _pick("bwd_dq", q.dtype, D, prec, config, mask is not None)
    tiles, fields, nm = _mask_args(mask, B, Sq, Sk, cfg.BLOCK_M, cfg.BLOCK_N, lse)
    n_tm, n_tn = triton.cdiv(Sq, cfg.BLOCK_M), triton.cdiv(Sk, cfg.BLOCK_N)
    _attn_bwd_dq_kernel[(n_tm, B * Hq)](
        q, k, v, dout, lse, delta, dq, tiles, *fields,
        scale * _LOG2E, scale, Sq, Sk, Hq, group, nm, n_tm, n_tn,
        *aligned_strides(q, al), *aligned_strides(k, al), *aligned_strides(v, al), *aligned_strides(dout, al),
        *aligned_strides(dq, al),
        **common, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq, dk, dv


# ---------------------------------------------------------------------------
# Compile tier support: the exact specialisation a launch would produce
# ---------------------------------------------------------------------------

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
_META_PTRS = ("qmod_ptr", "kmod_ptr", "qseg_ptr", "kseg_ptr", "qpos_ptr", "kpos_ptr",
              "qrun_ptr", "krun_ptr")


def compile_specs(kind: str, dtype: torch.dtype, D: int, input_precision: str, has_mask: bool,
                  config: AttnConfig, part: int = 0):
    """(kernel, signature, constexprs, divisible_by_16) for mmkernels.testing.sm90.

    Describes a launch with contiguous ``[B, H, S, D]`` tensors (B=2, Hq=16, Hkv=8, S=4096,
    NM=2) and 256-byte aligned buffers, as Triton would specialise it (ints equal to 1 become
    constexprs, ints divisible by 16 get the divisibility hint).
    """
    ptr = _PTR[dtype]
    S, Hq, Hkv = 4096, 16, 8
    bm, bn = config.BLOCK_M, max(config.BLOCK_N, 1)

    al = 16
    while al > 1 and D % al:
        al //= 2

    def strides4(h):  # contiguous [B, H, S, D], divided by ALIGN as the launchers pass them
        return (h * S * D // al, S * D // al, D // al, 1)

    ints: dict[str, int] = {}
    floats: list[str] = []
    extra: dict = {}
    if kind == "bwd_pre":
        kernel = _attn_bwd_preprocess_kernel
        sig = {"o_ptr": ptr, "do_ptr": ptr, "delta_ptr": "*fp32"}
        ints.update(Sq=S, Hq=Hq)
        for pre in ("o", "do"):
            ints.update(zip([f"stride_{pre}{c}" for c in "bhsd"], strides4(Hq)))
        constexprs = {"D": D, "ALIGN": al, "BLOCK_M": config.BLOCK_M, "BLOCK_D": block_d(D)}
    else:
        meta = {n: "*i32" for n in _META_PTRS}
        meta["rules_ptr"] = "*i8"
        if kind == "fwd":
            kernel = _attn_fwd_kernel
            sig = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "o_ptr": ptr, "lse_ptr": "*fp32",
                   "tile_ptr": "*i8", **meta}
            floats = ["qk_scale"]
            ints.update(Sq=S, Sk=S, Hq=Hq, GROUP=Hq // Hkv, NM=2,
                        n_tm=triton.cdiv(S, bm), n_tn=triton.cdiv(S, bn))
            groups = [("q", Hq), ("k", Hkv), ("v", Hkv), ("o", Hq)]
        elif kind == "bwd_dkdv":
            kernel = _attn_bwd_dkdv_kernel
            sig = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "do_ptr": ptr, "lse_ptr": "*fp32",
                   "delta_ptr": "*fp32", "dk_ptr": ptr, "dv_ptr": ptr, "tile_ptr": "*i8", **meta}
            floats = ["qk_scale", "scale"]
            ints.update(Sq=S, Sk=S, Hq=Hq, Hkv=Hkv, GROUP=Hq // Hkv, NM=2,
                        n_tm=triton.cdiv(S, bm), n_tn=triton.cdiv(S, bn))
            groups = [("q", Hq), ("k", Hkv), ("v", Hkv), ("do", Hq), ("dk", Hkv), ("dv", Hkv)]
            extra["PART"] = part
        elif kind == "bwd_dq":
            kernel = _attn_bwd_dq_kernel
            sig = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "do_ptr": ptr, "lse_ptr": "*fp32",
                   "delta_ptr": "*fp32", "dq_ptr": ptr, "tile_ptr": "*i8", **meta}
            floats = ["qk_scale", "scale"]
            ints.update(Sq=S, Sk=S, Hq=Hq, GROUP=Hq // Hkv, NM=2,
                        n_tm=triton.cdiv(S, bm), n_tn=triton.cdiv(S, bn))
            groups = [("q", Hq), ("k", Hkv), ("v", Hkv), ("do", Hq), ("dq", Hq)]
        else:
            raise ValueError(f"unknown kernel kind {kind!r}")
        for pre, h in groups:
            ints.update(zip([f"stride_{pre}{c}" for c in "bhsd"], strides4(h)))
        constexprs = {"HAS_MASK": bool(has_mask), "INPUT_PRECISION": input_precision,
                      "DOT_UPCAST": False, "D": D, "ALIGN": al, "BLOCK_M": config.BLOCK_M,
                      "BLOCK_N": config.BLOCK_N, "BLOCK_D": block_d(D), **extra}
    from ..testing.sm90 import launch_signature
    return (kernel, *launch_signature(sig, ints, constexprs, floats))
