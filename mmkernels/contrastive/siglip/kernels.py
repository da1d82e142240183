"""Triton kernels of the SigLIP sigmoid loss and their launchers (the contract is in ``ops.py``).

``siglip_rows_kernel``: one program per (block of BLOCK_M rows, split of the columns) walks its
column blocks, computes each logit tile with the contrastive K-loop (``_similarity_tile``) and
sums ``softplus(-z * L)`` along the rows; with several splits the partial row sums are added in
a fixed order afterwards. ``siglip_grads_kernel``: the backward in one grid, as the contrastive
``grad_kernel``: dq programs walk the columns, dk programs the rows, every output element has
one owner; each recomputes its logit tiles. ``siglip_sum_kernel`` adds the per-block shares of
``dscale`` and ``dbias``. Offsets are int64; inputs may have any strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _triton  # noqa: F401  (fixes the interpreter before any kernel is defined)
from ..._triton import DTYPES, PTR, check_device, dot_upcast, input_precision
from ..kernels.configs import (SIGLIP_KINDS, TileConfig, _block_k, backward_mode, grad_block_d,
                               resolve_config)
from ..kernels.jit import _fp16_multiplier, _similarity_tile
from ..kernels.launch import _scale_f32, cols_per_split

#: launch kinds (tuning family "contrastive", registered with the contrastive kinds): overrides
#: go through ``tuning.set_config("contrastive", "siglip_rows" | "siglip_grads", ...)``
KINDS = SIGLIP_KINDS
#: elements per step of siglip_sum_kernel, and its warps
SUM_BLOCK = 1024
SUM_NUM_WARPS = 4


# ---------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------


@triton.jit
def _softplus(x):
    """``log(1 + exp(x))`` in fp32 without overflow and accurate where it is tiny:
    ``max(x, 0) + log1p(t)``, ``t = exp(-|x|)`` in (0, 1], with ``log1p(t) = 2 atanh(s)``,
    ``s = t / (2 + t)`` in (0, 1/3]: the series ``2 s (1 + s^2/3 + ... + s^12/13)`` has only
    positive terms (no cancellation) and its truncation stays below fp32's rounding: one
    division and six FMAs."""
    t = tl.exp(-tl.abs(x))
    s = t / (2.0 + t)
    w = s * s
    p = w * (1.0 / 13.0) + (1.0 / 11.0)
    p = p * w + (1.0 / 9.0)
    p = p * w + (1.0 / 7.0)
    p = p * w + (1.0 / 5.0)
    p = p * w + (1.0 / 3.0)
    p = p * w + 1.0
    return tl.maximum(x, 0.0) + 2.0 * s * p


@triton.jit
def _pair_grad(L, is_pos, g):
    """``G = -g * z * sigmoid(-z * L)`` of a logit tile, ``z = +1`` where ``is_pos`` else -1;
    ``g`` broadcasts against ``L``. The sigmoid takes ``exp(-|x|)``, so it never overflows."""
    x = tl.where(is_pos, -L, L)
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    sig = tl.where(x >= 0.0, r, e * r)
    return tl.where(is_pos, -sig, sig) * g


@triton.jit
def siglip_rows_kernel(
    q_ptr, k_ptr, scale_ptr, bias_ptr, tgt_ptr, out_ptr,
    N, M, D, cols_per_split,
    stride_qn, stride_qd, stride_kn, stride_kd, stride_t,
    INPUT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Row sums of ``softplus(-z * L)`` over split ``program_id(1)`` of the columns (grid
    ``(row blocks, splits)``; ``cols_per_split`` is a multiple of BLOCK_N) into
    ``out [splits, N]`` fp32."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    q_rows_ptr = q_ptr + rows64[:, None] * stride_qn
    tgt = tl.load(tgt_ptr + rows64 * stride_t, mask=row_ok, other=-1).to(tl.int32)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M], tl.float32)
    c_lo = split * cols_per_split
    c_hi = tl.minimum(M, c_lo + cols_per_split)
    for n0 in range(c_lo, c_hi, BLOCK_N):
        # masks and target tests against the constant offs_n keep per-element column indices
        # out of registers
        col_ok = offs_n < M - n0
        k_cols_ptr = k_ptr + (n0 + offs_n).to(tl.int64)[:, None] * stride_kn
        S = _similarity_tile(q_rows_ptr, k_cols_ptr, row_ok, col_ok, D, stride_qd, stride_kd,
                             INPUT_PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        L = S * scale + bias
        is_pos = offs_n[None, :] == (tgt - n0)[:, None]
        sp = _softplus(tl.where(is_pos, -L, L))
        acc += tl.sum(tl.where(col_ok[None, :], sp, 0.0), 1)
    tl.store(out_ptr + split.to(tl.int64) * N + rows64, acc, mask=row_ok)


@triton.jit
def siglip_grads_kernel(
    q_ptr, k_ptr, scale_ptr, bias_ptr, tgt_ptr, g_ptr,
    dq_ptr, dk_ptr, part_ptr,
    N, M, D, n_dq_progs, n_d_chunks, n_row_blocks,
    stride_qn, stride_qd, stride_kn, stride_kd, stride_t, stride_g,
    stride_dqn, stride_dkn,
    INPUT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    FP16_RESCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The backward in one grid: the first ``n_dq_progs`` programs each own BLOCK_M rows of q
    and BLOCK_D of its features, walk every block of BLOCK_N columns (recomputing the logits,
    K-loop over D), form G and accumulate ``G @ k[:, chunk]`` in fp32; those of the first
    feature chunk also write their rows' ``sum(G * S)`` and ``sum(G)`` to ``part [2,
    n_row_blocks]``. The other programs do the same for BLOCK_M rows of k over blocks of
    BLOCK_N rows of q (``G.T``), writing ``dk``. ``FP16_RESCALE``: ``scale * G`` is multiplied
    by a power of two per output row before its fp16 product (``|G| <= |g|``), so that it stays
    out of fp16's subnormal range, and the fp32 result divided by it.
    """
    pid = tl.program_id(0)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    offs_o = tl.arange(0, BLOCK_N)
    if pid < n_dq_progs:
        rb = pid // n_d_chunks
        d0 = (pid % n_d_chunks) * BLOCK_D
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        q_rows_ptr = q_ptr + rows64[:, None] * stride_qn
        tgt = tl.load(tgt_ptr + rows64 * stride_t, mask=row_ok, other=-1).to(tl.int32)
        g = tl.load(g_ptr + rows64 * stride_g, mask=row_ok, other=0.0).to(tl.float32)
        mul = tl.full([BLOCK_M], 1.0, tl.float32)
        if FP16_RESCALE:
            mul = _fp16_multiplier(tl.abs(g), scale)
        dd = d0 + offs_d
        d_ok = dd < D
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        ds = tl.zeros([BLOCK_M], tl.float32)
        db = tl.zeros([BLOCK_M], tl.float32)
        for c0 in range(0, M, BLOCK_N):
            col_ok = offs_o < M - c0
            k_cols_ptr = k_ptr + (c0 + offs_o).to(tl.int64)[:, None] * stride_kn
            S = _similarity_tile(q_rows_ptr, k_cols_ptr, row_ok, col_ok, D, stride_qd, stride_kd,
                                 INPUT_PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
            is_pos = offs_o[None, :] == (tgt - c0)[:, None]
            G = _pair_grad(S * scale + bias, is_pos, g[:, None])
            G = tl.where(row_ok[:, None] & col_ok[None, :], G, 0.0)
            ds += tl.sum(G * S, 1)
            db += tl.sum(G, 1)
            kc = tl.load(k_cols_ptr + dd.to(tl.int64)[None, :] * stride_kd,
                         mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            gs = G * (scale * mul)[:, None]
            if DOT_UPCAST:
                kc = kc.to(tl.float32)
            else:
                gs = gs.to(kc.dtype)
            acc = tl.dot(gs, kc, acc, input_precision=INPUT_PRECISION)
        out = acc / mul[:, None]
        tl.store(dq_ptr + rows64[:, None] * stride_dqn + dd.to(tl.int64)[None, :],
                 out.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        if d0 == 0:
            tl.store(part_ptr + rb, tl.sum(ds, 0))
            tl.store(part_ptr + n_row_blocks + rb, tl.sum(db, 0))
    else:
        p = pid - n_dq_progs
        cb = p // n_d_chunks
        d0 = (p % n_d_chunks) * BLOCK_D
        cols = cb * BLOCK_M + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        cols64 = cols.to(tl.int64)
        k_rows_ptr = k_ptr + cols64[:, None] * stride_kn
        mul = tl.full([BLOCK_M], 1.0, tl.float32)
        if FP16_RESCALE:
            # one multiplier for every row of q this program reduces over
            gmax = tl.zeros([BLOCK_N], tl.float32)
            for r0 in range(0, N, BLOCK_N):
                r_ok = offs_o < N - r0
                gr = tl.load(g_ptr + (r0 + offs_o).to(tl.int64) * stride_g, mask=r_ok, other=0.0)
                gmax = tl.maximum(gmax, tl.abs(gr.to(tl.float32)))
            mul = _fp16_multiplier(mul * tl.max(gmax, 0), scale)
        dd = d0 + offs_d
        d_ok = dd < D
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for r0 in range(0, N, BLOCK_N):
            row_ok = offs_o < N - r0
            rows64 = (r0 + offs_o).to(tl.int64)
            q_rows_ptr = q_ptr + rows64[:, None] * stride_qn
            # the transposed tile: St[j, i] = k_j . q_i
            St = _similarity_tile(k_rows_ptr, q_rows_ptr, col_ok, row_ok, D, stride_kd, stride_qd,
                                  INPUT_PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
            tgt = tl.load(tgt_ptr + rows64 * stride_t, mask=row_ok, other=-1).to(tl.int32)
            g = tl.load(g_ptr + rows64 * stride_g, mask=row_ok, other=0.0).to(tl.float32)
            is_pos = cols[:, None] == tgt[None, :]
            G = _pair_grad(St * scale + bias, is_pos, g[None, :])
            G = tl.where(col_ok[:, None] & row_ok[None, :], G, 0.0)
            qc = tl.load(q_rows_ptr + dd.to(tl.int64)[None, :] * stride_qd,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            gs = G * (scale * mul)[:, None]
            if DOT_UPCAST:
                qc = qc.to(tl.float32)
            else:
                gs = gs.to(qc.dtype)
            acc = tl.dot(gs, qc, acc, input_precision=INPUT_PRECISION)
        out = acc / mul[:, None]
        tl.store(dk_ptr + cols64[:, None] * stride_dkn + dd.to(tl.int64)[None, :],
                 out.to(dk_ptr.dtype.element_ty), mask=col_ok[:, None] & d_ok[None, :])


@triton.jit
def siglip_sum_kernel(part_ptr, dscale_ptr, dbias_ptr, n, BLOCK: tl.constexpr):
    """One program: ``dscale = sum(part[0, :n])``, ``dbias = sum(part[1, :n])`` in a fixed
    order (two outputs of their own: the op's results may not share storage)."""
    offs0 = tl.arange(0, BLOCK)
    a = tl.zeros([BLOCK], tl.float32)
    b = tl.zeros([BLOCK], tl.float32)
    for i0 in range(0, n, BLOCK):
        offs = i0 + offs0
        ok = offs < n
        a += tl.load(part_ptr + offs, mask=ok, other=0.0)
        b += tl.load(part_ptr + n + offs, mask=ok, other=0.0)
    tl.store(dscale_ptr, tl.sum(a, 0))
    tl.store(dbias_ptr, tl.sum(b, 0))


# ---------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------


def rows_config(dtype: torch.dtype, D: int, input_precision: str) -> TileConfig:
    """The tiles of ``siglip_rows_kernel`` without an explicit config or override.

    The contrastive statistics kernel's 128 x 64 tiles with 8 warps where D is a multiple of
    16; where it is not (no vector loads: the tiles pass through registers) BLOCK_K 32, and
    64-row tiles for fp32 on tf32; exact fp32 (FMA units) 64 x 64 x 16 with 8 warps. Each
    compiles for sm_90a without spills with Triton 3.6 and 3.9
    (tests/contrastive/test_siglip_sm90.py).
    """
    bk = _block_k(dtype, D, input_precision)
    if dtype == torch.float32 and input_precision == "ieee":
        return TileConfig(64, 64, 16, 8, 3)
    if D % 16:
        return TileConfig(64 if dtype == torch.float32 else 128, 64, min(32, bk), 8, 3)
    return TileConfig(128, 64, bk, 8, 3)


def grads_config(dtype: torch.dtype, D: int, input_precision: str) -> TileConfig:
    """The tiles of ``siglip_grads_kernel`` without an explicit config or override: 64 output
    rows against 32 rows of the other side per step with 8 warps, so that ``grad_block_d``
    gives 64 features per program (half the logit recomputation of 4 warps); exact fp32
    32 x 64 x 16 (128 features per program). No spills on sm_90a with Triton 3.6 and 3.9."""
    if dtype == torch.float32 and input_precision == "ieee":
        return TileConfig(32, 64, 16, 8, 2)
    return TileConfig(64, 32, min(32, _block_k(dtype, D, input_precision)), 8, 2)


def candidate_configs(kind: str, dtype: torch.dtype, D: int, input_precision: str
                      ) -> list[TileConfig]:
    """Every configuration a ``kind`` launch picks by itself for (dtype, D, precision)."""
    if kind == "siglip_rows":
        return [rows_config(dtype, D, input_precision)]
    if kind == "siglip_grads":
        return [grads_config(dtype, D, input_precision)]
    raise ValueError(f"siglip: unknown kernel kind {kind!r}")


# ---------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------


def _check_inputs(q: torch.Tensor, k: torch.Tensor) -> None:
    check_device(q)
    if q.dtype not in DTYPES or k.dtype != q.dtype:
        raise TypeError("siglip triton backend: q and k must share one of float32, bfloat16, "
                        f"float16 (got {q.dtype} and {k.dtype})")


def _bias_f32(bias, device: torch.device) -> torch.Tensor:
    return _scale_f32(0.0 if bias is None else bias, device)


def siglip_rows_triton(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                       targets: torch.Tensor, *, config: TileConfig | None = None,
                       col_splits: int | None = None) -> torch.Tensor:
    """``row_loss [N]`` float32: ``sum_j softplus(-z_ij * (scale * q_i . k_j + bias))``.

    ``q [N, D]``, ``k [M, D]`` float32/bfloat16/float16 (any strides), ``scale`` / ``bias``
    floats or one-element tensors (``bias`` None: 0), ``targets [N]`` int64 in ``[-1, M)``.
    ``config`` forces the tiles (else an override of kind ``contrastive/siglip_rows``, else
    :func:`rows_config`); ``col_splits`` forces how many programs share each block of rows
    (see ``cols_per_split``: about two programs per SM on a GPU). One launch, plus one sum of
    the partial rows in a fixed order when the columns are split.
    """
    _check_inputs(q, k)
    N, D = q.shape
    M = k.shape[0]
    dev = q.device
    if N == 0 or M == 0:
        return torch.zeros(N, dtype=torch.float32, device=dev)
    prec = input_precision(q.dtype)
    cfg = resolve_config(q.dtype, D, prec, config, "siglip_rows", heuristic=rows_config)
    split_cols = cols_per_split(N, M, cfg.BLOCK_M, cfg.BLOCK_N, dev, col_splits)
    n_splits = triton.cdiv(M, split_cols)
    part = torch.empty(n_splits, N, dtype=torch.float32, device=dev)
    siglip_rows_kernel[(triton.cdiv(N, cfg.BLOCK_M), n_splits)](
        q, k, _scale_f32(scale, dev), _bias_f32(bias, dev), targets, part,
        N, M, D, split_cols,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), targets.stride(0),
        INPUT_PRECISION=prec, DOT_UPCAST=dot_upcast(q.dtype),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return part[0] if n_splits == 1 else part.sum(0)


def siglip_grads_triton(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                        targets: torch.Tensor, g_row: torch.Tensor, *,
                        config: TileConfig | None = None):
    """``(dq [N, D] q.dtype, dk [M, D] k.dtype, dscale [], dbias [] float32)`` for the incoming
    gradient ``g_row [N]`` of the row losses (any float dtype and stride).

    One ``siglip_grads_kernel`` launch (dq and dk programs in one grid) and one
    ``siglip_sum_kernel`` launch for dscale and dbias. ``config`` forces the tiles (else an
    override of kind ``contrastive/siglip_grads``, else :func:`grads_config`); the features
    are split in chunks of ``grad_block_d(D, config)``, each recomputing its logits.
    """
    _check_inputs(q, k)
    N, D = q.shape
    M = k.shape[0]
    dev = q.device
    f32 = torch.float32
    dq = torch.empty(N, D, dtype=q.dtype, device=dev)
    dk = torch.empty(M, D, dtype=k.dtype, device=dev)
    dscale = torch.empty((), dtype=f32, device=dev)
    dbias = torch.empty((), dtype=f32, device=dev)
    if N == 0 or M == 0:
        return dq.zero_(), dk.zero_(), dscale.zero_(), dbias.zero_()
    prec = input_precision(q.dtype)
    cfg = resolve_config(q.dtype, D, prec, config, "siglip_grads", heuristic=grads_config)
    bd = grad_block_d(D, cfg)
    if config is None and backward_mode(D, bd) == "blocks":
        # wide features: the one grid would recompute every logit once per feature chunk; row
        # blocks of GEMMs do the products once (the option contrastive.backward decides)
        from .paths import blockwise_siglip_grads
        return blockwise_siglip_grads(q, k, _scale_f32(scale, dev), _bias_f32(bias, dev), targets,
                                      g_row, exact=True)
    n_dc = max(1, triton.cdiv(D, bd))  # D = 0 still needs the programs for dbias
    n_rb = triton.cdiv(N, cfg.BLOCK_M)
    n_cb = triton.cdiv(M, cfg.BLOCK_M)
    part = torch.empty(2, n_rb, dtype=f32, device=dev)
    if g_row.dtype != f32:
        g_row = g_row.to(f32)
    siglip_grads_kernel[((n_rb + n_cb) * n_dc,)](
        q, k, _scale_f32(scale, dev), _bias_f32(bias, dev), targets, g_row, dq, dk, part,
        N, M, D, n_rb * n_dc, n_dc, n_rb,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), targets.stride(0), g_row.stride(0),
        dq.stride(0), dk.stride(0),
        INPUT_PRECISION=prec, DOT_UPCAST=dot_upcast(q.dtype),
        FP16_RESCALE=q.dtype == torch.float16,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, BLOCK_D=bd,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    siglip_sum_kernel[(1,)](part, dscale, dbias, n_rb, BLOCK=SUM_BLOCK, num_warps=SUM_NUM_WARPS)
    return dq, dk, dscale, dbias


def siglip_fwd_bwd_triton(q: torch.Tensor, k: torch.Tensor, scale, bias, targets: torch.Tensor):
    """``(row_loss, dq, dk, dscale, dbias)`` for ``g_row = 1`` (``ops.siglip_fused``): the forward
    kernel then the one-grid backward; for wide features (where the backward would take the
    blockwise GEMMs anyway) one blockwise pass computes the losses and gradients from the same
    products."""
    _check_inputs(q, k)
    N, D = q.shape
    dev = q.device
    prec = input_precision(q.dtype)
    cfg = resolve_config(q.dtype, D, prec, None, "siglip_grads", heuristic=grads_config)
    if N > 0 and k.shape[0] > 0 and backward_mode(D, grad_block_d(D, cfg)) == "blocks":
        from .paths import blockwise_siglip_fwd_bwd
        return blockwise_siglip_fwd_bwd(q, k, _scale_f32(scale, dev), _bias_f32(bias, dev),
                                        targets, exact=True)
    rows = siglip_rows_triton(q, k, scale, bias, targets)
    return (rows, *siglip_grads_triton(q, k, scale, bias, targets, torch.ones_like(rows)))


# ---------------------------------------------------------------------------
# the sm_90 compile tier's view
# ---------------------------------------------------------------------------


def compile_specs(kind: str, dtype: torch.dtype = torch.float32, D: int = 64,
                  input_precision: str = "tf32", config: TileConfig | None = None):
    """``(kernel, signature, constexprs, divisible_by_16)`` of a launch of ``kind``
    (``"siglip_rows"``, ``"siglip_grads"`` or ``"siglip_sum"``, the last taking none of the
    other arguments) for mmkernels.testing.sm90: contiguous inputs, 16-byte aligned buffers,
    the sizes other than ``D`` large multiples of 16, as Triton would specialise them."""
    from ...testing.sm90 import launch_signature
    big = 4096
    if kind == "siglip_sum":
        return (siglip_sum_kernel, *launch_signature(
            {"part_ptr": "*fp32", "dscale_ptr": "*fp32", "dbias_ptr": "*fp32"}, {"n": big // 64},
            {"BLOCK": SUM_BLOCK}))
    ptr = PTR[dtype]
    common = {"q_ptr": ptr, "k_ptr": ptr, "scale_ptr": "*fp32", "bias_ptr": "*fp32",
              "tgt_ptr": "*i64"}
    strides = {"stride_qn": D, "stride_qd": 1, "stride_kn": D, "stride_kd": 1, "stride_t": 1}
    constexprs = {"INPUT_PRECISION": input_precision, "DOT_UPCAST": False,
                  "BLOCK_M": config.BLOCK_M, "BLOCK_N": config.BLOCK_N,
                  "BLOCK_K": config.BLOCK_K}
    if kind == "siglip_rows":
        kernel = siglip_rows_kernel
        sig = {**common, "out_ptr": "*fp32"}
        ints = {"N": big, "M": big, "D": D, "cols_per_split": big // 8, **strides}
    elif kind == "siglip_grads":
        kernel = siglip_grads_kernel
        sig = {**common, "g_ptr": "*fp32", "dq_ptr": ptr, "dk_ptr": ptr, "part_ptr": "*fp32"}
        bd = grad_block_d(D, config)
        n_dc = -(-D // bd)
        n_rb = big // config.BLOCK_M
        ints = {"N": big, "M": big, "D": D, "n_dq_progs": n_rb * n_dc, "n_d_chunks": n_dc,
                "n_row_blocks": n_rb, **strides, "stride_g": 1, "stride_dqn": D, "stride_dkn": D}
        constexprs.update(FP16_RESCALE=dtype == torch.float16, BLOCK_D=bd)
    else:
        raise ValueError(f"siglip: unknown kernel kind {kind!r}")
    return (kernel, *launch_signature(sig, ints, constexprs))


__all__ = [
    "KINDS", "candidate_configs", "compile_specs", "grads_config", "rows_config",
    "siglip_grads_kernel", "siglip_grads_triton", "siglip_rows_kernel", "siglip_rows_triton",
    "siglip_sum_kernel",
]
