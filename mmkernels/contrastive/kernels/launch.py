"""Launchers of the contrastive Triton kernels: ``contrastive_stats_triton`` (forward
statistics) and ``contrastive_grads_triton`` (backward), the contract of ``ops.py``.

Launch budget: the forward is one zero fill, ``stats_kernel`` and ``finalize_kernel``; the
backward ``grad_kernel`` and one sum of its per-block ``dscale`` shares, at every N.
"""

from __future__ import annotations

import functools

import torch
import triton

from ..._triton import check_device, dot_upcast, input_precision, sm_count
from .configs import (FINALIZE_BLOCK, TileConfig, autotune_configs, backward_mode, block_bounds,
                      forward_mode, grad_block_d, resolve_config)
from .jit import finalize_kernel, grad_kernel, stats_kernel

_NEG_INF = float("-inf")


@functools.lru_cache(maxsize=None)
def _autotuned(kind: str, configs: tuple[TileConfig, ...]):
    base = stats_kernel if kind == "stats" else grad_kernel
    # buffers a trial run modifies in place (everything else is overwritten)
    restore = (["col_max_ptr", "col_sumexp_ptr", "col_sum_ptr", "lock_ptr"] if kind == "stats"
               else [])
    tconfigs = [
        triton.Config({"BLOCK_M": c.BLOCK_M, "BLOCK_N": c.BLOCK_N, "BLOCK_K": c.BLOCK_K},
                      num_warps=c.num_warps, num_stages=c.num_stages)
        for c in configs
    ]
    return triton.autotune(configs=tconfigs, key=["D", "WITH_COLUMNS", "INPUT_PRECISION"],
                           restore_value=restore)(base)


def _launch(kind: str, grid_fn, args: tuple, dtype: torch.dtype, D: int, with_columns: bool,
            prec: str, config: TileConfig | None, **extra):
    """Launch ``kind``'s kernel on ``grid_fn(BLOCK_M, BLOCK_N)`` with ``config`` (None: the
    autotuner over ``autotune_configs``); ``extra``: further constexprs."""
    flags = dict(WITH_COLUMNS=bool(with_columns), INPUT_PRECISION=prec,
                 DOT_UPCAST=dot_upcast(dtype), **extra)
    if config is None:
        kernel = _autotuned(kind, tuple(autotune_configs(dtype, D, prec)))
        kernel[lambda meta: grid_fn(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **flags)
        return
    kernel = stats_kernel if kind == "stats" else grad_kernel
    kernel[grid_fn(config.BLOCK_M, config.BLOCK_N)](
        *args, **flags, BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N,
        BLOCK_K=config.BLOCK_K, num_warps=config.num_warps, num_stages=config.num_stages)


def _scale_f32(scale, device: torch.device) -> torch.Tensor:
    """The kernels' scale: ``scale`` (a float, or a one-element tensor) as a detached 0-dim
    float32 tensor on ``device``. Autograd is the op's business (ops.py), not the launcher's."""
    if not torch.is_tensor(scale):
        # a fill, not torch.tensor(..., device): no host-to-device copy
        scale = torch.full((), float(scale), dtype=torch.float32, device=device)
    return scale.detach().to(device=device, dtype=torch.float32).reshape(())


def cols_per_split(N: int, M: int, bm: int, max_bn: int, device: torch.device,
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
            target = 2 * sm_count(device)
        col_splits = triton.cdiv(target, row_blocks)
    col_splits = max(1, min(int(col_splits), triton.cdiv(max(M, 1), max_bn)))
    return triton.cdiv(triton.cdiv(max(M, 1), col_splits), max_bn) * max_bn


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
    """Statistics of ``L = scale * q @ k^T``: ``(row_logsum, row_max, row_ssum, pos [N],
    col_logsum, col_max, col_ssum [M] or [0])``, all float32, as ``ops.contrastive_stats``
    defines them (log-sum and sum relative to the max).

    ``q [N, D]``, ``k [M, D]`` float32/bfloat16/float16 (any strides), ``scale`` a float or a
    one-element tensor, ``targets [N]`` int64. ``config`` forces the tiles (else see
    ``configs.resolve_config``); ``col_splits`` forces how many programs share each block of
    rows. With the option ``contrastive.forward`` set to ``"two_pass"`` the column statistics
    come from a second, rows-only launch over the transposed problem (twice the products, no
    column merge; which is faster is a GPU measurement, see bench/perf_notes.md).
    """
    if with_columns and forward_mode() == "two_pass":
        return _stats_two_pass(q, k, scale, targets, config=config, col_splits=col_splits)
    check_device(q)
    N, D = q.shape
    M = k.shape[0]
    dev = q.device
    f32 = torch.float32
    with_columns = bool(with_columns)
    scale_t = _scale_f32(scale, dev)
    prec = input_precision(q.dtype)
    cfg = resolve_config(q.dtype, D, prec, config, "stats")
    min_bm, min_bn, max_bn = block_bounds(cfg)

    row_lse = torch.empty(N, dtype=f32, device=dev)
    row_max = torch.empty(N, dtype=f32, device=dev)
    row_sum = torch.empty(N, dtype=f32, device=dev)
    pos = torch.empty(N, dtype=f32, device=dev)
    split_cols = cols_per_split(N, M, min_bm, max_bn, dev, col_splits)
    n_splits = triton.cdiv(max(M, 1), split_cols)
    if with_columns:
        # one zero fill for the column buffers [3, M] (max, sum-exp, sum) and the locks
        n_locks = triton.cdiv(max(M, 1), min_bn)
        col_buf = torch.zeros(3 * M + n_locks, dtype=f32, device=dev)
        col_max_b, col_sumexp, col_sum_b = col_buf[:M], col_buf[M:2 * M], col_buf[2 * M:3 * M]
        locks = col_buf[3 * M:].view(torch.int32)
        # one scratch row of 3 x BLOCK_N floats per program (see the kernel)
        col_tmp = torch.empty(triton.cdiv(max(N, 1), min_bm) * n_splits * 3 * max_bn, dtype=f32,
                              device=dev)
    else:
        # never dereferenced (WITH_COLUMNS is a constexpr); real buffers, not null pointers
        col_buf = col_max_b = col_sumexp = col_sum_b = col_tmp = row_lse
        locks = row_lse.view(torch.int32)
    row_part = torch.empty(4 * n_splits * N if n_splits > 1 else 1, dtype=f32, device=dev)
    col_lse = torch.empty(M if with_columns else 0, dtype=f32, device=dev)
    col_max = torch.empty(M if with_columns else 0, dtype=f32, device=dev)
    col_sum = torch.empty(M if with_columns else 0, dtype=f32, device=dev)

    if N > 0 and M > 0:
        args = (q, k, scale_t, targets,
                row_lse, row_max, row_sum, pos,
                col_max_b, col_sumexp, col_sum_b, locks, col_tmp, row_part,
                N, M, D, split_cols,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), targets.stride(0))
        _launch("stats", lambda bm, bn: (triton.cdiv(N, bm), n_splits), args, q.dtype, D,
                with_columns, prec, cfg)
        merge_rows = n_splits > 1
        if merge_rows or with_columns:
            span = max(N if merge_rows else 0, M if with_columns else 0)
            finalize_kernel[(triton.cdiv(span, FINALIZE_BLOCK),)](
                row_part, row_lse, row_max, row_sum, pos, col_buf, col_lse, col_max, col_sum,
                N, M, n_splits, split_cols, MERGE_ROWS=merge_rows, WITH_COLUMNS=with_columns,
                BLOCK=FINALIZE_BLOCK)
    elif N > 0:  # M == 0: log-sum-exp of nothing (relative to a shift of 0)
        row_lse.fill_(_NEG_INF)
        row_max.fill_(_NEG_INF)
        row_sum.zero_()
        pos.zero_()
    elif with_columns and M > 0:  # N == 0: columns of nothing
        col_lse.fill_(_NEG_INF)
        col_max.fill_(_NEG_INF)
        col_sum.zero_()

    return row_lse, row_max, row_sum, pos, col_lse, col_max, col_sum


def contrastive_grads_triton(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor,
                             targets: torch.Tensor, row_max: torch.Tensor, row_lse: torch.Tensor,
                             col_max: torch.Tensor, col_lse: torch.Tensor,
                             g_row_lse: torch.Tensor, g_row_sum: torch.Tensor, g_pos: torch.Tensor,
                             g_col_lse: torch.Tensor, g_col_sum: torch.Tensor, *,
                             config: TileConfig | None = None):
    """Gradients ``(dq [N, D] q.dtype, dk [M, D] k.dtype, dscale 0-dim float32)`` for the
    incoming gradients of the statistics (float ``[N]`` row vectors, ``[M]`` or empty ``[0]``
    column vectors; any strides); ``row_max``/``row_lse`` (``col_*``): the forward's maxima and
    log-sums relative to them.

    One ``grad_kernel`` launch (dq and dk programs in one grid) and one sum of the per-block
    shares of ``dscale``; ``config`` forces the tiles (else see ``configs.resolve_config``).
    """
    check_device(q)
    N, D = q.shape
    M = k.shape[0]
    dev = q.device
    f32 = torch.float32
    with_columns = col_lse.numel() > 0
    scale_t = _scale_f32(scale, dev)
    # incoming gradients are often expanded (stride 0) or strided views: the
    # kernel indexes the [N]/[M] vectors contiguously, so make them so (O(N+M))
    row_max, row_lse, g_row_lse, g_row_sum, g_pos = (
        v.to(f32).contiguous() for v in (row_max, row_lse, g_row_lse, g_row_sum, g_pos))
    if with_columns:
        col_max, col_lse, g_col_lse, g_col_sum = (
            v.to(f32).contiguous() for v in (col_max, col_lse, g_col_lse, g_col_sum))
    dq = torch.empty(N, D, dtype=q.dtype, device=dev)
    dk = torch.empty(M, D, dtype=k.dtype, device=dev)
    if N == 0 or M == 0 or D == 0:
        return dq.zero_(), dk.zero_(), torch.zeros((), dtype=f32, device=dev)

    prec = input_precision(q.dtype)
    cfg = resolve_config(q.dtype, D, prec, config, "grad")
    bd = grad_block_d(D, cfg)
    if backward_mode(D, bd) == "blocks":
        # wide features: one grid would recompute every logit once per feature chunk; cuBLAS
        # over row blocks does the 6 N M D FLOPs once (launches: 6 per block)
        from ..paths import blockwise_grads
        return blockwise_grads(q, k, scale_t, targets, row_max, row_lse, col_max, col_lse,
                               g_row_lse, g_row_sum, g_pos, g_col_lse, g_col_sum, arith="triton")
    n_dc = triton.cdiv(D, bd)
    n_rb = triton.cdiv(N, cfg.BLOCK_M)
    n_cb = triton.cdiv(M, cfg.BLOCK_M)
    ds_part = torch.empty(n_rb, dtype=f32, device=dev)
    if not with_columns:
        col_max = col_lse = g_col_lse = g_col_sum = row_lse  # never read (WITH_COLUMNS: constexpr)
    args = (q, k, scale_t, targets, row_max, row_lse, g_row_lse, g_row_sum, g_pos,
            col_max, col_lse, g_col_lse, g_col_sum, dq, dk, ds_part,
            N, M, D, n_rb * n_dc, n_dc,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), targets.stride(0),
            dq.stride(0), dk.stride(0))
    _launch("grad", lambda bm, bn: ((n_rb + n_cb) * n_dc,), args, q.dtype, D, with_columns,
            prec, cfg, FP16_RESCALE=q.dtype == torch.float16, BLOCK_D=bd)
    return dq, dk, ds_part.sum()
