"""Compile-tier support: the exact specialisations cross-attention launches produce, for
:mod:`mmkernels.testing.sm90` (tests/cross_attention/test_sm90.py compiles them all)."""
from __future__ import annotations

import torch

from ..._triton import DTYPES, PTR, block_d, input_precisions, stride_align
from .configs import KERNEL_KINDS, XAttnConfig, candidate_launches
from .jit import xattn_bwd_kernel, xattn_fwd_kernel

#: head dims compiled by the tier per dtype (64: BLOCK_D 64; 88: ALIGN 8, masked; 96, 128: BLOCK_D
#: 128; D = 96 differs from 128 only by the masked columns, compiled for bf16 only)
COMPILE_HEAD_DIMS = {torch.bfloat16: (64, 88, 96, 128), torch.float16: (64, 88, 128),
                     torch.float32: (64, 88, 128)}


def compile_spec(kind: str, dtype: torch.dtype, D: int, input_precision: str, config: XAttnConfig, *,
                 has_mask: bool = True, has_dropout: bool = True, one_m: bool = True):
    """(kernel, signature, constexprs, divisible_by_16) of one launch, for mmkernels.testing.sm90.

    Describes a launch with B = 128, H = 12, Lk = 577 (a ViT-L/14 image), Lq = BLOCK_M (one
    query block) or 4 * BLOCK_M (``one_m=False``), q/dout/out contiguous and k/v strided views
    of a fused K/V projection of L = 12 layers (row stride ``L * 2 * H * D``), as Triton would
    specialise it (ints equal to 1 become constexprs, ints divisible by 16 get the hint).
    """
    from ...testing.sm90 import launch_signature  # the testing package stays off the launch path
    ptr = PTR[dtype]
    B, H, Lk, L = 128, 12, 577, 12
    Lq = config.BLOCK_M if one_m else 4 * config.BLOCK_M
    kv_row = L * 2 * H * D
    q_st = (H * Lq * D, Lq * D, D, 1)
    kv_st = (Lk * kv_row, D, kv_row, 1)
    al = stride_align(extra=q_st[:3] + kv_st[:3])

    def div(st):
        return (st[0] // al, st[1] // al, st[2] // al, st[3])

    ints = {"n_pairs": B * H, "pairs_per_program": 3, "H": H, "Lq": Lq, "Lk": Lk,
            "thr_biased": (429496729 - 2 ** 31) if has_dropout else 0}
    groups = [("q", q_st), ("k", kv_st), ("v", kv_st)]
    if kind == "fwd":
        kernel = xattn_fwd_kernel
        sig = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "o_ptr": ptr, "lse_ptr": "*fp32",
               "max_ptr": "*fp32", "sum_ptr": "*fp32",
               "mask_ptr": "*u8" if has_mask else "*fp32", "seed_ptr": "*i64" if has_dropout else "*fp32"}
        floats = ["qk_scale", "inv_keep"]
        extra = {}
    elif kind == "bwd":
        kernel = xattn_bwd_kernel
        sig = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "o_ptr": ptr, "do_ptr": ptr, "max_ptr": "*fp32",
               "sum_ptr": "*fp32",
               "dq_ptr": ptr, "dk_ptr": ptr, "dv_ptr": ptr,
               "dqacc_ptr": "*fp32", "delta_ptr": "*fp32",
               "mask_ptr": "*u8" if has_mask else "*fp32", "seed_ptr": "*i64" if has_dropout else "*fp32"}
        floats = ["qk_scale", "scale", "inv_keep"]
        groups += [("o", q_st), ("do", q_st)]
        extra = {"ONE_M": bool(one_m)}
    else:
        raise ValueError(f"unknown kernel kind {kind!r}")
    for pre, st in groups:
        ints.update(zip([f"stride_{pre}{c}" for c in "bhsd"], div(st)))
    ints.update(stride_mb=Lk if has_mask else 0, stride_mk=1 if has_mask else 0)
    constexprs = {"HAS_MASK": bool(has_mask), "HAS_DROPOUT": bool(has_dropout),
                  "INPUT_PRECISION": input_precision, "DOT_UPCAST": False, "D": D, "ALIGN": al,
                  "BLOCK_M": config.BLOCK_M, "BLOCK_N": config.BLOCK_N, "BLOCK_D": block_d(D), **extra}
    return (kernel, *launch_signature(sig, ints, constexprs, floats))


def compile_specs(dtypes=DTYPES, head_dims=None):
    """The sm_90 compile jobs (``mmkernels.testing.sm90.CompileJob``) of every config the launchers pick.

    For each kernel kind, dtype, input precision, head dim and candidate launch (config and,
    for the backward, one query block or several): the kernel with key padding mask and dropout
    (the most registers), and -- for the smallest and largest launch and BLOCK_M = 32 -- also
    without either.  Labels are unique.
    """
    from ...testing.sm90 import CompileJob
    jobs = []
    for kind in KERNEL_KINDS:
        for dtype in dtypes:
            for prec in input_precisions(dtype):
                for D in (head_dims or COMPILE_HEAD_DIMS[dtype]):
                    launches = candidate_launches(kind, dtype, D, prec)
                    for i, (cfg, one_m) in enumerate(launches):
                        flag_sets = [(True, True)]
                        if i in (0, len(launches) - 1):
                            flag_sets.append((False, False))
                        for has_mask, has_dropout in flag_sets:
                            kernel, sig, constexprs, div = compile_spec(
                                kind, dtype, D, prec, cfg, has_mask=has_mask,
                                has_dropout=has_dropout, one_m=one_m)
                            label = (f"{kind}-{PTR[dtype][1:]}-{prec}-D{D}-{cfg.BLOCK_M}x{cfg.BLOCK_N}"
                                     f"-w{cfg.num_warps}-s{cfg.num_stages}"
                                     f"-{'mask' if has_mask else 'nomask'}"
                                     f"-{'drop' if has_dropout else 'nodrop'}"
                                     + ("" if kind == "fwd" else ("-onem" if one_m else "-multim")))
                            jobs.append(CompileJob(kernel, sig, constexprs, cfg.num_warps,
                                                   cfg.num_stages, div, label=label))
    return jobs
