"""Launchers of the contrastive Triton kernels: ``contrastive_stats_triton`` (forward
statistics) and ``contrastive_grads_triton`` (backward), the contract of ``ops.py``."""

from __future__ import annotations

import functools

import torch
import triton

from ..._triton import check_device, dot_upcast, input_precision, sm_count
from .configs import (BWD_COL_CHUNK, BWD_ROW_CHUNK, TileConfig, autotune_configs, block_bounds,
                      forward_mode, resolve_config)
from .jit import grad_kernel, stats_kernel

_NEG_INF = float("-inf")


@functools.lru_cache(maxsize=None)
def _autotuned(kind: str, configs: tuple[TileConfig, ...]):
    base = stats_kernel if kind == "stats" else grad_kernel
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
    """Launch ``kind``'s kernel on ``grid_fn(BLOCK_M, BLOCK_N)`` with ``config`` (None: the
    autotuner over ``autotune_configs``)."""
    flags = dict(WITH_COLUMNS=bool(with_columns), INPUT_PRECISION=prec,
                 DOT_UPCAST=dot_upcast(dtype))
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


def merge_row_parts(parts: torch.Tensor, row_lse, row_max, row_sum, pos) -> None:
    """Merge per-split row statistics ``parts [4, splits, N]`` (max, sum of exp(l - max), sum of
    logits, positive logit) into the [N] outputs, in place. O(splits * N), no host sync."""
    m, d, s, p = parts
    row_max.copy_(m.amax(0))
    m_use = torch.where(row_max == _NEG_INF, torch.zeros_like(row_max), row_max)
    total = (d * torch.exp(m - m_use)).sum(0)
    torch.add(m_use, torch.log(total), out=row_lse)
    torch.sum(s, 0, out=row_sum)
    torch.sum(p, 0, out=pos)


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
    """Statistics of ``L = scale * q @ k^T``: ``(row_lse, row_max, row_sum, pos [N], col_lse,
    col_max, col_sum [M] or [0])``, all float32.

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
    if with_columns:
        col_max = torch.full((M,), _NEG_INF, dtype=f32, device=dev)
        col_sumexp = torch.zeros(M, dtype=f32, device=dev)
        col_sum = torch.zeros(M, dtype=f32, device=dev)
    split_cols = cols_per_split(N, M, min_bm, max_bn, dev, col_splits)
    n_splits = triton.cdiv(max(M, 1), split_cols)
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
                N, M, D, split_cols,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), targets.stride(0))
        _launch("stats", lambda bm, bn: (triton.cdiv(N, bm), n_splits), args, q.dtype, D,
                with_columns, prec, cfg)
        if n_splits > 1:
            merge_row_parts(row_part.view(4, n_splits, N), row_lse, row_max, row_sum, pos)
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
    """Gradients ``(dq [N, D] q.dtype, dk [M, D] k.dtype, dscale 0-dim float32)`` for the
    incoming gradients of the statistics (float ``[N]`` row vectors, ``[M]`` or empty ``[0]``
    column vectors; any strides).

    G is built in blocks of at most ``row_chunk x col_chunk`` (default
    BWD_ROW_CHUNK x BWD_COL_CHUNK) elements; ``config`` forces the tiles of the G kernel
    (else see ``configs.resolve_config``).
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
    cfg = resolve_config(q.dtype, D, prec, config, "grad")
    min_bm, min_bn, _ = block_bounds(cfg)
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
