"""Triton kernels for the contrastive family (forward stats, backward gradients).

The contract these launchers implement is written down in the family's op
module and in docs/architecture.md; in short, with ``L = scale * q @ k^T``:

* ``contrastive_stats_triton`` returns per-row log-sum-exp / max / sum /
  positive logit and (optionally) per-column log-sum-exp / max / sum, in one
  pass over the logit tiles, without ever holding the N x M logits.
* ``contrastive_grads_triton`` returns ``dq = scale * G @ k``,
  ``dk = scale * G^T @ q`` and ``dscale = sum(G * S)`` where ``G`` is the
  gradient of the loss with respect to the logits (divided by ``scale``).
  ``G`` only ever exists in bounded ``[R, C]`` blocks.

Forward (``_contrastive_stats_kernel``)
    One program per block of BLOCK_M rows.  It walks over every column block
    (starting at column block ``pid % num_col_blocks`` so that programs rarely
    touch the same column block at the same time), computes the logit tile
    with a K-loop over D, and folds it into running row statistics
    (online log-sum-exp).  With column statistics, the tile's column max /
    sum-exp / sum over the block's rows are merged into global fp32 buffers
    under a per-column-block spin lock (``atomic_cas`` / ``atomic_xchg``).

Backward (``_contrastive_grad_block_kernel`` + cuBLAS)
    For each (row chunk, column chunk) the kernel recomputes S tile by tile,
    forms G, writes ``scale * G`` in the input dtype into a reused ``[R, C]``
    buffer and adds its share of ``sum(G * S)`` into a per-program fp32 slot.
    ``torch.mm`` then accumulates ``dq`` (fp32 ``[R, D]``) and ``dk``
    (fp32 ``[M, D]``).  D can be 1536, so FlashAttention-style register
    accumulators for dq/dk are not an option.

All pointer offsets are computed in int64.  Inputs may have any strides.
Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._triton import check_device, dot_upcast, input_precision, interpreting, triton_at_least

# ---------------------------------------------------------------------------
# Budget constants of the backward pass: G is materialised in blocks of at
# most BWD_ROW_CHUNK x BWD_COL_CHUNK elements (input dtype), plus one fp32
# [BWD_ROW_CHUNK, D] accumulator for dq.  Multiples of every BLOCK_M/BLOCK_N.
# ---------------------------------------------------------------------------
BWD_ROW_CHUNK = 2048
BWD_COL_CHUNK = 4096

_NEG_INF = float("-inf")


class TileConfig(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


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
def _contrastive_stats_kernel(
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
    else:  # partial row stats [4, n_splits, N], merged by _merge_row_parts
        part_stride = n_splits.to(tl.int64) * N
        part = row_part_ptr + split.to(tl.int64) * N + rows64
        tl.store(part, m_i, mask=row_ok)
        tl.store(part + part_stride, d_i, mask=row_ok)
        tl.store(part + 2 * part_stride, s_i, mask=row_ok)
        tl.store(part + 3 * part_stride, p_i, mask=row_ok)


@triton.jit
def _contrastive_grad_block_kernel(
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


# ---------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _block_k(dtype: torch.dtype, D: int, input_precision: str) -> int:
    if dtype == torch.float32 and input_precision == "ieee":
        return 16  # FMA dot: a thin K slice keeps the operand registers down
    cap = 32 if dtype == torch.float32 else 64
    return max(16, min(cap, triton.next_power_of_2(max(int(D), 1))))


def _triton39_unaligned(dtype: torch.dtype, D: int, input_precision: str) -> bool:
    """Whether (dtype, D, precision) takes the Triton >= 3.9 tiles below.

    Triton >= 3.9 generates more register-hungry code for the statistics kernel and has ptxas
    allocate with --regAllocOptLevel=2: when D is not a multiple of 16 (no divisible-by-16
    specialisation of D and the row strides) and BLOCK_K is at its cap, the Triton 3.6 tiles
    spill with column statistics. Those cases then take the largest tiles that compile for
    sm_90a with no spills (tests/test_sm90_compile.py): BLOCK_K 32 instead of 64 for 16-bit
    inputs; for fp32 with tf32 BLOCK_M 64 instead of 128 (or BLOCK_N 32 instead of 64) with
    8 warps, and BLOCK_K 16 instead of 32 with 4 warps; 8 warps for the exact-fp32 BLOCK_K = 32
    candidate. Every other case, and every case on older Triton, is unchanged.
    """
    if D % 16 == 0 or not triton_at_least(3, 9):
        return False
    if dtype == torch.float32 and input_precision == "ieee":
        return True
    return _block_k(dtype, D, input_precision) == (32 if dtype == torch.float32 else 64)


def heuristic_config(dtype: torch.dtype, D: int, input_precision: str) -> TileConfig:
    """The tile configuration used when autotuning is off (the default).

    Chosen from the sm_90a compile reports (tests/test_sm90_compile.py):
    128 x 64 tiles with 8 warps (two warpgroups of m64n64 wgmma) keep both
    kernels, column statistics included, well below 255 registers with no
    spills; 128 x 128 sits at the limit and spills when D is not a multiple
    of 16.
    """
    bk = _block_k(dtype, D, input_precision)
    if dtype == torch.float32 and input_precision == "ieee":
        # exact fp32 products: no tensor cores, FMA dot.  (8 warps: ptxas caps
        # these kernels at 128 registers and spills when D % 16 != 0.)
        return TileConfig(32, 64, bk, 4, 2)
    if _triton39_unaligned(dtype, D, input_precision):  # see _triton39_unaligned
        return TileConfig(64, 64, 32, 8, 3) if dtype == torch.float32 else TileConfig(128, 64, 32, 8, 3)
    return TileConfig(128, 64, bk, 8, 3)


def autotune_configs(dtype: torch.dtype, D: int, input_precision: str) -> list[TileConfig]:
    """The configurations tried when MMKERNELS_AUTOTUNE=1 (GPU only)."""
    bk = _block_k(dtype, D, input_precision)
    if dtype == torch.float32 and input_precision == "ieee":
        # (64x32x16 and 32x32x32 spill a few bytes with Triton 3.9's ptxas)
        if _triton39_unaligned(dtype, D, input_precision):
            return [TileConfig(32, 64, bk, 4, 2), TileConfig(32, 64, 32, 8, 2)]
        return [TileConfig(32, 64, bk, 4, 2), TileConfig(32, 64, 32, 4, 2)]
    if _triton39_unaligned(dtype, D, input_precision):  # see _triton39_unaligned
        if dtype == torch.float32:
            return [TileConfig(64, 64, 32, 8, 3), TileConfig(128, 32, 32, 8, 3),
                    TileConfig(64, 64, 16, 4, 3), TileConfig(64, 64, 16, 4, 4)]
        return [TileConfig(128, 64, 32, 8, 3), TileConfig(128, 64, 32, 8, 4),
                TileConfig(64, 64, 32, 4, 3), TileConfig(64, 64, 32, 4, 4)]
    return [
        TileConfig(128, 64, bk, 8, 3),
        TileConfig(128, 64, bk, 8, 4),
        TileConfig(64, 64, bk, 4, 3),
        TileConfig(64, 64, bk, 4, 4),
    ]


def candidate_configs(dtype: torch.dtype | None = None, D: int | None = None,
                      input_precision: str | None = None, autotune: bool = True) -> list[TileConfig]:
    """Every configuration the launchers can pick, deduplicated.

    With all three arguments: the heuristic config plus the autotune list for
    that (dtype, D, precision).  Leave any of them out to take the union over
    every dtype / every precision / every BLOCK_K class of D.
    """
    dtypes = _DTYPES if dtype is None else (dtype,)
    Ds = (16, 32, 64) if D is None else (D,)  # D only matters through BLOCK_K
    out: list[TileConfig] = []
    for dt in dtypes:
        precs = input_precisions(dt) if input_precision is None else (input_precision,)
        for prec in precs:
            for d in Ds:
                out.append(heuristic_config(dt, d, prec))
                if autotune:
                    out += autotune_configs(dt, d, prec)
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def input_precisions(dtype: torch.dtype) -> tuple[str, ...]:
    """Values of INPUT_PRECISION the launchers can pass for this dtype."""
    return ("ieee", "tf32") if dtype == torch.float32 else ("tf32",)


def _block_bounds() -> tuple[int, int, int]:
    """(smallest BLOCK_M, smallest BLOCK_N, largest BLOCK_N) over every configuration."""
    cs = candidate_configs()
    return (min(c.BLOCK_M for c in cs), min(c.BLOCK_N for c in cs), max(c.BLOCK_N for c in cs))


_ALL_BLOCK_BOUNDS = _block_bounds()








def _autotune_enabled() -> bool:
    return os.environ.get("MMKERNELS_AUTOTUNE", "0") == "1" and not interpreting()


def _resolve_config(dtype, D, prec, config):
    """The fixed config to launch with, or None when the autotuner picks."""
    if config is not None:
        return config
    if _autotune_enabled():
        return None
    return heuristic_config(dtype, D, prec)


def _bounds(config):
    """(min BLOCK_M, min BLOCK_N, max BLOCK_N) that buffers must be sized for."""
    if config is None:
        return _ALL_BLOCK_BOUNDS
    return config.BLOCK_M, config.BLOCK_N, config.BLOCK_N


@functools.lru_cache(maxsize=None)
def _autotuned(kind: str, configs: tuple[TileConfig, ...]):
    base = _contrastive_stats_kernel if kind == "stats" else _contrastive_grad_block_kernel
    # buffers a trial run modifies in place (everything else is overwritten)
    restore = (["col_max_ptr", "col_sumexp_ptr", "col_sum_ptr"] if kind == "stats"
               else ["part_ptr"])
    tconfigs = [
        triton.Config({"BLOCK_M": c.BLOCK_M, "BLOCK_N": c.BLOCK_N, "BLOCK_K": c.BLOCK_K},
                      num_warps=c.num_warps, num_stages=c.num_stages)
        for c in configs
    ]
    return triton.autotune(configs=tconfigs, key=["D", "WITH_COLUMNS", "INPUT_PRECISION"],
                           restore_value=restore)(base)


def _launch(kind: str, grid_fn, args: tuple, dtype: torch.dtype, D: int, with_columns: bool,
            prec: str, config: TileConfig | None):
    flags = dict(WITH_COLUMNS=bool(with_columns), INPUT_PRECISION=prec,
                 DOT_UPCAST=dot_upcast(dtype))
    if config is None:
        kernel = _autotuned(kind, tuple(autotune_configs(dtype, D, prec)))
        kernel[lambda meta: grid_fn(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **flags)
        return
    kernel = _contrastive_stats_kernel if kind == "stats" else _contrastive_grad_block_kernel
    kernel[grid_fn(config.BLOCK_M, config.BLOCK_N)](
        *args, **flags, BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N,
        BLOCK_K=config.BLOCK_K, num_warps=config.num_warps, num_stages=config.num_stages)




def _scale_tensor(scale, device) -> torch.Tensor:
    if not torch.is_tensor(scale):
        # a fill, not torch.tensor(..., device): no host-to-device copy
        scale = torch.full((), float(scale), dtype=torch.float32, device=device)
    return scale.detach().to(device=device, dtype=torch.float32).reshape(())


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _cols_per_split(N: int, M: int, bm: int, max_bn: int, device: torch.device,
                    col_splits: int | None) -> int:
    """Columns per program of the stats kernel (a multiple of every BLOCK_N it may use).

    One program per block of ``bm`` rows leaves most of a GPU idle at moderate N (N = 4096:
    32 programs for 132 SMs), so the columns are split until there are about two programs per
    SM; each split's row statistics are merged afterwards (O(splits * N)). ``col_splits``
    forces the number of splits (tests). Without CUDA (the interpreter): two splits, so the
    merge is always exercised.
    """
    if col_splits is None:
        row_blocks = triton.cdiv(max(N, 1), bm)
        target = 2 * row_blocks
        if device.type == "cuda":
            target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        col_splits = triton.cdiv(target, row_blocks)
    col_splits = max(1, min(int(col_splits), triton.cdiv(max(M, 1), max_bn)))
    return triton.cdiv(triton.cdiv(max(M, 1), col_splits), max_bn) * max_bn


def _merge_row_parts(parts: torch.Tensor, row_lse, row_max, row_sum, pos) -> None:
    """Merge per-split row statistics ``parts [4, splits, N]`` (max, sum of exp(l - max), sum of
    logits, positive logit) into the [N] outputs, in place. O(splits * N), no host sync."""
    m, d, s, p = parts
    row_max.copy_(m.amax(0))
    m_use = torch.where(row_max == _NEG_INF, torch.zeros_like(row_max), row_max)
    total = (d * torch.exp(m - m_use)).sum(0)
    torch.add(m_use, torch.log(total), out=row_lse)
    torch.sum(s, 0, out=row_sum)
    torch.sum(p, 0, out=pos)


FORWARD_MODES = ("one_pass", "two_pass")


def forward_mode() -> str:
    """``MMKERNELS_CONTRASTIVE_FORWARD``: ``one_pass`` (default) or ``two_pass``."""
    mode = os.environ.get("MMKERNELS_CONTRASTIVE_FORWARD", "one_pass")
    if mode not in FORWARD_MODES:
        raise ValueError(f"MMKERNELS_CONTRASTIVE_FORWARD must be one of {FORWARD_MODES}, got {mode!r}")
    return mode


def _stats_two_pass(q, k, scale, targets, **kw):
    """Row statistics from a rows-only launch on (q, k), column statistics from one on (k, q).

    The column pass has no positive logit (targets -1); the loss takes the positives from the
    row pass. Each launch reduces along rows only: no cross-warp column reductions, no lock.
    """
    rows = contrastive_stats_triton(q, k, scale, targets, False, **kw)
    no_target = torch.full((k.shape[0],), -1, dtype=targets.dtype, device=k.device)
    cols = contrastive_stats_triton(k, q, scale, no_target, False, **kw)
    return (*rows[:4], cols[0], cols[1], cols[2])


def contrastive_stats_triton(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor,
                             targets: torch.Tensor, with_columns: bool, *,
                             config: TileConfig | None = None, col_splits: int | None = None):
    """(row_lse, row_max, row_sum, pos, col_lse, col_max, col_sum), all float32.

    ``config`` forces a tile configuration (tests); by default the heuristic
    one, or the autotuner's pick with MMKERNELS_AUTOTUNE=1 on a GPU.
    ``col_splits`` forces how many programs share each block of rows (tests).
    ``MMKERNELS_CONTRASTIVE_FORWARD=two_pass`` computes the column statistics in a second,
    rows-only launch over the transposed problem (twice the products, no column merge) instead
    of the default one pass (see bench/perf_notes.md: which is faster is a GPU measurement).
    """
    if with_columns and forward_mode() == "two_pass":
        return _stats_two_pass(q, k, scale, targets, config=config, col_splits=col_splits)
    check_device(q)
    N, D = q.shape
    M = k.shape[0]
    dev = q.device
    f32 = torch.float32
    with_columns = bool(with_columns)
    scale_t = _scale_tensor(scale, dev)
    prec = input_precision(q.dtype)
    cfg = _resolve_config(q.dtype, D, prec, config)
    min_bm, min_bn, max_bn = _bounds(cfg)

    row_lse = torch.empty(N, dtype=f32, device=dev)
    row_max = torch.empty(N, dtype=f32, device=dev)
    row_sum = torch.empty(N, dtype=f32, device=dev)
    pos = torch.empty(N, dtype=f32, device=dev)
    if with_columns:
        col_max = torch.full((M,), _NEG_INF, dtype=f32, device=dev)
        col_sumexp = torch.zeros(M, dtype=f32, device=dev)
        col_sum = torch.zeros(M, dtype=f32, device=dev)
    cols_per_split = _cols_per_split(N, M, min_bm, max_bn, dev, col_splits)
    n_splits = triton.cdiv(max(M, 1), cols_per_split)
    if with_columns:
        locks = torch.zeros(triton.cdiv(max(M, 1), min_bn), dtype=torch.int32, device=dev)
        # one scratch row of 3 x BLOCK_N floats per program (see the kernel)
        col_tmp = torch.empty(triton.cdiv(max(N, 1), min_bm) * n_splits * 3 * max_bn, dtype=f32,
                              device=dev)
    else:
        # never dereferenced (WITH_COLUMNS is a constexpr); real buffers, not null pointers
        col_max = col_sumexp = col_sum = col_tmp = row_lse
        locks = torch.zeros(1, dtype=torch.int32, device=dev)
    row_part = torch.empty(4 * n_splits * N if n_splits > 1 else 1, dtype=f32, device=dev)

    if N > 0 and M > 0:
        args = (q, k, scale_t, targets,
                row_lse, row_max, row_sum, pos,
                col_max, col_sumexp, col_sum, locks, col_tmp, row_part,
                N, M, D, cols_per_split,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), targets.stride(0))
        _launch("stats", lambda bm, bn: (triton.cdiv(N, bm), n_splits), args, q.dtype, D,
                with_columns, prec, cfg)
        if n_splits > 1:
            _merge_row_parts(row_part.view(4, n_splits, N), row_lse, row_max, row_sum, pos)
    elif N > 0:  # M == 0: log-sum-exp of nothing
        row_lse.fill_(_NEG_INF)
        row_max.fill_(_NEG_INF)
        row_sum.zero_()
        pos.zero_()

    if not with_columns:
        return (row_lse, row_max, row_sum, pos, torch.empty(0, dtype=f32, device=dev),
                torch.empty(0, dtype=f32, device=dev), torch.empty(0, dtype=f32, device=dev))
    finite_max = torch.where(col_max == _NEG_INF, torch.zeros_like(col_max), col_max)
    col_lse = finite_max + torch.log(col_sumexp)
    return row_lse, row_max, row_sum, pos, col_lse, col_max, col_sum


_MM_F32_MODE: dict[str, str] = {}  # "device/dtype" -> mode of _addmm_f32


def _mm_f32_mode(device: torch.device, dtype: torch.dtype) -> str:
    """How to get an fp32 result from a 16-bit GEMM on this device (probed once).

    The probe only checks that the call dispatches (no result is read back:
    no host synchronisation, so it is safe under sync-debug mode and inside
    CUDA-graph capture).
    """
    key = f"{device}/{dtype}"
    if key in _MM_F32_MODE:
        return _MM_F32_MODE[key]
    mode = "upcast"  # CPU (interpreter tests): small, exact enough
    if dtype == torch.float32:
        mode = "fp32"
    elif device.type == "cuda":
        # without out_dtype: bf16 results rounded once per chunk are fine; fp16
        # results of a rescaled G (see _fp16_g_multiplier) could overflow: upcast
        mode = "round" if dtype == torch.bfloat16 else "upcast"
        a = torch.zeros(16, 16, dtype=dtype, device=device)
        try:
            if torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32:
                mode = "mm_out_dtype"
        except Exception:  # a torch without mm(..., out_dtype=)
            pass
    _MM_F32_MODE[key] = mode
    return mode


def _addmm_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mode: str):
    """acc (fp32) += a @ b, a and b in the input dtype."""
    if mode == "fp32":
        acc.addmm_(a, b)
    elif mode == "mm_out_dtype":
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    elif mode == "upcast":  # CPU (interpreter tests), or fp16 on a torch without out_dtype
        acc.addmm_(a.float(), b.float())
    else:  # CUDA without out_dtype: fp32 accumulation inside cuBLAS, rounded once per chunk
        acc.add_(torch.mm(a, b))


def _fp16_g_multiplier(scale_t, g_row_lse, g_row_sum, g_pos, g_col_lse, g_col_sum, dtype):
    """A power of two that maps the largest possible |scale * G| near 2**14 (fp16 only).

    |G[i, j]| <= |g_row_lse[i]| + |g_row_sum[i]| + |g_pos[i]| + |g_col_lse[j]| + |g_col_sum[j]|
    (both softmax factors are <= 1).  A mean-reduced loss over a large batch
    has G ~ 1/N^2, far below fp16's normal range (6e-5): stored unscaled,
    most of the [R, C] block would round to zero or to a few subnormal bits.
    Computed on the device (no host synchronisation).
    """
    one = torch.ones((), dtype=torch.float32, device=scale_t.device)
    if dtype != torch.float16:
        return one
    bound = (g_row_lse.abs() + g_row_sum.abs() + g_pos.abs()).amax()
    if g_col_lse is not None:
        bound = bound + (g_col_lse.abs() + g_col_sum.abs()).amax()
    bound = (bound * scale_t.abs()).clamp_min(1e-30)
    return torch.exp2(torch.floor(torch.log2(2.0 ** 14 / bound)).clamp(-100.0, 100.0))


def contrastive_grads_triton(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor,
                             targets: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor,
                             g_row_lse: torch.Tensor, g_row_sum: torch.Tensor, g_pos: torch.Tensor,
                             g_col_lse: torch.Tensor, g_col_sum: torch.Tensor, *,
                             row_chunk: int | None = None, col_chunk: int | None = None,
                             config: TileConfig | None = None):
    """(dq [N, D] q.dtype, dk [M, D] k.dtype, dscale 0-dim float32).

    G is built in blocks of at most ``row_chunk x col_chunk`` (default
    BWD_ROW_CHUNK x BWD_COL_CHUNK) elements; ``config`` forces the tile
    configuration of the G kernel (tests).
    """
    check_device(q)
    N, D = q.shape
    M = k.shape[0]
    dev = q.device
    f32 = torch.float32
    with_columns = col_lse.numel() > 0
    scale_t = _scale_tensor(scale, dev)
    # incoming gradients are often expanded (stride 0) or strided views: the
    # kernel indexes the [N]/[M] vectors contiguously, so make them so (O(N+M))
    row_lse, g_row_lse, g_row_sum, g_pos = (
        v.to(f32).contiguous() for v in (row_lse, g_row_lse, g_row_sum, g_pos))
    if with_columns:
        col_lse, g_col_lse, g_col_sum = (v.to(f32).contiguous() for v in (col_lse, g_col_lse, g_col_sum))
    R = max(1, min(N, row_chunk or BWD_ROW_CHUNK))
    C = max(1, min(M, col_chunk or BWD_COL_CHUNK))
    dk_acc = torch.zeros(M, D, dtype=f32, device=dev)
    if N == 0 or M == 0:
        return (torch.zeros(N, D, dtype=q.dtype, device=dev), dk_acc.to(k.dtype),
                torch.zeros((), dtype=f32, device=dev))

    prec = input_precision(q.dtype)
    cfg = _resolve_config(q.dtype, D, prec, config)
    min_bm, min_bn, _ = _bounds(cfg)
    mode = _mm_f32_mode(dev, q.dtype)
    dq = torch.empty(N, D, dtype=q.dtype, device=dev)
    g_buf = torch.empty(R, C, dtype=q.dtype, device=dev)  # scale * G, one block at a time
    dq_acc = torch.empty(R, D, dtype=f32, device=dev)
    # one fp32 slot per program of a launch; every launch adds into its slots
    parts = torch.zeros(triton.cdiv(R, min_bm) * triton.cdiv(C, min_bn), dtype=f32, device=dev)
    g_mul = _fp16_g_multiplier(scale_t, g_row_lse, g_row_sum, g_pos,
                               g_col_lse if with_columns else None,
                               g_col_sum if with_columns else None, q.dtype)
    if not with_columns:
        col_lse = g_col_lse = g_col_sum = row_lse  # never read (WITH_COLUMNS is a constexpr)
    for r0 in range(0, N, R):
        r = min(R, N - r0)
        q_r = q[r0:r0 + r]
        dq_r = dq_acc[:r]
        dq_r.zero_()
        for c0 in range(0, M, C):
            c = min(C, M - c0)
            k_c = k[c0:c0 + c]
            g = g_buf[:r, :c]
            cs = slice(c0, c0 + c) if with_columns else slice(0, 1)
            args = (q_r, k_c, scale_t, targets[r0:r0 + r],
                    row_lse[r0:r0 + r], g_row_lse[r0:r0 + r], g_row_sum[r0:r0 + r],
                    g_pos[r0:r0 + r],
                    col_lse[cs], g_col_lse[cs], g_col_sum[cs],
                    g, parts, g_mul,
                    r, c, D, c0,
                    q.stride(0), q.stride(1), k.stride(0), k.stride(1), targets.stride(0),
                    g.stride(0), g.stride(1))
            _launch("grad", lambda bm, bn: (triton.cdiv(r, bm), triton.cdiv(c, bn)), args,
                    q.dtype, D, with_columns, prec, cfg)
            _addmm_f32(dq_r, g, k_c, mode)
            _addmm_f32(dk_acc[c0:c0 + c], g.t(), q_r, mode)
        if q.dtype == torch.float16:
            dq_r.div_(g_mul)
        dq[r0:r0 + r].copy_(dq_r)
    if q.dtype == torch.float16:
        dk_acc.div_(g_mul)
    return dq, dk_acc.to(k.dtype), parts.sum()


# ---------------------------------------------------------------------------
# Compile tier support: the exact specialisation a launch would produce
# ---------------------------------------------------------------------------

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


def compile_specs(kind: str, dtype: torch.dtype, D: int, with_columns: bool,
                  input_precision: str, config: TileConfig):
    """(kernel, signature, constexprs, divisible_by_16) for mmkernels.testing.sm90.

    Describes a launch with contiguous q/k/targets and 16-byte aligned
    buffers, as Triton would specialise it (ints equal to 1 become constexprs,
    ints divisible by 16 get the divisibility hint).  ``D`` is the feature
    size; the other sizes are taken as large multiples of 16.
    """
    ptr = _PTR[dtype]
    big = 4096
    ints: dict[str, int]
    if kind == "stats":
        kernel = _contrastive_stats_kernel
        sig = {
            "q_ptr": ptr, "k_ptr": ptr, "scale_ptr": "*fp32", "tgt_ptr": "*i64",
            "row_lse_ptr": "*fp32", "row_max_ptr": "*fp32", "row_sum_ptr": "*fp32",
            "pos_ptr": "*fp32", "col_max_ptr": "*fp32", "col_sumexp_ptr": "*fp32",
            "col_sum_ptr": "*fp32", "lock_ptr": "*i32", "col_tmp_ptr": "*fp32",
            "row_part_ptr": "*fp32",
        }
        ints = {"N": big, "M": big, "D": D, "cols_per_split": big // 8, "stride_qn": D, "stride_qd": 1,
                "stride_kn": D, "stride_kd": 1, "stride_t": 1}
    elif kind == "grad":
        kernel = _contrastive_grad_block_kernel
        sig = {
            "q_ptr": ptr, "k_ptr": ptr, "scale_ptr": "*fp32", "tgt_ptr": "*i64",
            "row_lse_ptr": "*fp32", "g_row_lse_ptr": "*fp32", "g_row_sum_ptr": "*fp32",
            "g_pos_ptr": "*fp32", "col_lse_ptr": "*fp32", "g_col_lse_ptr": "*fp32",
            "g_col_sum_ptr": "*fp32", "g_out_ptr": ptr, "part_ptr": "*fp32", "g_mul_ptr": "*fp32",
        }
        ints = {"n_rows": BWD_ROW_CHUNK, "n_cols": BWD_COL_CHUNK, "D": D, "col_offset": big,
                "stride_qn": D, "stride_qd": 1, "stride_kn": D, "stride_kd": 1, "stride_t": 1,
                "stride_gm": BWD_COL_CHUNK, "stride_gn": 1}
    else:
        raise ValueError(kind)
    constexprs = {"WITH_COLUMNS": bool(with_columns), "INPUT_PRECISION": input_precision,
                  "DOT_UPCAST": False,
                  "BLOCK_M": config.BLOCK_M, "BLOCK_N": config.BLOCK_N,
                  "BLOCK_K": config.BLOCK_K}
    from ..testing.sm90 import launch_signature
    return (kernel, *launch_signature(sig, ints, constexprs))


KERNEL_KINDS = ("stats", "grad")
