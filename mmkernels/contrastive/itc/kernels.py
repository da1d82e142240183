"""Triton kernels of the ``itc`` unit and their launchers (the contract is in ``ops.py``).

Every kernel tiles the ``N x M`` similarities and never stores them. A tile's similarity is the
max over token pairs (``_max_similarity``): the tokens of one side are flattened into the rows
of the tile's products (``T`` tokens per chunk, so ``BLOCK_M`` product rows hold ``BLOCK_M / T``
items), the tokens of the other side are looped over, and the max runs over both, keeping the
first maximal pair in ``a * P + b`` order.

``itc_rows_kernel``: one program per block of rows walks every key tile and keeps online row
statistics (log-sum-exp, positive count and sum, row sum, and the teacher's running max, sum of
exponentials and their weighted sum of the student's logits); a key queue is walked as a second
segment of the keys, never copied next to them. ``itc_grads_kernel``: as
FlashAttention's backward, launched once over blocks of query rows (``dq`` and the shares of
``dscale``) and once over blocks of key rows (``dk``); each program owns its output rows (all
their tokens, or one chunk of them) and one chunk of the features, recomputes its tiles, and
routes ``dL`` through the arg-max token pair: no atomics. ``itc_negatives_kernel``: the
Gumbel-max draw per row with the counter-based hash of ``random.py``. Offsets are int64; inputs
may have any strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _triton  # noqa: F401  (fixes the interpreter before any kernel is defined)
from ..._triton import DTYPES, PTR, check_device, dot_upcast, input_precision
from ..kernels.configs import ITC_KINDS, TileConfig, _block_k, resolve_config
from ..kernels.jit import _fp16_multiplier, _similarity_tile
from ..kernels.launch import _scale_f32

#: launch kinds (tuning family "contrastive", registered in ``kernels/configs.py``):
#: ``tuning.set_config("contrastive", "itc_rows" | "itc_grads" | "itc_negatives",
#: TileConfig(...), dtype=..., dim=..., input_precision=...)``. ``BLOCK_M`` counts product rows:
#: items times the tokens flattened per item.
KINDS = ITC_KINDS

#: the smallest side of a ``tl.dot`` operand
_MIN_DOT = 16
#: fp32 accumulator values per thread the backward keeps for its feature chunk
_ACC_PER_THREAD = 32


# ---------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------


@triton.jit
def _max_similarity(x_ptr, x0, NX, TOKX, stride_xn, stride_xt, stride_xd,
                    y_cols_ptr, y_ok, TOKY, stride_yt, stride_yd, D, XM, YM,
                    WITH_IDX: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    DOT_UPCAST: tl.constexpr, BX: tl.constexpr, TX: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(S, idx)``: ``S [BX, BLOCK_N]`` fp32 the max over tokens ``a < TOKX``, ``b < TOKY`` of
    ``x[x0 + r, a] . y[c, b]``, and with ``WITH_IDX`` the first maximal pair's index
    ``a * XM + b * YM`` (int32; pairs compare in that order on ties, as ``torch.max``).

    ``x`` items ``[NX, TOKX, D]`` with ``TX`` tokens flattened per product row block (a chunk;
    ``TOKX > TX`` loops over chunks); ``y_cols_ptr [BLOCK_N, 1]`` points at the starts of the
    tile's ``y`` items, whose tokens are looped over. Padded items load as zeros (S = 0 there);
    padded tokens of a chunk never win the max.
    """
    r = tl.arange(0, BX * TX)
    xi = x0 + r // TX
    x_item_ok = xi < NX
    x_base = x_ptr + xi.to(tl.int64) * tl.cast(stride_xn, tl.int64)
    sxt = tl.cast(stride_xt, tl.int64)
    syt = tl.cast(stride_yt, tl.int64)
    t = tl.arange(0, TX)
    best = tl.full([BX, BLOCK_N], float("-inf"), tl.float32)
    bidx = tl.zeros([BX, BLOCK_N], tl.int32)
    for a0 in range(0, TOKX, TX):
        ta = a0 + r % TX
        x_ok = x_item_ok & (ta < TOKX)
        xp = (x_base + ta.to(tl.int64) * sxt)[:, None]
        for b in range(0, TOKY):
            St = _similarity_tile(xp, y_cols_ptr + b * syt, x_ok, y_ok, D, stride_xd, stride_yd,
                                  INPUT_PRECISION, DOT_UPCAST, BX * TX, BLOCK_N, BLOCK_K)
            if TX == 1:
                v = St
                if WITH_IDX:
                    idx = a0 * XM + b * YM
            else:
                St3 = tl.reshape(St, [BX, TX, BLOCK_N])
                St3 = tl.where((a0 + t < TOKX)[None, :, None], St3, float("-inf"))
                v = tl.max(St3, 1)
                if WITH_IDX:
                    first = tl.min(tl.where(St3 == v[:, None, :], (a0 + t)[None, :, None], TOKX), 1)
                    idx = first * XM + b * YM
            if WITH_IDX:
                take = (v > best) | ((v == best) & (idx < bidx))
                bidx = tl.where(take, idx, bidx)
            best = tl.maximum(best, v, propagate_nan=tl.PropagateNan.ALL)  # NaN stays, as torch.max
    return best, bidx


@triton.jit
def _rows_segment(m_i, d_i, s_i, c_i, p_i, tm_i, td_i, tw_i,
                  q_ptr, tq_ptr, x0, N, Q, TQ, D, TD, rid, scale, tscale,
                  stride_qn, stride_qt, stride_qd, stride_tqn, stride_tqt, stride_tqd,
                  k_ptr, tk_ptr, n_cols, col0, P, TP,
                  stride_kn, stride_kt, stride_kd, stride_tkn, stride_tkt, stride_tkd,
                  cid_ptr, stride_cid,
                  HAS_TEACHER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                  DOT_UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """The row statistics of ``itc_rows_kernel`` carried over one segment of the keys: the
    ``n_cols`` keys at ``k_ptr`` (teacher keys at ``tk_ptr``), columns ``col0 + j`` of ``L``."""
    offs_n = tl.arange(0, BLOCK_N)
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + offs_n
        col_ok = cols < n_cols
        cols64 = cols.to(tl.int64)
        S, _ = _max_similarity(q_ptr, x0, N, Q, stride_qn, stride_qt, stride_qd,
                               k_ptr + cols64[:, None] * stride_kn, col_ok, P, stride_kt, stride_kd,
                               D, 0, 0, False, INPUT_PRECISION, DOT_UPCAST, BLOCK_M, 1, BLOCK_N,
                               BLOCK_K)
        L = tl.where(col_ok[None, :], S * scale, 0.0)
        Lm = tl.where(col_ok[None, :], L, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(Lm, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf)
        d_i = d_i * tl.exp(m_i - m_use) + tl.sum(tl.exp(Lm - m_use[:, None]), 1)
        m_i = m_new
        s_i += tl.sum(L, 1)
        cid = tl.load(cid_ptr + (col0 + cols64) * stride_cid, mask=col_ok, other=0)
        pos = (rid[:, None] == cid[None, :]) & col_ok[None, :]
        c_i += tl.sum(pos.to(tl.float32), 1)
        p_i += tl.sum(tl.where(pos, L, 0.0), 1)
        if HAS_TEACHER:
            TS, _ = _max_similarity(tq_ptr, x0, N, TQ, stride_tqn, stride_tqt, stride_tqd,
                                    tk_ptr + cols64[:, None] * stride_tkn, col_ok, TP, stride_tkt,
                                    stride_tkd, TD, 0, 0, False, INPUT_PRECISION, DOT_UPCAST,
                                    BLOCK_M, 1, BLOCK_N, BLOCK_K)
            TL = tl.where(col_ok[None, :], TS * tscale, float("-inf"))
            tm_new = tl.maximum(tm_i, tl.max(TL, 1))
            tm_use = tl.where(tm_new == float("-inf"), 0.0, tm_new)
            resc = tl.exp(tm_i - tm_use)
            e = tl.exp(TL - tm_use[:, None])
            td_i = td_i * resc + tl.sum(e, 1)
            tw_i = tw_i * resc + tl.sum(e * L, 1)
            tm_i = tm_new
    return m_i, d_i, s_i, c_i, p_i, tm_i, td_i, tw_i


@triton.jit
def itc_rows_kernel(
    q_ptr, k_ptr, kq_ptr, tq_ptr, tk_ptr, scale_ptr, tscale_ptr, rid_ptr, cid_ptr,
    loss_ptr, lse_ptr, tlse_ptr, count_ptr,
    N, MK, KQ, Q, P, D, TQ, TP, TD,
    stride_qn, stride_qt, stride_qd, stride_kn, stride_kt, stride_kd,
    stride_kqn, stride_kqt, stride_kqd,
    stride_tqn, stride_tqt, stride_tqd, stride_tkn, stride_tkt, stride_tkd,
    stride_rid, stride_cid,
    soft_w, hard_w, smooth,
    HAS_QUEUE: tl.constexpr,
    HAS_TEACHER: tl.constexpr,
    HAS_HARD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``loss, lse, tlse, count [N]`` fp32 of ``ops.itc_rows`` for BLOCK_M rows per program.

    The keys are ``k [MK, P, D]`` then, with ``HAS_QUEUE``, the queue ``kq [KQ, P, D]`` (whose
    teacher keys are the queue itself), walked as two segments with one set of statistics.
    ``soft_w = (1 - eps) * alpha``, ``hard_w = (1 - eps) * (1 - alpha)``, ``smooth = eps / M``;
    ``HAS_TEACHER`` (alpha != 0) and ``HAS_HARD`` (alpha != 1) keep or drop the two target
    terms. The teacher's softmax-weighted sum of L is kept online: running max ``tm``, sum of
    ``exp(TL - tm)`` and sum of ``exp(TL - tm) * L``, both rescaled when ``tm`` grows.
    """
    pid = tl.program_id(0)
    x0 = pid * BLOCK_M
    rows = x0 + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    rid = tl.load(rid_ptr + rows64 * stride_rid, mask=row_ok, other=0)
    scale = tl.load(scale_ptr).to(tl.float32)
    tscale = tl.load(tscale_ptr).to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of L
    d_i = tl.zeros([BLOCK_M], tl.float32)  # sum of exp(L - m_i)
    s_i = tl.zeros([BLOCK_M], tl.float32)  # sum of L
    c_i = tl.zeros([BLOCK_M], tl.float32)  # positives
    p_i = tl.zeros([BLOCK_M], tl.float32)  # sum of L over the positives
    tm_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # teacher: running max of TL
    td_i = tl.zeros([BLOCK_M], tl.float32)  # sum of exp(TL - tm_i)
    tw_i = tl.zeros([BLOCK_M], tl.float32)  # sum of exp(TL - tm_i) * L
    m_i, d_i, s_i, c_i, p_i, tm_i, td_i, tw_i = _rows_segment(
        m_i, d_i, s_i, c_i, p_i, tm_i, td_i, tw_i,
        q_ptr, tq_ptr, x0, N, Q, TQ, D, TD, rid, scale, tscale,
        stride_qn, stride_qt, stride_qd, stride_tqn, stride_tqt, stride_tqd,
        k_ptr, tk_ptr, MK, 0, P, TP,
        stride_kn, stride_kt, stride_kd, stride_tkn, stride_tkt, stride_tkd,
        cid_ptr, stride_cid,
        HAS_TEACHER, INPUT_PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_QUEUE:
        m_i, d_i, s_i, c_i, p_i, tm_i, td_i, tw_i = _rows_segment(
            m_i, d_i, s_i, c_i, p_i, tm_i, td_i, tw_i,
            q_ptr, tq_ptr, x0, N, Q, TQ, D, TD, rid, scale, tscale,
            stride_qn, stride_qt, stride_qd, stride_tqn, stride_tqt, stride_tqd,
            kq_ptr, kq_ptr, KQ, MK, P, P,
            stride_kqn, stride_kqt, stride_kqd, stride_kqn, stride_kqt, stride_kqd,
            cid_ptr, stride_cid,
            HAS_TEACHER, INPUT_PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    lse = m_i + tl.log(d_i)
    loss = lse - smooth * s_i
    tlse = tl.zeros([BLOCK_M], tl.float32)
    if HAS_TEACHER:
        tlse = tm_i + tl.log(td_i)
        loss -= soft_w * (tw_i / td_i)
    if HAS_HARD:
        loss -= hard_w * (p_i / c_i)  # no positive: 0 / 0, NaN as the materialised targets
    tl.store(loss_ptr + rows64, loss, mask=row_ok)
    tl.store(lse_ptr + rows64, lse, mask=row_ok)
    tl.store(tlse_ptr + rows64, tlse, mask=row_ok)
    tl.store(count_ptr + rows64, c_i, mask=row_ok)


@triton.jit
def _grads_segment(acc, ds,
                   x_ptr, tx_ptr, x0, a0, NX, TOKX, D, TTOKX, TD, x_ok, xid,
                   stride_xn, stride_xt, stride_xd, stride_txn, stride_txt, stride_txd,
                   y_ptr, ty_ptr, n_y, y_base, TOKY, TTOKY,
                   stride_yn, stride_yt, stride_yd, stride_tyn, stride_tyt, stride_tyd,
                   yid_ptr, stride_yid, g_ptr, lse_ptr, tlse_ptr, count_ptr,
                   g_x, lse_x, inv_c_x, tlse_x, scale, tscale, mul, XM, YM,
                   soft_w, hard_w, smooth, dd64, d_ok,
                   X_IS_Q: tl.constexpr, HAS_TEACHER: tl.constexpr, HAS_HARD: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
                   BX: tl.constexpr, TX: tl.constexpr, TTX: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """``itc_grads_kernel``'s walk over one segment of y: the ``n_y`` items at ``y_ptr``
    (teacher ``ty_ptr``), whose ids are ``yid[y_base + c]``; returns ``(acc, ds)``."""
    offs_n = tl.arange(0, BLOCK_N)
    t = tl.arange(0, TX)
    syt = tl.cast(stride_yt, tl.int64)
    for y0 in range(0, n_y, BLOCK_N):
        yc = y0 + offs_n
        y_ok = yc < n_y
        yc64 = yc.to(tl.int64)
        y_cols = y_ptr + yc64[:, None] * stride_yn
        S, idx = _max_similarity(x_ptr, x0, NX, TOKX, stride_xn, stride_xt, stride_xd,
                                 y_cols, y_ok, TOKY, stride_yt, stride_yd, D, XM, YM, True,
                                 INPUT_PRECISION, DOT_UPCAST, BX, TX, BLOCK_N, BLOCK_K)
        L = S * scale
        yid = tl.load(yid_ptr + (y_base + yc64) * stride_yid, mask=y_ok, other=0)
        pos = (xid[:, None] == yid[None, :]).to(tl.float32)
        if X_IS_Q:
            g2 = g_x[:, None]
            lse2 = lse_x[:, None]
            inv_c2 = inv_c_x[:, None]
            tlse2 = tlse_x[:, None]
        else:
            g2 = tl.load(g_ptr + yc64, mask=y_ok, other=0.0)[None, :]
            lse2 = tl.load(lse_ptr + yc64, mask=y_ok, other=0.0)[None, :]
            inv_c2 = 1.0 / tl.load(count_ptr + yc64, mask=y_ok, other=1.0)[None, :]
            tlse2 = tl.load(tlse_ptr + yc64, mask=y_ok, other=0.0)[None, :]
        T = tl.zeros([BX, BLOCK_N], tl.float32) + smooth
        if HAS_TEACHER:
            TS, _ = _max_similarity(tx_ptr, x0, NX, TTOKX, stride_txn, stride_txt, stride_txd,
                                    ty_ptr + yc64[:, None] * stride_tyn, y_ok, TTOKY, stride_tyt,
                                    stride_tyd, TD, 0, 0, False, INPUT_PRECISION, DOT_UPCAST,
                                    BX, TTX, BLOCK_N, BLOCK_K)
            T += soft_w * tl.exp(TS * tscale - tlse2)
        if HAS_HARD:
            T += hard_w * (pos * inv_c2)  # no positive: 0 * inf, NaN as the materialised targets
        dL = g2 * (tl.exp(L - lse2) - T)
        dL = tl.where(x_ok[:, None] & y_ok[None, :], dL, 0.0)
        if X_IS_Q:
            ds += tl.sum(dL * S, 1)
        W = dL * (scale * mul)
        for b in range(0, TOKY):
            if TX == 1:
                Wb = tl.where(idx == a0 * XM + b * YM, W, 0.0)
            else:
                sel = idx[:, None, :] == ((a0 + t) * XM)[None, :, None] + b * YM
                Wb = tl.reshape(tl.where(sel, W[:, None, :], 0.0), [BX * TX, BLOCK_N])
            yb = tl.load(y_cols + b * syt + dd64[None, :] * stride_yd,
                         mask=y_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_UPCAST:  # interpreter only: its tl.dot mishandles bfloat16
                yb = yb.to(tl.float32)
            else:
                Wb = Wb.to(yb.dtype)
            acc = tl.dot(Wb, yb, acc, input_precision=INPUT_PRECISION)
    return acc, ds


@triton.jit
def itc_grads_kernel(
    x_ptr, y_ptr, yq_ptr, tx_ptr, ty_ptr, scale_ptr, tscale_ptr, xid_ptr, yid_ptr,
    g_ptr, lse_ptr, tlse_ptr, count_ptr, dx_ptr, part_ptr,
    NX, NY, NYQ, TOKX, TOKY, D, TTOKX, TTOKY, TD, n_x_chunks, n_d_chunks,
    stride_xn, stride_xt, stride_xd, stride_yn, stride_yt, stride_yd,
    stride_yqn, stride_yqt, stride_yqd,
    stride_txn, stride_txt, stride_txd, stride_tyn, stride_tyt, stride_tyd,
    stride_xid, stride_yid, stride_dxn, stride_dxt,
    soft_w, hard_w, smooth,
    X_IS_Q: tl.constexpr,
    HAS_QUEUE: tl.constexpr,
    HAS_TEACHER: tl.constexpr,
    HAS_HARD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    FP16_RESCALE: tl.constexpr,
    BX: tl.constexpr,
    TX: tl.constexpr,
    TTX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``dx`` of one side: ``X_IS_Q`` the queries (``x = q``, ``y`` the keys, with
    ``HAS_QUEUE`` followed by the queue ``yq [NYQ, TOKY, D]``, whose teacher keys are the queue;
    the teacher ``tq``, ``tk``), else the keys (``x = k``, ``y = q``, the tiles transposed).
    Program ``pid`` owns BX items of x, the chunk of TX of their tokens and the chunk of
    BLOCK_D features given by ``pid = (item block * n_x_chunks + token chunk) * n_d_chunks +
    feature chunk``; it walks every BLOCK_N items of y, recomputes ``S`` (and its arg-max
    pairs) and ``TL``, forms ``dL = g (exp(L - lse) - T)`` and, for each token ``b`` of y, adds
    ``scale * dL`` masked to the pairs ``(own token, b)`` times ``y[:, b, chunk]`` to its fp32
    accumulator. The row statistics (``g``, ``lse``, ``tlse``, ``count``: contiguous fp32, one
    per query) belong to x or to y. With ``X_IS_Q`` the programs of the first token and
    feature chunk write their rows' ``sum(dL * S)`` to ``part[item block]``.
    ``FP16_RESCALE``: ``scale * dL`` is multiplied by a power of two before its fp16 product
    (``|dL| <= max |g|``) and the result divided by it.
    """
    pid = tl.program_id(0)
    dc = pid % n_d_chunks
    rest = pid // n_d_chunks
    xc = rest % n_x_chunks
    xb = rest // n_x_chunks
    x0 = xb * BX
    a0 = xc * TX
    xr = x0 + tl.arange(0, BX)
    x_ok = xr < NX
    xr64 = xr.to(tl.int64)
    xid = tl.load(xid_ptr + xr64 * stride_xid, mask=x_ok, other=0)
    scale = tl.load(scale_ptr).to(tl.float32)
    tscale = tl.load(tscale_ptr).to(tl.float32)
    if X_IS_Q:
        XM = TOKY  # pair index a * P + b, x holding a
        YM = 1
        g_x = tl.load(g_ptr + xr64, mask=x_ok, other=0.0)
        lse_x = tl.load(lse_ptr + xr64, mask=x_ok, other=0.0)
        inv_c_x = 1.0 / tl.load(count_ptr + xr64, mask=x_ok, other=1.0)
        tlse_x = tl.load(tlse_ptr + xr64, mask=x_ok, other=0.0)
        gbound = tl.max(tl.abs(g_x), 0)
    else:
        XM = 1
        YM = TOKX
        g_x = tl.zeros([BX], tl.float32)  # the statistics are y's
        lse_x = g_x
        inv_c_x = g_x
        tlse_x = g_x
        gbound = 0.0
        if FP16_RESCALE:
            offs_n = tl.arange(0, BLOCK_N)
            gmax = tl.zeros([BLOCK_N], tl.float32)
            for r0 in range(0, NY, BLOCK_N):
                gr = tl.load(g_ptr + (r0 + offs_n).to(tl.int64), mask=offs_n < NY - r0, other=0.0)
                gmax = tl.maximum(gmax, tl.abs(gr))
            gbound = tl.max(gmax, 0)
    mul = 1.0
    if FP16_RESCALE:
        mul = _fp16_multiplier(gbound, scale)
    dd = dc * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    dd64 = dd.to(tl.int64)
    acc = tl.zeros([BX * TX, BLOCK_D], tl.float32)
    ds = tl.zeros([BX], tl.float32)
    acc, ds = _grads_segment(
        acc, ds, x_ptr, tx_ptr, x0, a0, NX, TOKX, D, TTOKX, TD, x_ok, xid,
        stride_xn, stride_xt, stride_xd, stride_txn, stride_txt, stride_txd,
        y_ptr, ty_ptr, NY, 0, TOKY, TTOKY,
        stride_yn, stride_yt, stride_yd, stride_tyn, stride_tyt, stride_tyd,
        yid_ptr, stride_yid, g_ptr, lse_ptr, tlse_ptr, count_ptr,
        g_x, lse_x, inv_c_x, tlse_x, scale, tscale, mul, XM, YM, soft_w, hard_w, smooth, dd64, d_ok,
        X_IS_Q, HAS_TEACHER, HAS_HARD, INPUT_PRECISION, DOT_UPCAST, BX, TX, TTX, BLOCK_N, BLOCK_K)
    if HAS_QUEUE:
        acc, ds = _grads_segment(
            acc, ds, x_ptr, tx_ptr, x0, a0, NX, TOKX, D, TTOKX, TD, x_ok, xid,
            stride_xn, stride_xt, stride_xd, stride_txn, stride_txt, stride_txd,
            yq_ptr, yq_ptr, NYQ, NY, TOKY, TOKY,
            stride_yqn, stride_yqt, stride_yqd, stride_yqn, stride_yqt, stride_yqd,
            yid_ptr, stride_yid, g_ptr, lse_ptr, tlse_ptr, count_ptr,
            g_x, lse_x, inv_c_x, tlse_x, scale, tscale, mul, XM, YM, soft_w, hard_w, smooth, dd64,
            d_ok, X_IS_Q, HAS_TEACHER, HAS_HARD, INPUT_PRECISION, DOT_UPCAST, BX, TX, TTX, BLOCK_N,
            BLOCK_K)
    out = acc / mul
    r = tl.arange(0, BX * TX)
    xi = x0 + r // TX
    ti = a0 + r % TX
    ok = (xi < NX) & (ti < TOKX)
    dst = dx_ptr + xi.to(tl.int64)[:, None] * stride_dxn + ti.to(tl.int64)[:, None] * stride_dxt
    tl.store(dst + dd64[None, :], out.to(dx_ptr.dtype.element_ty), mask=ok[:, None] & d_ok[None, :])
    if X_IS_Q:
        if (xc == 0) & (dc == 0):
            tl.store(part_ptr + xb, tl.sum(ds, 0))


@triton.jit
def _fmix32(x):
    """MurmurHash3's 32-bit finaliser on uint32 values (products wrap mod 2**32, shifts are
    logical)."""
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def itc_negatives_kernel(
    q_ptr, k_ptr, scale_ptr, rid_ptr, cid_ptr, seed_ptr, out_ptr,
    N, M, Q, P, D,
    stride_qn, stride_qt, stride_qd, stride_kn, stride_kt, stride_kd,
    stride_rid, stride_cid,
    INPUT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out [N]`` int64: per row the ``j`` maximising ``fp32(L_ij) + gumbel(seed, i, j)`` over
    the non-positive keys (the smallest ``j`` on ties: the first tile wins, and the smallest
    column within a tile), -1 when every key is a positive. ``seed`` is read from the device."""
    pid = tl.program_id(0)
    x0 = pid * BLOCK_M
    rows = x0 + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    rid = tl.load(rid_ptr + rows64 * stride_rid, mask=row_ok, other=0)
    scale = tl.load(scale_ptr).to(tl.float32)
    seed = tl.load(seed_ptr).to(tl.uint32)  # the low 32 bits
    h_row = _fmix32(_fmix32(seed) ^ rows.to(tl.uint32))
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_j = tl.full([BLOCK_M], -1, tl.int32)
    offs_n = tl.arange(0, BLOCK_N)
    for c0 in range(0, M, BLOCK_N):
        cols = c0 + offs_n
        col_ok = cols < M
        cols64 = cols.to(tl.int64)
        S, _ = _max_similarity(q_ptr, x0, N, Q, stride_qn, stride_qt, stride_qd,
                               k_ptr + cols64[:, None] * stride_kn, col_ok, P, stride_kt, stride_kd,
                               D, 0, 0, False, INPUT_PRECISION, DOT_UPCAST, BLOCK_M, 1, BLOCK_N,
                               BLOCK_K)
        h = _fmix32(h_row[:, None] ^ (cols.to(tl.uint32) * 0x9E3779B9)[None, :])
        u = ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23: exact, below 1
        key = S * scale - tl.log(-tl.log(u))
        cid = tl.load(cid_ptr + cols64 * stride_cid, mask=col_ok, other=0)
        neg = (rid[:, None] != cid[None, :]) & col_ok[None, :]
        key = tl.where(neg, key, float("-inf"))
        v = tl.max(key, 1)
        j = tl.min(tl.where(key == v[:, None], cols[None, :], 2147483647), 1)
        take = v > best
        best_j = tl.where(take, j, best_j)
        best = tl.where(take, v, best)
    tl.store(out_ptr + rows64, best_j.to(tl.int64), mask=row_ok)


# ---------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------


def rows_config(dtype: torch.dtype, D: int, input_precision: str) -> TileConfig:
    """The tiles of ``itc_rows_kernel`` and ``itc_negatives_kernel`` without an explicit config
    or override (``BLOCK_M`` rows, their tokens looped over). The forward holds the logit
    tile, the teacher's tile and eight row statistics at once, so its tiles are narrower than
    the contrastive statistics kernel's: 128 x 32 with 8 warps; where D is not a multiple of
    16 (no vector loads: the operand tiles pass through registers) 64 x 32 x 32 with two
    stages; exact fp32 (FMA units) 64 x 32 x 16, one stage (and :func:`launch_options`).
    Compiled for sm_90a without spills, teacher, tokens and queue included, by
    tests/contrastive/test_itc_sm90.py."""
    bk = _block_k(dtype, D, input_precision)
    if dtype == torch.float32 and input_precision == "ieee":
        return TileConfig(64, 32, 16, 8, 1)
    if D % 16:
        return TileConfig(64, 32, min(32, bk), 8, 2)
    return TileConfig(128, 32, bk, 8, 3)


def grads_config(dtype: torch.dtype, D: int, input_precision: str) -> TileConfig:
    """The tiles of ``itc_grads_kernel`` without an explicit config or override: 64 product
    rows (items times their flattened tokens) against 32 items of the other side per step,
    8 warps; BLOCK_K 16 where D is not a multiple of 16 (the operand tiles pass through
    registers); one stage for fp32, and exact fp32 (FMA units) 32 x 32 x 16. The feature chunk
    is :func:`grads_block_d`. Compiled for sm_90a without spills, teacher, tokens and queue
    included, by tests/contrastive/test_itc_sm90.py."""
    if dtype == torch.float32 and input_precision == "ieee":
        return TileConfig(32, 32, 16, 8, 1)
    bk = 16 if D % 16 else min(32, _block_k(dtype, D, input_precision))
    return TileConfig(64, 32, bk, 8, 1 if dtype == torch.float32 else 2)


def grads_block_d(D: int, config: TileConfig, dtype: torch.dtype, input_precision: str) -> int:
    """Features per backward program: the fp32 accumulator ``BLOCK_M x BLOCK_D`` kept to
    ``_ACC_PER_THREAD`` values per thread, half that where D is not a multiple of 16 (no vector
    loads: the operand tiles pass through registers) and for exact fp32 (FMA products hold
    their operands in registers); a wider D is split across programs, each recomputing its
    tiles."""
    narrow = D % 16 or (dtype == torch.float32 and input_precision == "ieee")
    per_thread = _ACC_PER_THREAD // 2 if narrow else _ACC_PER_THREAD
    cap = max(_MIN_DOT, per_thread * 32 * config.num_warps // config.BLOCK_M)
    return max(_MIN_DOT, min(cap, triton.next_power_of_2(max(int(D), 1))))


def token_split(tokens: int, block_m: int) -> tuple[int, int, int]:
    """``(items per program, tokens per chunk, chunks)`` of a backward side with ``tokens``
    tokens per item in ``block_m`` product rows: every token in one chunk where they fit."""
    tx = min(triton.next_power_of_2(max(int(tokens), 1)), block_m)
    return block_m // tx, tx, triton.cdiv(max(int(tokens), 1), tx)


def teacher_chunk(items: int, teacher_tokens: int, block_m: int) -> int:
    """Teacher tokens flattened per chunk next to ``items`` items: all of them where they fit in
    ``block_m`` product rows, and at least enough for a product of 16 rows (padded tokens never
    win the max)."""
    need = max(1, _MIN_DOT // items)
    fit = max(1, block_m // items)
    return max(need, min(triton.next_power_of_2(max(int(teacher_tokens), 1)), fit))


def launch_options(dtype: torch.dtype, input_precision: str) -> dict:
    """Compile options of a launch beyond its tile config (passed at launch and by the compile
    tier alike). Exact fp32 (FMA products) lets ptxas use every register a thread can have
    (``maxnreg`` 255): without the directive ptxas sometimes caps these kernels at 128 or 168
    registers to fit more programs per SM, and spills a few bytes to get there."""
    if dtype == torch.float32 and input_precision == "ieee":
        return {"maxnreg": 255}
    return {}


def candidate_configs(kind: str, dtype: torch.dtype, D: int, input_precision: str
                      ) -> list[TileConfig]:
    """Every configuration a ``kind`` launch picks by itself for (dtype, D, precision)."""
    if kind in ("itc_rows", "itc_negatives"):
        return [rows_config(dtype, D, input_precision)]
    if kind == "itc_grads":
        return [grads_config(dtype, D, input_precision)]
    raise ValueError(f"itc: unknown kernel kind {kind!r}")


# ---------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``[N, D]`` features as ``[N, 1, D]``; ``[N, T, D]`` as given."""
    return x.unsqueeze(1) if x.dim() == 2 else x


def _check_inputs(q: torch.Tensor, k: torch.Tensor, **others) -> None:
    check_device(q)
    if q.dtype not in DTYPES or k.dtype != q.dtype:
        raise TypeError("itc triton backend: q and k must share one of float32, bfloat16, "
                        f"float16 (got {q.dtype} and {k.dtype})")
    for name, t in others.items():
        if t is not None and t.dtype != q.dtype:
            raise TypeError(f"itc triton backend: {name} must have q's dtype {q.dtype}, "
                            f"got {t.dtype}")


def _queue(k: torch.Tensor, kq):
    """The key queue as 3-D tokens fitting ``k`` (None: no queue, or an empty one)."""
    if kq is None:
        return None
    kq = _tokens(kq)
    if kq.shape[1:] != k.shape[1:]:
        raise ValueError(f"itc triton backend: the key queue {tuple(kq.shape)} does not continue "
                         f"the keys {tuple(k.shape)}")
    return kq if kq.shape[0] > 0 else None


def _teacher(q, k, kq, tq, tk, alpha: float):
    """``(tq, tk)`` as 3-D token tensors (``tk`` None: the keys ``[k; kq]``, whose queue
    segment the kernels take as its own teacher), or ``(q, k)`` stand-ins the kernels never
    read when ``alpha == 0``."""
    if alpha == 0.0:
        return q, k
    if tq is None:
        raise ValueError("itc triton backend: alpha != 0 needs the teacher queries tq")
    if tk is not None and kq is not None:
        raise ValueError("itc triton backend: with a key queue the teacher keys are the keys "
                         "(tk must be None)")
    tq = _tokens(tq)
    tk = k if tk is None else _tokens(tk)
    if tq.shape[0] != q.shape[0] or tk.shape[0] != k.shape[0] or tq.shape[2] != tk.shape[2]:
        raise ValueError(f"itc triton backend: teacher shapes {tuple(tq.shape)} and "
                         f"{tuple(tk.shape)} do not fit q {tuple(q.shape)} and k {tuple(k.shape)}")
    return tq, tk


def _weights(alpha: float, eps: float, M: int) -> tuple[float, float, float]:
    """``(soft_w, hard_w, smooth)`` of the targets ``T = soft_w softmax(TL) + hard_w pos / c +
    smooth``."""
    return (1.0 - eps) * alpha, (1.0 - eps) * (1.0 - alpha), eps / max(M, 1)


def _columns(k: torch.Tensor, kq, col_ids: torch.Tensor) -> int:
    """``M``: the keys and the queue, one id each."""
    M = k.shape[0] + (0 if kq is None else kq.shape[0])
    if col_ids.shape[0] != M:
        raise ValueError(f"itc triton backend: col_ids has {col_ids.shape[0]} entries for {M} keys")
    return M


def itc_rows_triton(q: torch.Tensor, k: torch.Tensor, kq, tq, tk, scale: torch.Tensor,
                    tscale: torch.Tensor, row_ids: torch.Tensor, col_ids: torch.Tensor,
                    alpha: float, eps: float, *, config: TileConfig | None = None):
    """``(loss, lse, tlse, count)``, each ``[N]`` float32, of ``ops.itc_rows``.

    ``q [N, Q, D]``, ``k [M, P, D]`` (``[N, D]`` / ``[M, D]`` taken as one token) float32,
    bfloat16 or float16, any strides; the queue ``kq [K, P, D]`` (or None) continues the keys;
    the teacher ``tq [N, Q', D']``, ``tk [M, P', D']`` (``tk`` None: the keys) read only when
    ``alpha != 0``. One launch; ``config`` forces the tiles (else an override of kind
    ``contrastive/itc_rows``, else :func:`rows_config`).
    """
    q, k = _tokens(q), _tokens(k)
    _check_inputs(q, k, kq=kq, tq=tq, tk=tk)
    kq = _queue(k, kq)
    tq, tk = _teacher(q, k, kq, tq, tk, float(alpha))
    N, Q, D = q.shape
    MK, P, _ = k.shape
    M = _columns(k, kq, col_ids)
    dev = q.device
    f32 = torch.float32
    outs = tuple(torch.empty(N, dtype=f32, device=dev) for _ in range(4))
    if N == 0:
        return outs
    prec = input_precision(q.dtype)
    cfg = resolve_config(q.dtype, D, prec, config, "itc_rows", heuristic=rows_config)
    soft_w, hard_w, smooth = _weights(float(alpha), float(eps), M)
    kq_ = k if kq is None else kq  # a stand-in the kernel never reads
    itc_rows_kernel[(triton.cdiv(N, cfg.BLOCK_M),)](
        q, k, kq_, tq, tk, _scale_f32(scale, dev), _scale_f32(tscale, dev), row_ids, col_ids,
        *outs, N, MK, M - MK, Q, P, D, tq.shape[1], tk.shape[1], tq.shape[2],
        *q.stride(), *k.stride(), *kq_.stride(), *tq.stride(), *tk.stride(),
        row_ids.stride(0), col_ids.stride(0), soft_w, hard_w, smooth,
        HAS_QUEUE=kq is not None, HAS_TEACHER=float(alpha) != 0.0, HAS_HARD=float(alpha) != 1.0,
        INPUT_PRECISION=prec, DOT_UPCAST=dot_upcast(q.dtype),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(q.dtype, prec))
    return outs


def _launch_grads(x, y, yq, tx, ty, x_ids, y_ids, stats, dx, part, scale, tscale, weights, flags,
                  cfg: TileConfig, x_is_q: bool):
    """One ``itc_grads_kernel`` launch writing ``dx`` (contiguous, x's shape); ``yq`` the queue
    continuing ``y`` (or None)."""
    NX, TOKX, D = x.shape
    NY, TOKY, _ = y.shape
    if NX == 0:
        return
    bx, tx_chunk, n_xc = token_split(TOKX, cfg.BLOCK_M)
    bd = grads_block_d(D, cfg, x.dtype, flags["INPUT_PRECISION"])
    n_dc = max(1, triton.cdiv(D, bd))
    grid = (triton.cdiv(NX, bx) * n_xc * n_dc,)
    yq_ = y if yq is None else yq  # a stand-in the kernel never reads
    itc_grads_kernel[grid](
        x, y, yq_, tx, ty, scale, tscale, x_ids, y_ids, *stats, dx, part,
        NX, NY, 0 if yq is None else yq.shape[0], TOKX, TOKY, D, tx.shape[1], ty.shape[1],
        tx.shape[2], n_xc, n_dc,
        *x.stride(), *y.stride(), *yq_.stride(), *tx.stride(), *ty.stride(),
        x_ids.stride(0), y_ids.stride(0), dx.stride(0), dx.stride(1), *weights,
        X_IS_Q=x_is_q, HAS_QUEUE=yq is not None, **flags, BX=bx, TX=tx_chunk,
        TTX=teacher_chunk(bx, tx.shape[1], cfg.BLOCK_M),
        BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, BLOCK_D=bd,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **launch_options(x.dtype, flags["INPUT_PRECISION"]))


def itc_grads_triton(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, kq, tq, tk,
                     scale: torch.Tensor, tscale: torch.Tensor, row_ids: torch.Tensor,
                     col_ids: torch.Tensor, lse: torch.Tensor, tlse: torch.Tensor,
                     count: torch.Tensor, alpha: float, eps: float, need_dk: bool, *,
                     config: TileConfig | None = None):
    """``(dq, dk, dscale)`` of ``ops.itc_grads``: ``dq`` in q's shape and dtype, ``dk`` in k's
    (the queue ``kq`` gets none; an empty ``[0]`` tensor when ``need_dk`` is False),
    ``dscale`` 0-dim float32.

    Two launches of ``itc_grads_kernel`` (queries against the keys and the queue, then the
    keys against the queries when ``need_dk``), each program owning its output rows;
    ``dscale`` sums the query launch's per-block shares. ``config`` forces the tiles (else an
    override of kind ``contrastive/itc_grads``, else :func:`grads_config`).
    """
    q_shape, k_shape = q.shape, k.shape
    q, k = _tokens(q), _tokens(k)
    _check_inputs(q, k, kq=kq, tq=tq, tk=tk)
    alpha, eps = float(alpha), float(eps)
    kq = _queue(k, kq)
    tq, tk = _teacher(q, k, kq, tq, tk, alpha)
    N, Q, D = q.shape
    M = _columns(k, kq, col_ids)
    dev = q.device
    f32 = torch.float32
    if N == 0 or M == 0:
        dk = torch.zeros(k_shape, dtype=k.dtype, device=dev) if need_dk else k.new_empty(0)
        return (torch.zeros(q_shape, dtype=q.dtype, device=dev), dk,
                torch.zeros((), dtype=f32, device=dev))
    # every element is written: each program owns its rows' tokens and features
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    dk = torch.empty(k.shape, dtype=k.dtype, device=dev) if need_dk else k.new_empty(0)
    prec = input_precision(q.dtype)
    cfg = resolve_config(q.dtype, D, prec, config, "itc_grads", heuristic=grads_config)
    stats = tuple(t.detach().to(f32).contiguous() for t in (g, lse, tlse, count))
    scale32, tscale32 = _scale_f32(scale, dev), _scale_f32(tscale, dev)
    weights = _weights(alpha, eps, M)
    flags = dict(HAS_TEACHER=alpha != 0.0, HAS_HARD=alpha != 1.0, INPUT_PRECISION=prec,
                 DOT_UPCAST=dot_upcast(q.dtype), FP16_RESCALE=q.dtype == torch.float16)
    bx = token_split(Q, cfg.BLOCK_M)[0]
    part = torch.empty(triton.cdiv(N, bx), dtype=f32, device=dev)
    _launch_grads(q, k, kq, tq, tk, row_ids, col_ids, stats, dq, part, scale32, tscale32,
                  weights, flags, cfg, True)
    if need_dk:
        _launch_grads(k, q, None, tk, tq, col_ids, row_ids, stats, dk, part, scale32, tscale32,
                      weights, flags, cfg, False)
        dk = dk.reshape(k_shape)
    return dq.reshape(q_shape), dk, part.sum()


def itc_negatives_triton(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor,
                         row_ids: torch.Tensor, col_ids: torch.Tensor, seed: torch.Tensor, *,
                         config: TileConfig | None = None) -> torch.Tensor:
    """``[N]`` int64 of ``ops.itc_negatives``: one launch; ``seed`` a 0-dim int64 tensor on the
    device, read by the kernel (no host synchronisation). ``config`` forces the tiles (else an
    override of kind ``contrastive/itc_negatives``, else :func:`rows_config`)."""
    q, k = _tokens(q), _tokens(k)
    _check_inputs(q, k)
    N, Q, D = q.shape
    M, P, _ = k.shape
    dev = q.device
    out = torch.full((N,), -1, dtype=torch.int64, device=dev)
    if N == 0 or M == 0:
        return out
    prec = input_precision(q.dtype)
    cfg = resolve_config(q.dtype, D, prec, config, "itc_negatives", heuristic=rows_config)
    itc_negatives_kernel[(triton.cdiv(N, cfg.BLOCK_M),)](
        q, k, _scale_f32(scale, dev), row_ids, col_ids, seed.reshape(()), out,
        N, M, Q, P, D, *q.stride(), *k.stride(), row_ids.stride(0), col_ids.stride(0),
        INPUT_PRECISION=prec, DOT_UPCAST=dot_upcast(q.dtype),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(q.dtype, prec))
    return out


# ---------------------------------------------------------------------------
# the sm_90 compile tier's view
# ---------------------------------------------------------------------------

#: the kernels of the compile tier: the backward's two launches are compiled apart
COMPILE_KINDS = ("itc_rows", "itc_dq", "itc_dk", "itc_negatives")


def compile_specs(kind: str, dtype: torch.dtype, D: int, input_precision: str,
                  config: TileConfig, tokens: tuple[int, int] = (1, 1), teacher: bool = False,
                  hard: bool = True, queue: bool = False):
    """``(kernel, signature, constexprs, divisible_by_16)`` of a launch of ``kind`` (one of
    :data:`COMPILE_KINDS`) for mmkernels.testing.sm90: contiguous inputs ``q [N, Q, D]``,
    ``k [M, P, D]`` with ``tokens = (Q, P)``, the teacher (``teacher``: alpha != 0; ``hard``:
    alpha != 1) with the student's tokens and width, with ``queue`` a key queue given as
    ALBEF keeps it (``queue.T`` of a ``[D, K]`` buffer: the feature stride is K), 16-byte
    aligned buffers, the item counts large multiples of 16, as Triton would specialise them
    (a count or stride of 1 is a constexpr)."""
    from ...testing.sm90 import launch_signature
    big = 4096
    Q, P = tokens
    ptr = PTR[dtype]
    prec = {"INPUT_PRECISION": input_precision, "DOT_UPCAST": False}
    tiles = {"BLOCK_N": config.BLOCK_N, "BLOCK_K": config.BLOCK_K}
    weights = ("soft_w", "hard_w", "smooth")
    # the queue [K, P, D] as a view of a [D, P, K] buffer (the stand-in k when there is none)
    kq_strides = (1, big, big * P) if queue else (P * D, D, 1)
    if kind in ("itc_rows", "itc_negatives"):
        strides = {"stride_qn": Q * D, "stride_qt": D, "stride_qd": 1,
                   "stride_kn": P * D, "stride_kt": D, "stride_kd": 1}
        ints = {"N": big, "Q": Q, "P": P, "D": D}
        ids = {"stride_rid": 1, "stride_cid": 1}
        constexprs = {**prec, "BLOCK_M": config.BLOCK_M, **tiles}
        if kind == "itc_negatives":
            sig = {"q_ptr": ptr, "k_ptr": ptr, "scale_ptr": "*fp32", "rid_ptr": "*i64",
                   "cid_ptr": "*i64", "seed_ptr": "*i64", "out_ptr": "*i64"}
            return (itc_negatives_kernel, *launch_signature(
                sig, {**ints, "M": big, **strides, **ids}, constexprs))
        sig = {"q_ptr": ptr, "k_ptr": ptr, "kq_ptr": ptr, "tq_ptr": ptr, "tk_ptr": ptr,
               "scale_ptr": "*fp32", "tscale_ptr": "*fp32", "rid_ptr": "*i64", "cid_ptr": "*i64",
               "loss_ptr": "*fp32", "lse_ptr": "*fp32", "tlse_ptr": "*fp32", "count_ptr": "*fp32"}
        more = {"stride_kqn": kq_strides[0], "stride_kqt": kq_strides[1],
                "stride_kqd": kq_strides[2],
                "stride_tqn": Q * D, "stride_tqt": D, "stride_tqd": 1,
                "stride_tkn": P * D, "stride_tkt": D, "stride_tkd": 1}
        ints.update(MK=big, KQ=big if queue else 0, TQ=Q, TP=P, TD=D)
        constexprs.update(HAS_QUEUE=queue, HAS_TEACHER=teacher, HAS_HARD=hard)
        return (itc_rows_kernel, *launch_signature(sig, {**ints, **strides, **more, **ids},
                                                   constexprs, floats=weights))
    if kind not in ("itc_dq", "itc_dk"):
        raise ValueError(f"itc: unknown kernel kind {kind!r}")
    x_is_q = kind == "itc_dq"
    queue = queue and x_is_q  # the keys' launch never reads the queue
    TOKX, TOKY = (Q, P) if x_is_q else (P, Q)
    bx, tx, n_xc = token_split(TOKX, config.BLOCK_M)
    bd = grads_block_d(D, config, dtype, input_precision)
    yq_strides = kq_strides if queue else (TOKY * D, D, 1)
    sig = {"x_ptr": ptr, "y_ptr": ptr, "yq_ptr": ptr, "tx_ptr": ptr, "ty_ptr": ptr,
           "scale_ptr": "*fp32", "tscale_ptr": "*fp32", "xid_ptr": "*i64", "yid_ptr": "*i64",
           "g_ptr": "*fp32", "lse_ptr": "*fp32", "tlse_ptr": "*fp32", "count_ptr": "*fp32",
           "dx_ptr": ptr, "part_ptr": "*fp32"}
    ints = {"NX": big, "NY": big, "NYQ": big if queue else 0, "TOKX": TOKX, "TOKY": TOKY, "D": D,
            "TTOKX": TOKX, "TTOKY": TOKY, "TD": D, "n_x_chunks": n_xc, "n_d_chunks": -(-D // bd),
            "stride_xn": TOKX * D, "stride_xt": D, "stride_xd": 1,
            "stride_yn": TOKY * D, "stride_yt": D, "stride_yd": 1,
            "stride_yqn": yq_strides[0], "stride_yqt": yq_strides[1], "stride_yqd": yq_strides[2],
            "stride_txn": TOKX * D, "stride_txt": D, "stride_txd": 1,
            "stride_tyn": TOKY * D, "stride_tyt": D, "stride_tyd": 1,
            "stride_xid": 1, "stride_yid": 1, "stride_dxn": TOKX * D, "stride_dxt": D}
    constexprs = {"X_IS_Q": x_is_q, "HAS_QUEUE": queue, "HAS_TEACHER": teacher, "HAS_HARD": hard,
                  **prec, "FP16_RESCALE": dtype == torch.float16, "BX": bx, "TX": tx,
                  "TTX": teacher_chunk(bx, TOKX, config.BLOCK_M), **tiles, "BLOCK_D": bd}
    return (itc_grads_kernel, *launch_signature(sig, ints, constexprs, floats=weights))


__all__ = [
    "COMPILE_KINDS", "KINDS", "candidate_configs", "compile_specs", "grads_block_d",
    "grads_config", "itc_grads_kernel", "itc_grads_triton", "itc_negatives_kernel",
    "itc_negatives_triton", "itc_rows_kernel", "itc_rows_triton", "launch_options", "rows_config",
    "teacher_chunk", "token_split",
]
