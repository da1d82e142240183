"""Launchers of the attention kernels: argument checks, the tile map at the chosen tiles, grids."""
from __future__ import annotations

import torch
import triton

from ..._triton import (DTYPES, LOG2E, aligned_strides, block_d, check_device, dot_upcast, input_precision,
                        stride_align)
from ..mask import MultimodalMask
from .configs import MAX_HEAD_DIM, dkdv_parts, pick
from .jit import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel, attn_fwd_kernel


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    check_device(q)
    if q.dtype not in DTYPES:
        raise TypeError(f"the triton attention kernels take float32/bfloat16/float16, got {q.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported by the triton kernels")


def mask_from_meta(meta) -> MultimodalMask | None:
    """The mask a launch's ``meta`` (``[]`` or the 9 metadata tensors of a mask) describes, or None."""
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


def attention_fwd_triton(q, k, v, meta, scale, *, config=None):
    """Forward of ``q [B, Hq, Sq, D]``, ``k``/``v [B, Hkv, Sk, D]`` (fp32/bf16/fp16, one dtype):
    ``(out [B, Hq, Sq, D] in q.dtype, lse, row_max, row_sum)``, the last three ``[B, Hq, Sq]``
    float32: ``row_max`` the max of each row's scores in the log2 domain (``s * scale * log2(e)``),
    ``row_sum`` the sum of ``exp2(score - row_max)``, ``lse`` natural-log (see ``ops.py``).

    ``meta``: ``[]`` or the 9 metadata tensors of a mask; ``config``: an :class:`AttnConfig` (or
    a dict kind -> AttnConfig) forcing the tiles, else :func:`~.configs.pick` chooses.
    """
    _check(q, k, v)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dev = q.device
    out = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=dev)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=dev)
    row_max = torch.empty_like(lse)
    row_sum = torch.empty_like(lse)
    prec = input_precision(q.dtype)
    mask = mask_from_meta(meta)
    cfg = pick("fwd", q.dtype, D, prec, mask is not None, config)
    tiles, fields, nm = _mask_args(mask, B, Sq, Sk, cfg.BLOCK_M, cfg.BLOCK_N, lse)
    n_tm, n_tn = triton.cdiv(Sq, cfg.BLOCK_M), triton.cdiv(Sk, cfg.BLOCK_N)
    al = stride_align(q, k, v, out)
    attn_fwd_kernel[(n_tm, B * Hq)](
        q, k, v, out, lse, row_max, row_sum, tiles, *fields,
        float(scale) * LOG2E, Sq, Sk, Hq, Hq // Hkv, nm, n_tm, n_tn,
        *aligned_strides(q, al), *aligned_strides(k, al), *aligned_strides(v, al), *aligned_strides(out, al),
        HAS_MASK=mask is not None, INPUT_PRECISION=prec, DOT_UPCAST=dot_upcast(q.dtype),
        D=D, ALIGN=al,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=block_d(D),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse, row_max, row_sum


def attention_bwd_triton(q, k, v, out, row_max, row_sum, dout, meta, scale, *, config=None):
    """Backward from ``out``, ``row_max``, ``row_sum`` (as :func:`attention_fwd_triton` returned
    them: P = exp2(score - row_max) / row_sum) and ``dout [B, Hq, Sq, D]``:
    ``(dq, dk, dv)`` in the input dtypes (rows that see nothing pass no gradient). ``config`` as
    for :func:`attention_fwd_triton`; a single AttnConfig applies to ``bwd_dkdv`` and ``bwd_dq``."""
    _check(q, k, v)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dev = q.device
    group = Hq // Hkv
    prec = input_precision(q.dtype)
    bd = block_d(D)
    scale = float(scale)
    row_max = row_max.to(torch.float32).contiguous()
    row_sum = row_sum.to(torch.float32).contiguous()
    delta = torch.empty((B, Hq, Sq), dtype=torch.float32, device=dev)
    dq = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=dev)
    dk = torch.empty((B, Hkv, Sk, D), dtype=k.dtype, device=dev)
    dv = torch.empty((B, Hkv, Sk, D), dtype=v.dtype, device=dev)
    mask = mask_from_meta(meta)

    pre = pick("bwd_pre", q.dtype, D, prec, mask is not None, config if isinstance(config, dict) else None)
    al = stride_align(out, dout)
    attn_bwd_preprocess_kernel[(triton.cdiv(Sq, pre.BLOCK_M), B * Hq)](
        out, dout, delta, Sq, Hq, *aligned_strides(out, al), *aligned_strides(dout, al), D=D, ALIGN=al,
        BLOCK_M=pre.BLOCK_M, BLOCK_D=bd, num_warps=pre.num_warps, num_stages=pre.num_stages)

    al = stride_align(q, k, v, dout, dq, dk, dv)
    common = dict(HAS_MASK=mask is not None, INPUT_PRECISION=prec, DOT_UPCAST=dot_upcast(q.dtype),
                  D=D, ALIGN=al, BLOCK_D=bd)
    cfg = pick("bwd_dkdv", q.dtype, D, prec, mask is not None, config)
    tiles, fields, nm = _mask_args(mask, B, Sq, Sk, cfg.BLOCK_M, cfg.BLOCK_N, delta)
    n_tm, n_tn = triton.cdiv(Sq, cfg.BLOCK_M), triton.cdiv(Sk, cfg.BLOCK_N)
    for part in dkdv_parts(cfg):
        attn_bwd_dkdv_kernel[(n_tn, B * Hkv)](
            q, k, v, dout, row_max, row_sum, delta, dk, dv, tiles, *fields,
            scale * LOG2E, scale, Sq, Sk, Hq, Hkv, group, nm, n_tm, n_tn,
            *aligned_strides(q, al), *aligned_strides(k, al), *aligned_strides(v, al), *aligned_strides(dout, al),
            *aligned_strides(dk, al), *aligned_strides(dv, al),
            **common, PART=part, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    cfg = pick("bwd_dq", q.dtype, D, prec, mask is not None, config)
    tiles, fields, nm = _mask_args(mask, B, Sq, Sk, cfg.BLOCK_M, cfg.BLOCK_N, delta)
    n_tm, n_tn = triton.cdiv(Sq, cfg.BLOCK_M), triton.cdiv(Sk, cfg.BLOCK_N)
    attn_bwd_dq_kernel[(n_tm, B * Hq)](
        q, k, v, dout, row_max, row_sum, delta, dq, tiles, *fields,
        scale * LOG2E, scale, Sq, Sk, Hq, group, nm, n_tm, n_tn,
        *aligned_strides(q, al), *aligned_strides(k, al), *aligned_strides(v, al), *aligned_strides(dout, al),
        *aligned_strides(dq, al),
        **common, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq, dk, dv
