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
    ``tgt [N]`` int64. With one split, writes the fp32 ``[N]`` row outputs; with several,
    the partial row statistics ``row_part [4, splits, N]``. Column statistics are merged
    into ``col_max``/``col_sumexp``/``col_sum [M]`` under ``lock [column blocks]``, bounced
    through ``col_tmp`` (3 * BLOCK_N floats per program).
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
    s_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of logits
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
        s_i += tl.sum(logits, 1)
        p_i += tl.sum(tl.where(offs_n[None, :] == (tgt - n0)[:, None], logits, 0.0), 1)
        if WITH_COLUMNS:
            c_s = tl.sum(logits, 0)
            # one masked tile for both directions: padded rows are never
            # stored as row stats, padded columns never merged as column stats
            l = tl.where(row_ok[:, None] & col_ok[None, :], logits, float("-inf"))
        else:
            l = tl.where(col_ok[None, :], logits, float("-inf"))

        # ---- rows: online log-sum-exp
        m_new = tl.maximum(m_i, tl.max(l, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf)
        alpha = tl.exp(m_i - m_use)
        d_i = d_i * alpha + tl.sum(tl.exp(l - m_use[:, None]), 1)
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
            g_max = tl.load(col_max_ptr + cols_c64, mask=ok_c, other=float("-inf"),
                            cache_modifier=".cg")
            g_d = tl.load(col_sumexp_ptr + cols_c64, mask=ok_c, other=0.0, cache_modifier=".cg")
            g_s = tl.load(col_sum_ptr + cols_c64, mask=ok_c, other=0.0, cache_modifier=".cg")
            n_max = tl.maximum(g_max, t_max)
            n_use = tl.where(n_max == float("-inf"), 0.0, n_max)
            n_d = g_d * tl.exp(g_max - n_use) + t_d * tl.exp(t_max - n_use)
            tl.store(col_max_ptr + cols_c64, n_max, mask=ok_c)
            tl.store(col_sumexp_ptr + cols_c64, n_d, mask=ok_c)
            tl.store(col_sum_ptr + cols_c64, g_s + t_s, mask=ok_c)
            # every thread's stores are issued before the (single-thread)
            # release; also keeps the scratch row from being overwritten by
            # the next tile before everyone has read it
            tl.debug_barrier()
            tl.atomic_xchg(lock, 0)

    if n_splits == 1:
        m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
        d_fin = tl.where(row_ok, d_i, 1.0)  # padded rows: no log(0)
        tl.store(row_lse_ptr + rows64, m_fin + tl.log(d_fin), mask=row_ok)
        tl.store(row_max_ptr + rows64, m_i, mask=row_ok)
        tl.store(row_sum_ptr + rows64, s_i, mask=row_ok)
        tl.store(pos_ptr + rows64, p_i, mask=row_ok)
    else:  # partial row stats [4, n_splits, N], merged by launch.merge_row_parts
        part_stride = n_splits.to(tl.int64) * N
        part = row_part_ptr + split.to(tl.int64) * N + rows64
        tl.store(part, m_i, mask=row_ok)
        tl.store(part + part_stride, d_i, mask=row_ok)
        tl.store(part + 2 * part_stride, s_i, mask=row_ok)
        tl.store(part + 3 * part_stride, p_i, mask=row_ok)


@triton.jit
def grad_kernel(
    q_ptr, k_ptr, scale_ptr, tgt_ptr,
    row_lse_ptr, g_row_lse_ptr, g_row_sum_ptr, g_pos_ptr,
    col_lse_ptr, g_col_lse_ptr, g_col_sum_ptr,
    g_out_ptr, part_ptr, g_mul_ptr,
    n_rows, n_cols, D, col_offset,
    stride_qn, stride_qd, stride_kn, stride_kd, stride_t,
    stride_gm, stride_gn,
    WITH_COLUMNS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M x BLOCK_N) tile of one (rows x cols) chunk.

    Pointers are already offset to the chunk (row r0 of q and of the row
    vectors, column c0 of k and of the column vectors); ``col_offset`` = c0 is
    only needed to compare global column indices with the targets.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    q_rows_ptr = q_ptr + rows64[:, None] * stride_qn
    k_cols_ptr = k_ptr + cols64[:, None] * stride_kn

    acc = _similarity_tile(q_rows_ptr, k_cols_ptr, row_ok, col_ok, D, stride_qd, stride_kd,
                           INPUT_PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    scale = tl.load(scale_ptr).to(tl.float32)
    logits = acc * scale

    r_lse = tl.load(row_lse_ptr + rows64, mask=row_ok, other=0.0)
    g_rl = tl.load(g_row_lse_ptr + rows64, mask=row_ok, other=0.0)
    g_rs = tl.load(g_row_sum_ptr + rows64, mask=row_ok, other=0.0)
    g_p = tl.load(g_pos_ptr + rows64, mask=row_ok, other=0.0)
    tgt = tl.load(tgt_ptr + rows64 * stride_t, mask=row_ok, other=-1).to(tl.int32)

    g = g_rl[:, None] * tl.exp(logits - r_lse[:, None]) + g_rs[:, None]
    g += tl.where((cols + col_offset)[None, :] == tgt[:, None], g_p[:, None], 0.0)
    if WITH_COLUMNS:
        c_lse = tl.load(col_lse_ptr + cols64, mask=col_ok, other=0.0)
        g_cl = tl.load(g_col_lse_ptr + cols64, mask=col_ok, other=0.0)
        g_cs = tl.load(g_col_sum_ptr + cols64, mask=col_ok, other=0.0)
        g += g_cl[None, :] * tl.exp(logits - c_lse[None, :]) + g_cs[None, :]
    valid = row_ok[:, None] & col_ok[None, :]
    g = tl.where(valid, g, 0.0)

    # this program's share of dscale, accumulated over chunks in its own slot
    slot = pid_m * tl.num_programs(1) + pid_n
    part = tl.sum(tl.sum(g * acc, 1), 0)
    tl.store(part_ptr + slot, tl.load(part_ptr + slot) + part)

    g_ptrs = g_out_ptr + rows64[:, None] * stride_gm + cols64[None, :] * stride_gn
    # g_mul: a power of two (1 except for fp16) that keeps scale * G out of
    # fp16's subnormal range; the launcher divides the GEMM results by it
    g_mul = tl.load(g_mul_ptr)
    tl.store(g_ptrs, (g * (scale * g_mul)).to(g_out_ptr.dtype.element_ty), mask=valid)
