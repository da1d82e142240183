"""Launchers of the cross-attention kernels: argument checks, mask and dropout arguments, grids."""
from __future__ import annotations

import torch
import triton

from ..._triton import (DTYPES, LOG2E, aligned_strides, block_d, check_device, dot_upcast, input_precision,
                        stride_align)
from .configs import MAX_HEAD_DIM, pairs_per_program, pick
from .jit import xattn_bwd_kernel, xattn_fwd_kernel


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, seed):
    check_device(q)
    if q.dtype not in DTYPES:
        raise TypeError(f"the triton cross_attention kernels take float32/bfloat16/float16, got {q.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported by the triton kernels")
    if dropout_p > 0 and seed is None:
        raise ValueError("dropout_p > 0 needs a seed")


def _mask_args(key_padding_mask, dummy):
    """(uint8 view of the mask, stride_b, stride_k) or a dummy when there is no mask."""
    if key_padding_mask is None:
        return dummy, 0, 0
    m = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask
    return m, m.stride(0), m.stride(1)


def _dropout_args(dropout_p: float, seed, dummy):
    """(seed pointer, 1 / (1 - p), threshold - 2**31) for the kernels."""
    if dropout_p <= 0:
        return dummy, 1.0, 0
    from ..reference import dropout_threshold
    seed = seed if seed.is_contiguous() else seed.contiguous()
    return seed, 1.0 / (1.0 - float(dropout_p)), dropout_threshold(float(dropout_p)) - 2 ** 31


def cross_attention_fwd_triton(q, k, v, key_padding_mask, seed, scale, dropout_p, *, config=None,
                               pairs=None):
    """Forward of ``q [B, H, Lq, D]``, ``k``/``v [B, H, Lk, D]`` (fp32/bf16/fp16, any strides),
    ``key_padding_mask`` bool ``[B, Lk]`` or None, ``seed`` int64 ``[2]`` (with dropout):
    ``(out [B, H, Lq, D] contiguous in q's dtype, lse, row_max, row_sum)``, the last three
    ``[B, H, Lq]`` float32: ``row_max`` is the row max of the scores in the log2 domain,
    ``row_sum`` the sum of ``exp2(s - row_max)``, ``lse`` the natural-log log-sum-exp.

    ``config``: an :class:`XAttnConfig` (or a dict kind -> XAttnConfig) forcing the tiles, else
    :func:`~.configs.pick` chooses; ``pairs``: the (b, h) pairs per program.
    """
    dropout_p = float(dropout_p)
    _check(q, k, v, dropout_p, seed)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dev = q.device
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=dev)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=dev)
    row_max = torch.empty_like(lse)
    row_sum = torch.empty_like(lse)
    prec = input_precision(q.dtype)
    cfg = pick("fwd", q.dtype, D, prec, Lq, config)
    n_pairs = B * H
    n_mb = triton.cdiv(Lq, cfg.BLOCK_M)
    ppp = pairs if pairs is not None else pairs_per_program(n_pairs, n_mb, dev)
    mask, smb, smk = _mask_args(key_padding_mask, lse)
    seed_t, inv_keep, thr = _dropout_args(dropout_p, seed, lse)
    al = stride_align(q, k, v)
    xattn_fwd_kernel[(triton.cdiv(n_pairs, ppp), n_mb)](
        q, k, v, out, lse, row_max, row_sum, mask, seed_t,
        float(scale) * LOG2E, inv_keep, thr,
        n_pairs, ppp, H, Lq, Lk,
        *aligned_strides(q, al), *aligned_strides(k, al), *aligned_strides(v, al), smb, smk,
        HAS_MASK=key_padding_mask is not None, HAS_DROPOUT=dropout_p > 0, INPUT_PRECISION=prec,
        DOT_UPCAST=dot_upcast(q.dtype), D=D, ALIGN=al,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=block_d(D),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse, row_max, row_sum


def cross_attention_bwd_triton(q, k, v, out, row_max, row_sum, dout, key_padding_mask, seed, scale, dropout_p, *,
                               config=None, pairs=None):
    """Backward from ``out``, ``row_max``, ``row_sum`` (as the forward returned them) and ``dout [B, H, Lq, D]``:
    ``(dq, dk, dv)``, contiguous, in the input dtypes (rows that see nothing pass no gradient).
    ``config`` and ``pairs`` as for :func:`cross_attention_fwd_triton`."""
    dropout_p = float(dropout_p)
    _check(q, k, v, dropout_p, seed)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dev = q.device
    prec = input_precision(q.dtype)
    scale = float(scale)
    row_max = row_max.to(torch.float32).contiguous()
    row_sum = row_sum.to(torch.float32).contiguous()
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=dev)
    dk = torch.empty((B, H, Lk, D), dtype=k.dtype, device=dev)
    dv = torch.empty((B, H, Lk, D), dtype=v.dtype, device=dev)
    cfg = pick("bwd", q.dtype, D, prec, Lq, config)
    one_m = Lq <= cfg.BLOCK_M
    if one_m:
        dqacc = delta = row_sum  # unused
    else:
        dqacc = dq if q.dtype == torch.float32 else torch.empty((B, H, Lq, D), dtype=torch.float32, device=dev)
        delta = torch.empty((B, H, Lq), dtype=torch.float32, device=dev)
    n_pairs = B * H
    ppp = pairs if pairs is not None else pairs_per_program(n_pairs, 1, dev)
    mask, smb, smk = _mask_args(key_padding_mask, row_sum)
    seed_t, inv_keep, thr = _dropout_args(dropout_p, seed, row_sum)
    al = stride_align(q, k, v, out, dout)
    xattn_bwd_kernel[(triton.cdiv(n_pairs, ppp),)](
        q, k, v, out, dout, row_max, row_sum, dq, dk, dv, dqacc, delta, mask, seed_t,
        scale * LOG2E, scale, inv_keep, thr,
        n_pairs, ppp, H, Lq, Lk,
        *aligned_strides(q, al), *aligned_strides(k, al), *aligned_strides(v, al), *aligned_strides(out, al),
        *aligned_strides(dout, al),
        smb, smk,
        HAS_MASK=key_padding_mask is not None, HAS_DROPOUT=dropout_p > 0, ONE_M=one_m,
        INPUT_PRECISION=prec, DOT_UPCAST=dot_upcast(q.dtype), D=D, ALIGN=al,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=block_d(D),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq, dk, dv
