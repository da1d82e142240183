"""Compile-tier support: the exact specialisation a grouped-GEMM launch produces, for
:mod:`mmkernels.testing.sm90` (tests/experts/test_sm90.py compiles every config)."""
from __future__ import annotations

import torch

from ...._triton import PTR
from ...routing_kernels import align_of
from .configs import (ACT_CODES, ACT_NONE, ACT_SWIGLU, MM_FLAGS, MM_GROUP_M, MM_KINDS, WGRAD_FLAGS, WGRAD_KINDS,
                      mm_output_columns)
from .jit_mm import grouped_mm_kernel
from .jit_wgrad import grouped_wgrad_kernel


def compile_specs(kind: str, dtype: torch.dtype, input_precision: str, config=None,
                  activation: str | None = None, has_bias: bool = False, E: int = 2,
                  sizes: tuple[int, int, int] = (4096, 1024, 4096), atomic: bool = False,
                  row32: bool = True):
    """(kernel, signature, constexprs, divisible_by_16) for mmkernels.testing.sm90.

    Describes launch ``kind`` with contiguous tensors and 16-byte aligned buffers, as Triton
    would specialise it (ints equal to 1 become constexprs, ints divisible by 16 get the
    divisibility hint).  ``sizes = (T, H, F)``: tokens, model width (Hin = Hout) and FFN width
    (pass widths that are not multiples of 16 to compile the unaligned specialisation).
    ``activation``: for ffn_fwd_in / ffn_bwd_dh (else no activation); ``config``: MMConfig or
    WGradConfig; ``atomic``: the token-chunked weight gradient (the ``experts.wgrad_chunk``
    tuning option), fp32 atomics into fp32 buffers; ``row32``: the weight
    gradient's int32 row offsets (False: int64, for inputs past 2**31 elements).
    """
    from ....testing.sm90 import launch_signature
    ptr = PTR[dtype]
    T, H, F = sizes
    if kind in MM_KINDS:
        gather, scatter, store_h, act_bwd, transposed = MM_FLAGS[kind]
        act = ACT_NONE if activation is None else ACT_CODES[activation]
        swiglu = act == ACT_SWIGLU
        Fi = 2 * F if swiglu else F
        # (A width K, output width N, weight [E, rows, cols], out width, h width)
        shapes = {
            "linear_fwd": (H, H, (H, H), H, 0),
            "linear_bwd_dx": (H, H, (H, H), H, 0),
            "ffn_fwd_in": (H, F, (Fi, H), F, Fi),
            "ffn_fwd_out": (F, H, (H, F), H, 0),
            "ffn_bwd_dh": (H, F, (H, F), Fi, Fi),
            "ffn_bwd_dx": (Fi, H, (Fi, H), H, 0),
        }
        K, N, (wr, wc), out_w, h_w = shapes[kind]
        if transposed:  # B = W^T: k runs along the weight's columns
            w_st = (wr * wc, 1, wc)
        else:
            w_st = (wr * wc, wc, 1)
        hb = has_bias and kind in ("linear_fwd", "ffn_fwd_in", "ffn_fwd_out")
        bias_w = wr if hb else 0
        al = align_of(N, K, K, w_st[0], w_st[2] if transposed else w_st[1], bias_w, out_w, h_w)
        w_st = (w_st[0] // al, w_st[1] // (1 if transposed else al), w_st[2] // (al if transposed else 1))
        sig = {"a_ptr": ptr, "b_ptr": ptr, "bias_ptr": ptr, "out_ptr": ptr, "h_ptr": ptr,
               "perm_ptr": "*i32", "offsets_ptr": "*i32"}
        ints = {"N": N // al, "K": K // al, "stride_am": K // al, "stride_ak": 1,
                "stride_be": w_st[0], "stride_bk": w_st[1], "stride_bn": w_st[2],
                "stride_biase": bias_w // al, "stride_biasn": 1 if hb else 0,
                "stride_om": out_w // al, "stride_on": 1,
                "stride_hm": h_w // al, "stride_hn": 1 if h_w else 0}
        constexprs = {"E": E, "GATHER": gather, "SCATTER": scatter, "HAS_BIAS": hb, "ACT": act,
                      "STORE_H": store_h, "ACT_BWD": act_bwd, "B_TRANS": transposed,
                      "INPUT_PRECISION": input_precision, "DOT_UPCAST": False, "ALIGN": al,
                      "EVEN": (N % mm_output_columns(config, act, act_bwd) == 0
                               and K % config.BLOCK_K == 0),
                      "BLOCK_M": config.BLOCK_M, "BLOCK_N": config.BLOCK_N,
                      "BLOCK_K": config.BLOCK_K, "GROUP_M": MM_GROUP_M,
                      "EPI_SPLIT": config.epilogue_split}
        return (grouped_mm_kernel, *launch_signature(sig, ints, constexprs))
    if kind in WGRAD_KINDS:
        gather_a, gather_x = WGRAD_FLAGS[kind]
        # (N = A width, K = X width)
        N, K = {"wgrad_linear": (H, H), "wgrad_ffn_out": (H, F), "wgrad_ffn_in": (F, H)}[kind]
        out_ptr = "*fp32" if atomic else ptr
        sig = {"a_ptr": ptr, "x_ptr": ptr, "dw_ptr": out_ptr, "db_ptr": out_ptr, "perm_ptr": "*i32",
               "offsets_ptr": "*i32"}
        al = align_of(N, K)
        ints = {"N": N // al, "K": K // al, "chunk": 2048 if atomic else T,
                "stride_am": N // al, "stride_an": 1,
                "stride_xm": K // al, "stride_xk": 1,
                "stride_we": N * K // al, "stride_wn": K // al, "stride_wk": 1,
                "stride_dbe": N // al if has_bias else 0, "stride_dbn": 1 if has_bias else 0}
        constexprs = {"E": E, "GATHER_A": gather_a, "GATHER_X": gather_x, "HAS_BIAS": bool(has_bias),
                      "INPUT_PRECISION": input_precision, "DOT_UPCAST": False, "ALIGN": al,
                      "ATOMIC": bool(atomic), "EVEN": N % config.BLOCK_N == 0 and K % config.BLOCK_K == 0,
                      "ROW32": row32,
                      "BLOCK_N": config.BLOCK_N, "BLOCK_K": config.BLOCK_K,
                      "BLOCK_T": config.BLOCK_T}
        return (grouped_wgrad_kernel, *launch_signature(sig, ints, constexprs))
    raise ValueError(f"unknown kernel kind {kind!r}")
