"""Triton launchers of the grouped GEMM (contract: ``ops.py``): ``linear_fwd_triton``,
``linear_bwd_triton``, ``ffn_fwd_triton``, ``ffn_bwd_triton``. Tiles come from ``configs``
(explicit ``config=``, else a :mod:`mmkernels.tuning` override, else the heuristic).
Accumulation is fp32.
"""
from __future__ import annotations

import torch
import triton

from ...._triton import dot_upcast, input_precision
from ...routing_kernels import align_of, check_launch, empty_of
from .configs import (ACT_CODES, ACT_NONE, ACT_SWIGLU, ACTIVATIONS, MM_FLAGS, MM_GROUP_M, MM_KINDS,
                      WGRAD_FLAGS, WGRAD_KINDS, launch_options, mm_output_columns, pick_config,
                      wgrad_chunk)
from .jit_mm import grouped_mm_kernel
from .jit_wgrad import grouped_wgrad_kernel


def launch_grouped_mm(kind, a, weight, w_strides, bias, out, h, perm, offsets, N, K, act, *, config=None):
    """One launch of ``grouped_mm_kernel`` for ``kind`` (of ``MM_KINDS``): ``out`` (and ``h``) from
    ``a [T, K]`` and the expert weights ``weight``, whose B operand has ``w_strides`` =
    (stride_e, stride_k, stride_n); ``N`` output columns, activation code ``act``."""
    gather, scatter, store_h, act_bwd, b_trans = MM_FLAGS[kind]
    E = offsets.numel() - 1
    T = a.shape[0]
    dtype = a.dtype
    prec = input_precision(dtype)
    has_bias = bias is not None
    bias_t = bias if has_bias else out
    bias_st = (bias.stride(0), bias.stride(1)) if has_bias else (0, 0)
    h_t = h if h is not None else out
    h_st = (h.stride(0), h.stride(1)) if h is not None else (0, 0)
    sbe, sbk, sbn = w_strides
    # N, K and the row strides go in divided by ALIGN (the kernel multiplies back)
    al = align_of(N, K, a.stride(0), sbe, sbn if b_trans else sbk, bias_st[0], out.stride(0),
                  h_st[0])
    cfg = pick_config(kind, dtype, prec, act == ACT_SWIGLU, N, al, config)
    if b_trans:
        sbn //= al
    else:
        sbk //= al
    out_n = mm_output_columns(cfg, act, act_bwd)
    grid = ((triton.cdiv(T, cfg.BLOCK_M) + E) * triton.cdiv(N, out_n),)
    grouped_mm_kernel[grid](
        a, weight, bias_t, out, h_t, perm, offsets, N // al, K // al,
        a.stride(0) // al, a.stride(1), sbe // al, sbk, sbn, bias_st[0] // al, bias_st[1],
        out.stride(0) // al, out.stride(1), h_st[0] // al, h_st[1],
        E=E, GATHER=gather, SCATTER=scatter, HAS_BIAS=has_bias, ACT=act, STORE_H=store_h,
        ACT_BWD=act_bwd, B_TRANS=b_trans, INPUT_PRECISION=prec, DOT_UPCAST=dot_upcast(dtype),
        ALIGN=al, EVEN=N % out_n == 0 and K % cfg.BLOCK_K == 0, BLOCK_M=cfg.BLOCK_M,
        BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=MM_GROUP_M, EPI_SPLIT=cfg.epilogue_split,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(kind, cfg))


def offsets_fit_int32(*tensors: torch.Tensor) -> bool:
    """Every element offset of every tensor (sum of (size - 1) * stride) is below 2**31."""
    return all(sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 0) < 2 ** 31
               for t in tensors)


def _grouped_wgrad(kind, a, x, dw, db, perm, offsets, experts, *, config=None):
    """dw [E, N, K] (and db [E, N]) from a [T, N], x [T, K] for the experts flagged in
    ``experts`` (E bools); the others' slices are zeroed and get no programs: one
    ``launch_wgrad`` per run of consecutive flagged experts, on views of dw, db and
    offsets starting at the run's first expert (perm and the token bounds stay global)."""
    e = 0
    while e < len(experts):
        if not experts[e]:
            dw[e].zero_()
            if db is not None:
                db[e].zero_()
            e += 1
            continue
        end = e
        while end < len(experts) and experts[end]:
            end += 1
        launch_wgrad(kind, a, x, dw[e:end], None if db is None else db[e:end], perm, offsets[e:],
                      config=config)
        e = end


def launch_wgrad(kind, a, x, dw, db, perm, offsets, *, config=None):
    """One launch of ``grouped_wgrad_kernel`` for ``kind`` (of ``WGRAD_KINDS``): dw [E, N, K] (and db [E, N]) from a [T, N], x [T, K],
    expert ``e``'s tokens at ``perm[offsets[e]:offsets[e + 1]]``."""
    gather_a, gather_x = WGRAD_FLAGS[kind]
    E, N, K = dw.shape
    T = a.shape[0]
    prec = input_precision(a.dtype)
    has_bias = db is not None
    # widths and row strides of the given outputs and of the contiguous fp32 buffers the
    # chunked path sums into: one ALIGN for both, so the tiles do not depend on the path
    al = align_of(N, K, a.stride(0), x.stride(0), dw.stride(0), dw.stride(1),
                  db.stride(0) if has_bias else 0, N * K)
    cfg = pick_config(kind, a.dtype, prec, False, N, al, config)
    chunk = wgrad_chunk(T, E, triton.cdiv(N, cfg.BLOCK_N) * triton.cdiv(K, cfg.BLOCK_K), cfg.BLOCK_T,
                        a.device)
    atomic = 0 < chunk < T
    # atomics accumulate in fp32 buffers (contiguous), converted to the gradients' dtype after
    dw_k = torch.zeros(dw.shape, dtype=torch.float32, device=dw.device) if atomic else dw
    db_k = (torch.zeros(db.shape, dtype=torch.float32, device=db.device) if atomic else db) if has_bias else None
    db_t = db_k if has_bias else dw_k
    db_st = (db_k.stride(0), db_k.stride(1)) if has_bias else (0, 0)
    swe, swn, swk = dw_k.stride()
    if atomic:
        chunk = triton.cdiv(chunk, cfg.BLOCK_T) * cfg.BLOCK_T
    else:
        chunk = max(T, 1)
    grid = (E * triton.cdiv(N, cfg.BLOCK_N) * triton.cdiv(K, cfg.BLOCK_K), triton.cdiv(max(T, 1), chunk))
    grouped_wgrad_kernel[grid](
        a, x, dw_k, db_t, perm, offsets, N // al, K // al, chunk,
        a.stride(0) // al, a.stride(1), x.stride(0) // al, x.stride(1),
        swe // al, swn // al, swk, db_st[0] // al, db_st[1],
        E=E, GATHER_A=gather_a, GATHER_X=gather_x, HAS_BIAS=has_bias,
        INPUT_PRECISION=prec, DOT_UPCAST=dot_upcast(a.dtype), ALIGN=al, ATOMIC=atomic,
        EVEN=N % cfg.BLOCK_N == 0 and K % cfg.BLOCK_K == 0, ROW32=offsets_fit_int32(a, x),
        BLOCK_N=cfg.BLOCK_N,
        BLOCK_K=cfg.BLOCK_K, BLOCK_T=cfg.BLOCK_T, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **launch_options(kind, cfg))
    if atomic:
        dw.copy_(dw_k)
        if has_bias:
            db.copy_(db_k)


def weight_t_strides(w: torch.Tensor):
    """B = W_e^T of ``w [E, N, K]``: (stride_e, stride_k, stride_n)."""
    return (w.stride(0), w.stride(2), w.stride(1))


def weight_strides(w: torch.Tensor):
    """B = W_e of ``w [E, K, N]``: (stride_e, stride_k, stride_n)."""
    return (w.stride(0), w.stride(1), w.stride(2))


def _act_code(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return ACT_CODES[activation]


def linear_fwd_triton(x, perm, offsets, weight, bias=None, *, config=None):
    """``y [T, Hout]`` (token order): ``y[t] = x[t] @ weight[e(t)]^T + bias[e(t)]``.

    ``config``: an :class:`MMConfig` (or a dict kind -> config) forcing the tiles; without one,
    each launch takes the :mod:`mmkernels.tuning` override or the heuristic (``pick_config``).
    """
    check_launch(x, offsets)
    T, Hin = x.shape
    Hout = weight.shape[1]
    y = torch.empty((T, Hout), dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    launch_grouped_mm("linear_fwd", x, weight, weight_t_strides(weight), bias, y, None, perm, offsets, Hout, Hin,
                ACT_NONE, config=config)
    return y


def linear_bwd_triton(dy, x, perm, offsets, weight, bias, needs_dx, dw_experts, *, config=None):
    """``(dx [T, Hin] | empty(0), dw [E, Hout, Hin] | empty(0), db [E, Hout] | empty(0))``.

    ``dw_experts``: E bools, the experts whose weight gradient is wanted (zero slices for the
    others); ``dw`` and, when ``bias`` is given, ``db`` are empty if none is. One grouped GEMM
    for dx (gather dy, ``W_e`` not transposed, scatter) plus one weight-gradient launch.
    """
    check_launch(x, offsets)
    T, Hin = x.shape
    E, Hout = weight.shape[0], weight.shape[1]
    dev = x.device
    dx, dw, db = empty_of(x), empty_of(weight), empty_of(weight)
    if needs_dx:
        dx = torch.empty((T, Hin), dtype=x.dtype, device=dev)
        if T > 0:
            launch_grouped_mm("linear_bwd_dx", dy, weight, weight_strides(weight), None, dx, None, perm, offsets,
                        Hin, Hout, ACT_NONE, config=config)
    if any(dw_experts):
        dw = torch.empty((E, Hout, Hin), dtype=weight.dtype, device=dev)
        if bias is not None:
            db = torch.empty((E, Hout), dtype=bias.dtype, device=dev)
        _grouped_wgrad("wgrad_linear", dy, x, dw, db if bias is not None else None, perm, offsets,
                       dw_experts, config=config)
    return dx, dw, db


def ffn_fwd_triton(x, perm, offsets, w_in, b_in, w_out, b_out, activation, *, config=None):
    """``(y [T, Hout] token order, h [T, Fi] sorted, a [T, F] sorted)``.

    Two grouped GEMMs: ``x -> (h, a)`` in sorted order (activation epilogue, h stored), then
    ``a -> y`` (scatter)."""
    check_launch(x, offsets)
    act = _act_code(activation)
    T, Hin = x.shape
    Fi = w_in.shape[1]
    F = w_out.shape[2]
    Hout = w_out.shape[1]
    dev = x.device
    y = torch.empty((T, Hout), dtype=x.dtype, device=dev)
    h = torch.empty((T, Fi), dtype=x.dtype, device=dev)
    a = torch.empty((T, F), dtype=x.dtype, device=dev)
    if T == 0:
        return y, h, a
    launch_grouped_mm("ffn_fwd_in", x, w_in, weight_t_strides(w_in), b_in, a, h, perm, offsets, F, Hin, act,
                config=config)
    launch_grouped_mm("ffn_fwd_out", a, w_out, weight_t_strides(w_out), b_out, y, None, perm, offsets, Hout, F,
                ACT_NONE, config=config)
    return y, h, a


def ffn_bwd_triton(dy, x, perm, offsets, w_in, b_in, w_out, b_out, h, a, activation, needs_dx=True,
                   dw_in_experts=None, dw_out_experts=None, *, config=None):
    """``(dx [T, Hin], dw_in [E, Fi, Hin], db_in [E, Fi], dw_out [E, Hout, F], db_out [E, Hout])``,
    each ``empty(0)`` when not wanted: ``dx`` unless ``needs_dx``, a weight (and its bias)
    gradient when its mask (E bools, default every expert) flags no expert, a bias gradient when
    there is no bias. Experts left out of a mask get zero slices and no weight-gradient work;
    ``dh`` is computed only for ``dx`` or ``dw_in``.

    Launches: ``dh = (dy @ W_out_e) * act'(h)``, ``dx = dh @ W_in_e`` (scatter), and
    ``dW_out = dy^T a``, ``dW_in = dh^T x`` with their bias gradients."""
    check_launch(x, offsets)
    act = _act_code(activation)
    T, Hin = x.shape
    E, Fi = w_in.shape[0], w_in.shape[1]
    Hout, F = w_out.shape[1], w_out.shape[2]
    mask_in = [True] * E if dw_in_experts is None else list(dw_in_experts)
    mask_out = [True] * E if dw_out_experts is None else list(dw_out_experts)
    dev = x.device
    dx = torch.empty((T, Hin), dtype=x.dtype, device=dev) if needs_dx else empty_of(x)
    dw_in = db_in = dw_out = db_out = dh = None
    if (needs_dx or any(mask_in)) and T > 0:
        # dh = (dy @ W_out_e) * act'(h), in sorted order
        dh = torch.empty((T, Fi), dtype=x.dtype, device=dev)
        launch_grouped_mm("ffn_bwd_dh", dy, w_out, weight_strides(w_out), None, dh, h, perm, offsets, F, Hout, act,
                    config=config)
        if needs_dx:
            launch_grouped_mm("ffn_bwd_dx", dh, w_in, weight_strides(w_in), None, dx, None, perm, offsets, Hin, Fi,
                        ACT_NONE, config=config)
    if any(mask_out):
        dw_out = torch.empty((E, Hout, F), dtype=w_out.dtype, device=dev)
        db_out = torch.empty((E, Hout), dtype=b_out.dtype, device=dev) if b_out is not None else None
        _grouped_wgrad("wgrad_ffn_out", dy, a, dw_out, db_out, perm, offsets, mask_out, config=config)
    if any(mask_in):
        dw_in = torch.empty((E, Fi, Hin), dtype=w_in.dtype, device=dev)
        db_in = torch.empty((E, Fi), dtype=b_in.dtype, device=dev) if b_in is not None else None
        if dh is None:  # no tokens
            dh = torch.empty((T, Fi), dtype=x.dtype, device=dev)
        _grouped_wgrad("wgrad_ffn_in", dh, x, dw_in, db_in, perm, offsets, mask_in, config=config)
    return tuple(empty_of(ref) if t is None else t
                 for t, ref in ((dx, x), (dw_in, w_in), (db_in, w_in), (dw_out, w_out), (db_out, w_out)))
