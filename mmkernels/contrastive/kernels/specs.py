"""The exact specialisation a contrastive launch would produce, for the sm_90 compile tier
(``mmkernels.testing.sm90``)."""

from __future__ import annotations

import torch

from ..._triton import PTR
from .configs import FINALIZE_BLOCK, TileConfig, grad_block_d
from .jit import finalize_kernel, grad_kernel, stats_kernel


def compile_specs(kind: str, dtype: torch.dtype, D: int, with_columns: bool,
                  input_precision: str, config: TileConfig):
    """(kernel, signature, constexprs, divisible_by_16) for mmkernels.testing.sm90.

    Describes a launch with contiguous q/k/targets and 16-byte aligned
    buffers, as Triton would specialise it (ints equal to 1 become constexprs,
    ints divisible by 16 get the divisibility hint).  ``D`` is the feature
    size; the other sizes are taken as large multiples of 16.
    """
    ptr = PTR[dtype]
    big = 4096
    ints: dict[str, int]
    if kind == "stats":
        kernel = stats_kernel
        sig = {
            "q_ptr": ptr, "k_ptr": ptr, "scale_ptr": "*fp32", "tgt_ptr": "*i64",
            "row_lse_ptr": "*fp32", "row_max_ptr": "*fp32", "row_sum_ptr": "*fp32",
            "pos_ptr": "*fp32", "col_max_ptr": "*fp32", "col_sumexp_ptr": "*fp32",
            "col_sum_ptr": "*fp32", "lock_ptr": "*i32", "col_tmp_ptr": "*fp32",
            "row_part_ptr": "*fp32",
        }
        ints = {"N": big, "M": big, "D": D, "cols_per_split": big // 8, "stride_qn": D, "stride_qd": 1,
                "stride_kn": D, "stride_kd": 1, "stride_t": 1}
        extra = {}
    elif kind == "grad":
        kernel = grad_kernel
        sig = {
            "q_ptr": ptr, "k_ptr": ptr, "scale_ptr": "*fp32", "tgt_ptr": "*i64",
            "row_max_ptr": "*fp32", "row_lse_ptr": "*fp32", "g_row_lse_ptr": "*fp32",
            "g_row_sum_ptr": "*fp32", "g_pos_ptr": "*fp32", "col_max_ptr": "*fp32",
            "col_lse_ptr": "*fp32", "g_col_lse_ptr": "*fp32", "g_col_sum_ptr": "*fp32",
            "dq_ptr": ptr, "dk_ptr": ptr, "ds_part_ptr": "*fp32",
        }
        bd = grad_block_d(D, config)
        n_dc = -(-D // bd)
        ints = {"N": big, "M": big, "D": D, "n_dq_progs": (big // config.BLOCK_M) * n_dc,
                "n_d_chunks": n_dc, "stride_qn": D, "stride_qd": 1, "stride_kn": D,
                "stride_kd": 1, "stride_t": 1, "stride_dqn": D, "stride_dkn": D}
        extra = {"FP16_RESCALE": dtype == torch.float16, "BLOCK_D": bd}
    else:
        raise ValueError(kind)
    constexprs = {"WITH_COLUMNS": bool(with_columns), "INPUT_PRECISION": input_precision,
                  "DOT_UPCAST": False,
                  "BLOCK_M": config.BLOCK_M, "BLOCK_N": config.BLOCK_N,
                  "BLOCK_K": config.BLOCK_K, **extra}
    from ...testing.sm90 import launch_signature
    return (kernel, *launch_signature(sig, ints, constexprs))


#: the launch parameters of the kernels that are no tile loop over D (their configuration is
#: fixed): name -> (num_warps, num_stages)
LIGHT_KERNELS = ("finalize", "block_stats", "block_grad", "epilogue_fwd", "epilogue_bwd")


def light_specs(name: str, with_columns: bool, dtype: torch.dtype = torch.float32):
    """(kernel, signature, constexprs, divisible_by_16, num_warps) of a light kernel: the
    finalize step, the blockwise path's block kernels (``dtype``: of the G block they write)
    and the loss epilogue, as their launchers specialise them."""
    from ...testing.sm90 import launch_signature
    big = 4096
    if name == "finalize":
        sig = {"row_part_ptr": "*fp32", "row_lse_ptr": "*fp32", "row_max_ptr": "*fp32",
               "row_sum_ptr": "*fp32", "pos_ptr": "*fp32", "col_buf_ptr": "*fp32",
               "col_lse_ptr": "*fp32", "col_max_ptr": "*fp32", "col_sum_ptr": "*fp32"}
        ints = {"N": big, "M": big, "n_splits": 4, "cols_per_split": big // 4}
        constexprs = {"MERGE_ROWS": True, "WITH_COLUMNS": bool(with_columns),
                      "BLOCK": FINALIZE_BLOCK}
        return (finalize_kernel, *launch_signature(sig, ints, constexprs), 4)
    if name in ("block_stats", "block_grad"):
        from . import blockwise as bk
        if name == "block_stats":
            kernel = bk.block_stats_kernel
            sig = {"s_ptr": "*fp32", "scale_ptr": "*fp32", "tgt_ptr": "*i64",
                   "row_lse_ptr": "*fp32", "row_max_ptr": "*fp32", "row_sum_ptr": "*fp32",
                   "pos_ptr": "*fp32", "col_max_ptr": "*fp32", "col_d_ptr": "*fp32",
                   "col_sum_ptr": "*fp32"}
            ints = {"n_rows": big, "M": big, "stride_s": big, "stride_t": 1, "n_row_progs": 128,
                    "rows_before": big}
        else:
            kernel = bk.block_grad_kernel
            sig = {"s_ptr": "*fp32", "g_ptr": PTR[dtype], "scale_ptr": "*fp32", "tgt_ptr": "*i64",
                   "row_max_ptr": "*fp32", "row_lse_ptr": "*fp32", "g_row_lse_ptr": "*fp32",
                   "g_row_sum_ptr": "*fp32", "g_pos_ptr": "*fp32", "col_max_ptr": "*fp32",
                   "col_lse_ptr": "*fp32", "g_col_lse_ptr": "*fp32", "g_col_sum_ptr": "*fp32",
                   "ds_rows_ptr": "*fp32"}
            ints = {"n_rows": big, "M": big, "stride_s": big, "stride_g": big, "stride_t": 1}
        constexprs = {"WITH_COLUMNS": bool(with_columns), "BLOCK_R": bk.BLOCK_R,
                      "BLOCK_C": bk.BLOCK_C}
        return (kernel, *launch_signature(sig, ints, constexprs), bk.NUM_WARPS)
    if name in ("epilogue_fwd", "epilogue_bwd"):
        from . import epilogue as ek
        return ek.compile_specs(name, with_columns, dtype)
    raise ValueError(name)
