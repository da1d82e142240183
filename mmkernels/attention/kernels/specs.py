"""Compile-tier support: the exact specialisation an attention launch produces, for
:mod:`mmkernels.testing.sm90` (tests/attention/test_sm90.py compiles every config)."""
from __future__ import annotations

import torch
import triton

from ..._triton import PTR, block_d, stride_align
from .configs import AttnConfig
from .jit import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel, attn_fwd_kernel

_META_PTRS = ("qmod_ptr", "kmod_ptr", "qseg_ptr", "kseg_ptr", "qpos_ptr", "kpos_ptr",
              "qrun_ptr", "krun_ptr")


def compile_specs(kind: str, dtype: torch.dtype, D: int, input_precision: str, has_mask: bool,
                  config: AttnConfig, part: int = 0):
    """(kernel, signature, constexprs, divisible_by_16) for mmkernels.testing.sm90.

    Describes a launch with contiguous ``[B, H, S, D]`` tensors (B=2, Hq=16, Hkv=8, S=4096,
    NM=2) and 256-byte aligned buffers, as Triton would specialise it (ints equal to 1 become
    constexprs, ints divisible by 16 get the divisibility hint).
    """
    ptr = PTR[dtype]
    S, Hq, Hkv = 4096, 16, 8
    bm, bn = config.BLOCK_M, max(config.BLOCK_N, 1)

    al = stride_align(extra=(D,))  # every stride of a contiguous [B, H, S, D] is a multiple of D

    def strides4(h):  # contiguous [B, H, S, D], divided by ALIGN as the launchers pass them
        return (h * S * D // al, S * D // al, D // al, 1)

    ints: dict[str, int] = {}
    floats: list[str] = []
    extra: dict = {}
    if kind == "bwd_pre":
        kernel = attn_bwd_preprocess_kernel
        sig = {"o_ptr": ptr, "do_ptr": ptr, "delta_ptr": "*fp32"}
        ints.update(Sq=S, Hq=Hq)
        for pre in ("o", "do"):
            ints.update(zip([f"stride_{pre}{c}" for c in "bhsd"], strides4(Hq)))
        constexprs = {"D": D, "ALIGN": al, "BLOCK_M": config.BLOCK_M, "BLOCK_D": block_d(D)}
    else:
        meta = {n: "*i32" for n in _META_PTRS}
        meta["rules_ptr"] = "*i8"
        if kind == "fwd":
            kernel = attn_fwd_kernel
            sig = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "o_ptr": ptr, "lse_ptr": "*fp32",
                   "m_ptr": "*fp32", "l_ptr": "*fp32", "tile_ptr": "*i8", **meta}
            floats = ["qk_scale"]
            ints.update(Sq=S, Sk=S, Hq=Hq, GROUP=Hq // Hkv, NM=2,
                        n_tm=triton.cdiv(S, bm), n_tn=triton.cdiv(S, bn))
            groups = [("q", Hq), ("k", Hkv), ("v", Hkv), ("o", Hq)]
        elif kind == "bwd_dkdv":
            kernel = attn_bwd_dkdv_kernel
            sig = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "do_ptr": ptr, "m_ptr": "*fp32",
                   "l_ptr": "*fp32", "delta_ptr": "*fp32", "dk_ptr": ptr, "dv_ptr": ptr, "tile_ptr": "*i8", **meta}
            floats = ["qk_scale", "scale"]
            ints.update(Sq=S, Sk=S, Hq=Hq, Hkv=Hkv, GROUP=Hq // Hkv, NM=2,
                        n_tm=triton.cdiv(S, bm), n_tn=triton.cdiv(S, bn))
            groups = [("q", Hq), ("k", Hkv), ("v", Hkv), ("do", Hq), ("dk", Hkv), ("dv", Hkv)]
            extra["PART"] = part
        elif kind == "bwd_dq":
            kernel = attn_bwd_dq_kernel
            sig = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "do_ptr": ptr, "m_ptr": "*fp32",
                   "l_ptr": "*fp32", "delta_ptr": "*fp32", "dq_ptr": ptr, "tile_ptr": "*i8", **meta}
            floats = ["qk_scale", "scale"]
            ints.update(Sq=S, Sk=S, Hq=Hq, GROUP=Hq // Hkv, NM=2,
                        n_tm=triton.cdiv(S, bm), n_tn=triton.cdiv(S, bn))
            groups = [("q", Hq), ("k", Hkv), ("v", Hkv), ("do", Hq), ("dq", Hq)]
        else:
            raise ValueError(f"unknown kernel kind {kind!r}")
        for pre, h in groups:
            ints.update(zip([f"stride_{pre}{c}" for c in "bhsd"], strides4(h)))
        constexprs = {"HAS_MASK": bool(has_mask), "INPUT_PRECISION": input_precision,
                      "DOT_UPCAST": False, "D": D, "ALIGN": al, "BLOCK_M": config.BLOCK_M,
                      "BLOCK_N": config.BLOCK_N, "BLOCK_D": block_d(D), **extra}
    from ...testing.sm90 import launch_signature  # the testing package stays off the launch path
    return (kernel, *launch_signature(sig, ints, constexprs, floats))
