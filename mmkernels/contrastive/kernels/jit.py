"""The contrastive Triton kernels (``@triton.jit``); launchers are in ``launch.py``.

``stats_kernel``: one program per (block of BLOCK_M rows, split of the columns) walks its column
blocks, computes each logit tile with a K-loop over D, folds it into online row statistics and,
with column statistics, merges the tile's column max / sum-exp / sum into global fp32 buffers
under a per-column-block spin lock. ``grad_kernel``: one [BLOCK_M, BLOCK_N] tile of
``scale * G`` for one (row chunk, column chunk) of the backward, plus its share of
``sum(G * S)``. Offsets are int64; inputs may have any strides.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ... import _triton  # noqa: F401  (fixes the interpreter before any kernel is defined)


@triton.jit
def _similarity_tile(q_rows_ptr, k_cols_ptr, row_ok, col_ok, D, stride_qd, stride_kd,
                     INPUT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """S tile ``[BLOCK_M, BLOCK_N]`` (fp32) = q rows . k rows over D, K-loop of BLOCK_K.

    ``q_rows_ptr [BLOCK_M, 1]`` / ``k_cols_ptr [BLOCK_N, 1]``: pointers to the rows' starts;
    masked (padded) rows, columns and features load as zeros, so their S is exactly 0.
    """
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < D
        kk64 = kk.to(tl.int64)
        a = tl.load(q_rows_ptr + kk64[None, :] * stride_qd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(k_cols_ptr + kk64[None, :] * stride_kd,
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_UPCAST:  # interpreter only: its tl.dot mishandles bfloat16
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def stats_kernel(
    q_ptr, k_ptr, scale_ptr, tgt_ptr,
    row_lse_ptr, row_max_ptr, row_sum_ptr, pos_ptr,
    col_max_ptr, col_sumexp_ptr, col_sum_ptr, lock_ptr, col_tmp_ptr, row_part_ptr,
    N, M, D, cols_per_split,
    stride_qn, stride_qd, stride_kn, stride_kd, stride_t,
    WITH_COLUMNS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Row (and column) statistics of ``L = scale * q @ k^T``, grid ``(row blocks, splits)``.

    ``q [N, D]``, ``k [M, D]`` (fp32/bf16/fp16, any strides), ``scale`` one fp32,
    ``tgt [N]`` int64. With one split, writes the fp32 ``[N]`` row outputs (``row_lse``:
    the log-sum-exp relative to the max, ``row_sum``: the sum of ``l - max``; see ``ops.py``);
    with several, the partial row statistics ``row_part [4, splits, N]``, each relative to its
    own max. Column statistics are merged into ``col_max``/``col_sumexp``/``col_sum [M]``
    (zero-filled: a sum-exp of 0 marks a column nothing was merged into yet; ``col_sum``
    the plain sum) under ``lock [column blocks]``, bounced through ``col_tmp`` (3 * BLOCK_N
    floats per program). ``finalize_kernel`` merges the splits, turns the column sum-exps
    into log-sums and the column sums into sums relative to the max. A row's sum is kept
    relative to its running max and moved with it (``count * (old max - new max)``), each
    tile's plain sum made relative to the max as it is merged: label smoothing cancels
    logits over one tile at most, not over a whole row. (The column sums stay plain: the
    merge under the lock has no registers to spare for a count.)
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    q_rows_ptr = q_ptr + rows64[:, None] * stride_qn
    tgt = tl.load(tgt_ptr + rows64 * stride_t, mask=row_ok, other=-1)
    scale = tl.load(scale_ptr).to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max
    d_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp(l - m_i)
    s_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of (l - m_i)
    c_i = 0.0  # columns folded in so far
    p_i = tl.zeros([BLOCK_M], tl.float32)  # positive logit
    tgt = tgt.to(tl.int32)  # targets < M < 2**31
    offs_n = tl.arange(0, BLOCK_N)
    if WITH_COLUMNS:
        offs_n_c = tl.arange(0, BLOCK_N)  # separate range: gets its own compact layout
        tmp_row_ptr = col_tmp_ptr + (pid * n_splits + split).to(tl.int64) * (3 * BLOCK_N)

    # this program's column blocks: split `split` of the columns (cols_per_split is a multiple
    # of BLOCK_N), visited from a staggered start so programs rarely queue on one column lock
    num_cb = tl.cdiv(M, BLOCK_N)
    cb_lo = split * (cols_per_split // BLOCK_N)
    n_my = tl.minimum(cols_per_split // BLOCK_N, num_cb - cb_lo)
    start = pid % tl.maximum(n_my, 1)
    for it in range(0, n_my):
        cb = cb_lo + (it + start) % n_my
        n0 = cb * BLOCK_N
        # masks and target tests against the constant offs_n, not per-element
        # column indices: keeps the per-thread column indices out of registers
        col_ok = offs_n < M - n0
        k_cols_ptr = k_ptr + (n0 + offs_n).to(tl.int64)[:, None] * stride_kn

        acc = _similarity_tile(q_rows_ptr, k_cols_ptr, row_ok, col_ok, D, stride_qd, stride_kd,
                               INPUT_PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        # Padded rows/columns were loaded as zeros, so their S is exactly 0:
        # plain sums over the tile only see valid logits (non-finite inputs
        # give NaN there, which only ever lands in rows/columns that are NaN).
        logits = acc * scale
        row_s = tl.sum(logits, 1)
        p_i += tl.sum(tl.where(offs_n[None, :] == (tgt - n0)[:, None], logits, 0.0), 1)
        if WITH_COLUMNS:
            # plain column sums (padded rows hold exact zeros), made relative to the column
            # max by finalize_kernel
            c_s = tl.sum(logits, 0)
            # one masked tile for both directions: padded rows are never
            # stored as row stats, padded columns never merged as column stats
            l = tl.where(row_ok[:, None] & col_ok[None, :], logits, float("-inf"))
        else:
            l = tl.where(col_ok[None, :], logits, float("-inf"))

        # ---- rows: online log-sum-exp, and the sum of l - max moved with the max
        m_new = tl.maximum(m_i, tl.max(l, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf)
        m_old = tl.where(m_i == float("-inf"), 0.0, m_i)
        alpha = tl.exp(m_i - m_use)
        d_i = d_i * alpha + tl.sum(tl.exp(l - m_use[:, None]), 1)
        # the tile's plain sums (padded columns hold exact zeros) made relative to the new max:
        # the cancellation spans one tile's columns, the running sum moves with the max
        n_ok = tl.minimum(M - n0, BLOCK_N).to(tl.float32)
        s_i = s_i + c_i * (m_old - m_use) + (row_s - n_ok * m_use)
        c_i += n_ok
        m_i = m_new

        # ---- columns: tile stats over this block's rows, merged under a lock
        if WITH_COLUMNS:
            c_max = tl.max(l, 0)
            c_use = tl.where(c_max == float("-inf"), 0.0, c_max)
            c_d = tl.sum(tl.exp(l - c_use[None, :]), 0)
            # The column reductions come out in the MMA accumulator's slice
            # layout: every thread holds a quarter of the BLOCK_N columns,
            # replicated across warps, and a merge done in that layout needs
            # ~9 values per column per thread (ptxas then spills).  Bounce the
            # three vectors through this program's scratch row so the merge
            # runs in a compact layout of about one column per thread.
            tl.store(tmp_row_ptr + offs_n, c_max)
            tl.store(tmp_row_ptr + BLOCK_N + offs_n, c_d)
            tl.store(tmp_row_ptr + 2 * BLOCK_N + offs_n, c_s)
            tl.debug_barrier()
            cols_c = cb * BLOCK_N + offs_n_c
            ok_c = cols_c < M
            cols_c64 = cols_c.to(tl.int64)
            t_max = tl.load(tmp_row_ptr + offs_n_c)
            t_d = tl.load(tmp_row_ptr + BLOCK_N + offs_n_c)
            t_s = tl.load(tmp_row_ptr + 2 * BLOCK_N + offs_n_c)

            lock = lock_ptr + cb
            while tl.atomic_cas(lock, 0, 1) == 1:
                pass
            # the buffers start as zeros (one fill); a column whose sum-exp is still 0 has
            # merged nothing yet (a merged tile adds at least exp(0) = 1), so its stored
            # maximum is not one
            g_max = tl.load(col_max_ptr + cols_c64, mask=ok_c, other=0.0, cache_modifier=".cg")
            g_d = tl.load(col_sumexp_ptr + cols_c64, mask=ok_c, other=0.0, cache_modifier=".cg")
            g_s = tl.load(col_sum_ptr + cols_c64, mask=ok_c, other=0.0, cache_modifier=".cg")
            empty = g_d == 0.0
            n_max = tl.where(empty, t_max, tl.maximum(g_max, t_max))
            n_use = tl.where(n_max == float("-inf"), 0.0, n_max)
            n_d = tl.where(empty, 0.0, g_d * tl.exp(g_max - n_use)) + t_d * tl.exp(t_max - n_use)
            tl.store(col_max_ptr + cols_c64, n_max, mask=ok_c)
            tl.store(col_sumexp_ptr + cols_c64, n_d, mask=ok_c)
            tl.store(col_sum_ptr + cols_c64, g_s + t_s, mask=ok_c)
            # every thread's stores are issued before the (single-thread)
            # release; also keeps the scratch row from being overwritten by
            # the next tile before everyone has read it
            tl.debug_barrier()
            tl.atomic_xchg(lock, 0)

    if n_splits == 1:
        d_fin = tl.where(row_ok, d_i, 1.0)  # padded rows: no log(0)
        tl.store(row_lse_ptr + rows64, tl.log(d_fin), mask=row_ok)
        tl.store(row_max_ptr + rows64, m_i, mask=row_ok)
        tl.store(row_sum_ptr + rows64, s_i, mask=row_ok)
        tl.store(pos_ptr + rows64, p_i, mask=row_ok)
    else:  # partial row stats [4, n_splits, N], merged by finalize_kernel
        part_stride = n_splits.to(tl.int64) * N
        part = row_part_ptr + split.to(tl.int64) * N + rows64
        tl.store(part, m_i, mask=row_ok)
        tl.store(part + part_stride, d_i, mask=row_ok)
        tl.store(part + 2 * part_stride, s_i, mask=row_ok)
        tl.store(part + 3 * part_stride, p_i, mask=row_ok)


@triton.jit
def finalize_kernel(
    row_part_ptr, row_lse_ptr, row_max_ptr, row_sum_ptr, pos_ptr,
    col_buf_ptr, col_lse_ptr, col_max_ptr, col_sum_ptr,
    N, M, n_splits, cols_per_split,
    MERGE_ROWS: tl.constexpr, WITH_COLUMNS: tl.constexpr, BLOCK: tl.constexpr,
):
    """One launch after ``stats_kernel``: program ``p`` merges the split row statistics of rows
    ``[p * BLOCK, (p + 1) * BLOCK)`` (``MERGE_ROWS``; split ``s`` covers ``cols_per_split``
    columns from ``s * cols_per_split``) and writes the column outputs of the same range of
    columns from ``col_buf [3, M]`` (max, sum-exp, plain sum over the N rows)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    offs64 = offs.to(tl.int64)
    if MERGE_ROWS:
        ok = offs < N
        part_stride = n_splits.to(tl.int64) * N
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        for sp in range(0, n_splits):
            m = tl.maximum(m, tl.load(row_part_ptr + sp * N + offs64, mask=ok, other=0.0))
        m_use = tl.where(m == float("-inf"), 0.0, m)
        d = tl.zeros([BLOCK], tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        p = tl.zeros([BLOCK], tl.float32)
        for sp in range(0, n_splits):
            base = row_part_ptr + sp * N + offs64
            m_s = tl.load(base, mask=ok, other=0.0)
            s_use = tl.where(m_s == float("-inf"), 0.0, m_s)
            width = tl.minimum(cols_per_split, M - sp * cols_per_split).to(tl.float32)
            d += tl.load(base + part_stride, mask=ok, other=0.0) * tl.exp(m_s - m_use)
            s += tl.load(base + 2 * part_stride, mask=ok, other=0.0) + width * (s_use - m_use)
            p += tl.load(base + 3 * part_stride, mask=ok, other=0.0)
        d = tl.where(ok, d, 1.0)
        tl.store(row_lse_ptr + offs64, tl.log(d), mask=ok)
        tl.store(row_max_ptr + offs64, m, mask=ok)
        tl.store(row_sum_ptr + offs64, s, mask=ok)
        tl.store(pos_ptr + offs64, p, mask=ok)
    if WITH_COLUMNS:
        ok_c = offs < M
        c_max = tl.load(col_buf_ptr + offs64, mask=ok_c, other=0.0)
        c_d = tl.load(col_buf_ptr + M + offs64, mask=ok_c, other=1.0)
        c_s = tl.load(col_buf_ptr + 2 * M + offs64, mask=ok_c, other=0.0)
        c_use = tl.where(c_max == float("-inf"), 0.0, c_max)
        tl.store(col_lse_ptr + offs64, tl.log(c_d), mask=ok_c)
        tl.store(col_max_ptr + offs64, c_max, mask=ok_c)
        tl.store(col_sum_ptr + offs64, c_s - N * c_use, mask=ok_c)


@triton.jit
def _shift(m):
    """The maxima where finite, else 0: what the forward's statistics are relative to."""
    return tl.where((m == m) & (tl.abs(m) < float("inf")), m, 0.0)


@triton.jit
def _fp16_multiplier(bound, scale):
    """Per-row powers of two that map ``|scale| * bound`` near 2**14: scale * G stored in fp16
    for the tensor cores stays out of fp16's subnormal range (a mean-reduced loss over a big
    batch has G ~ 1/N^2)."""
    b = tl.maximum(bound * tl.abs(scale), 1e-30)
    e = tl.floor(tl.log2(16384.0 / b))
    e = tl.minimum(tl.maximum(e, -100.0), 100.0)
    return tl.exp2(e)


@triton.jit
def grad_kernel(
    q_ptr, k_ptr, scale_ptr, tgt_ptr,
    row_max_ptr, row_lse_ptr, g_row_lse_ptr, g_row_sum_ptr, g_pos_ptr,
    col_max_ptr, col_lse_ptr, g_col_lse_ptr, g_col_sum_ptr,
    dq_ptr, dk_ptr, ds_part_ptr,
    N, M, D, n_dq_progs, n_d_chunks,
    stride_qn, stride_qd, stride_kn, stride_kd, stride_t,
    stride_dqn, stride_dkn,
    WITH_COLUMNS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    FP16_RESCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The whole backward in one grid: the first ``n_dq_progs`` programs each own BLOCK_M rows
    of q and BLOCK_D of its features and walk every block of BLOCK_N columns: recompute the
    logits (K-loop over D), form G, accumulate ``G @ k[:, chunk]`` in fp32 registers and write
    ``dq = scale * G @ k``; those of the first feature chunk also write their rows' share of
    ``dscale = sum(G * S)`` to ``ds_part``. The other programs do the same for BLOCK_M rows of
    k over blocks of BLOCK_N rows of q (``G.T``), writing ``dk``. Every output element has one
    owner: no atomics, no zero fills. D beyond BLOCK_D costs a recomputation of the logits per
    feature chunk. The softmax is ``exp((L - max) - logsum)`` (``row_max``/``row_lse``: the
    forward's max and log-sum relative to it; see ``ops.py``).
    """
    pid = tl.program_id(0)
    scale = tl.load(scale_ptr).to(tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    offs_o = tl.arange(0, BLOCK_N)
    if pid < n_dq_progs:
        rb = pid // n_d_chunks
        d0 = (pid % n_d_chunks) * BLOCK_D
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        q_rows_ptr = q_ptr + rows64[:, None] * stride_qn
        r_lse = tl.load(row_lse_ptr + rows64, mask=row_ok, other=0.0)
        r_max = _shift(tl.load(row_max_ptr + rows64, mask=row_ok, other=0.0))
        g_rl = tl.load(g_row_lse_ptr + rows64, mask=row_ok, other=0.0)
        g_rs = tl.load(g_row_sum_ptr + rows64, mask=row_ok, other=0.0)
        g_p = tl.load(g_pos_ptr + rows64, mask=row_ok, other=0.0)
        tgt = tl.load(tgt_ptr + rows64 * stride_t, mask=row_ok, other=-1).to(tl.int32)
        mul = tl.full([BLOCK_M], 1.0, tl.float32)
        if FP16_RESCALE:
            other_bound = 0.0
            if WITH_COLUMNS:
                cb = tl.zeros([BLOCK_N], tl.float32)
                for c0 in range(0, M, BLOCK_N):
                    c_ok = offs_o < M - c0
                    cb = tl.maximum(cb, tl.abs(tl.load(g_col_lse_ptr + c0 + offs_o, mask=c_ok, other=0.0))
                                    + tl.abs(tl.load(g_col_sum_ptr + c0 + offs_o, mask=c_ok, other=0.0)))
                other_bound = tl.max(cb, 0)
            mul = _fp16_multiplier(tl.abs(g_rl) + tl.abs(g_rs) + tl.abs(g_p) + other_bound, scale)
        dd = d0 + offs_d
        d_ok = dd < D
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        ds = tl.zeros([BLOCK_M], tl.float32)
        for c0 in range(0, M, BLOCK_N):
            cols = c0 + offs_o
            col_ok = cols < M
            cols64 = cols.to(tl.int64)
            k_cols_ptr = k_ptr + cols64[:, None] * stride_kn
            S = _similarity_tile(q_rows_ptr, k_cols_ptr, row_ok, col_ok, D, stride_qd, stride_kd,
                                 INPUT_PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
            L = S * scale
            g = g_rl[:, None] * tl.exp((L - r_max[:, None]) - r_lse[:, None]) + g_rs[:, None]
            g += tl.where(cols[None, :] == tgt[:, None], g_p[:, None], 0.0)
            if WITH_COLUMNS:
                c_lse = tl.load(col_lse_ptr + cols64, mask=col_ok, other=0.0)
                c_max = _shift(tl.load(col_max_ptr + cols64, mask=col_ok, other=0.0))
                g_cl = tl.load(g_col_lse_ptr + cols64, mask=col_ok, other=0.0)
                g_cs = tl.load(g_col_sum_ptr + cols64, mask=col_ok, other=0.0)
                g += g_cl[None, :] * tl.exp((L - c_max[None, :]) - c_lse[None, :]) + g_cs[None, :]
            g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
            ds += tl.sum(g * S, 1)
            kc = tl.load(k_cols_ptr + dd.to(tl.int64)[None, :] * stride_kd,
                         mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            gs = g * (scale * mul)[:, None]
            if DOT_UPCAST:
                kc = kc.to(tl.float32)
            else:
                gs = gs.to(kc.dtype)
            acc = tl.dot(gs, kc, acc, input_precision=INPUT_PRECISION)
        out = acc / mul[:, None]
        tl.store(dq_ptr + rows64[:, None] * stride_dqn + dd.to(tl.int64)[None, :],
                 out.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        if d0 == 0:
            tl.store(ds_part_ptr + rb, tl.sum(ds, 0))
    else:
        p = pid - n_dq_progs
        cb_ = p // n_d_chunks
        d0 = (p % n_d_chunks) * BLOCK_D
        cols = cb_ * BLOCK_M + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        cols64 = cols.to(tl.int64)
        k_rows_ptr = k_ptr + cols64[:, None] * stride_kn
        g_cl = tl.zeros([BLOCK_M], tl.float32)
        g_cs = tl.zeros([BLOCK_M], tl.float32)
        c_lse = tl.zeros([BLOCK_M], tl.float32)
        c_max = tl.zeros([BLOCK_M], tl.float32)
        if WITH_COLUMNS:
            c_lse = tl.load(col_lse_ptr + cols64, mask=col_ok, other=0.0)
            c_max = _shift(tl.load(col_max_ptr + cols64, mask=col_ok, other=0.0))
            g_cl = tl.load(g_col_lse_ptr + cols64, mask=col_ok, other=0.0)
            g_cs = tl.load(g_col_sum_ptr + cols64, mask=col_ok, other=0.0)
        mul = tl.full([BLOCK_M], 1.0, tl.float32)
        if FP16_RESCALE:
            rb_ = tl.zeros([BLOCK_N], tl.float32)
            for r0 in range(0, N, BLOCK_N):
                r_ok = offs_o < N - r0
                rb_ = tl.maximum(rb_, tl.abs(tl.load(g_row_lse_ptr + r0 + offs_o, mask=r_ok, other=0.0))
                                 + tl.abs(tl.load(g_row_sum_ptr + r0 + offs_o, mask=r_ok, other=0.0))
                                 + tl.abs(tl.load(g_pos_ptr + r0 + offs_o, mask=r_ok, other=0.0)))
            mul = _fp16_multiplier(tl.abs(g_cl) + tl.abs(g_cs) + tl.max(rb_, 0), scale)
        dd = d0 + offs_d
        d_ok = dd < D
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for r0 in range(0, N, BLOCK_N):
            rows = r0 + offs_o
            row_ok = rows < N
            rows64 = rows.to(tl.int64)
            q_rows_ptr = q_ptr + rows64[:, None] * stride_qn
            # the transposed tile: St[j, i] = k_j . q_i
            St = _similarity_tile(k_rows_ptr, q_rows_ptr, col_ok, row_ok, D, stride_kd, stride_qd,
                                  INPUT_PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
            Lt = St * scale
            r_lse = tl.load(row_lse_ptr + rows64, mask=row_ok, other=0.0)
            r_max = _shift(tl.load(row_max_ptr + rows64, mask=row_ok, other=0.0))
            g_rl = tl.load(g_row_lse_ptr + rows64, mask=row_ok, other=0.0)
            g_rs = tl.load(g_row_sum_ptr + rows64, mask=row_ok, other=0.0)
            g_p = tl.load(g_pos_ptr + rows64, mask=row_ok, other=0.0)
            tgt = tl.load(tgt_ptr + rows64 * stride_t, mask=row_ok, other=-1).to(tl.int32)
            g = g_rl[None, :] * tl.exp((Lt - r_max[None, :]) - r_lse[None, :]) + g_rs[None, :]
            g += tl.where(cols[:, None] == tgt[None, :], g_p[None, :], 0.0)
            if WITH_COLUMNS:
                g += g_cl[:, None] * tl.exp((Lt - c_max[:, None]) - c_lse[:, None]) + g_cs[:, None]
            g = tl.where(col_ok[:, None] & row_ok[None, :], g, 0.0)
            qc = tl.load(q_rows_ptr + dd.to(tl.int64)[None, :] * stride_qd,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            gs = g * (scale * mul)[:, None]
            if DOT_UPCAST:
                qc = qc.to(tl.float32)
            else:
                gs = gs.to(qc.dtype)
            acc = tl.dot(gs, qc, acc, input_precision=INPUT_PRECISION)
        out = acc / mul[:, None]
        tl.store(dk_ptr + cols64[:, None] * stride_dkn + dd.to(tl.int64)[None, :],
                 out.to(dk_ptr.dtype.element_ty), mask=col_ok[:, None] & d_ok[None, :])
