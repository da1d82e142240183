"""The exact specialisation a contrastive launch would produce, for the sm_90 compile tier
(``mmkernels.testing.sm90``)."""

from __future__ import annotations

import torch

from ..._triton import PTR
from .configs import BWD_COL_CHUNK, BWD_ROW_CHUNK, TileConfig
from .jit import grad_kernel, stats_kernel


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
    elif kind == "grad":
        kernel = grad_kernel
        sig = {
            "q_ptr": ptr, "k_ptr": ptr, "scale_ptr": "*fp32", "tgt_ptr": "*i64",
            "row_lse_ptr": "*fp32", "g_row_lse_ptr": "*fp32", "g_row_sum_ptr": "*fp32",
            "g_pos_ptr": "*fp32", "col_lse_ptr": "*fp32", "g_col_lse_ptr": "*fp32",
            "g_col_sum_ptr": "*fp32", "g_out_ptr": ptr, "part_ptr": "*fp32", "g_mul_ptr": "*fp32",
        }
        ints = {"n_rows": BWD_ROW_CHUNK, "n_cols": BWD_COL_CHUNK, "D": D, "col_offset": big,
                "stride_qn": D, "stride_qd": 1, "stride_kn": D, "stride_kd": 1, "stride_t": 1,
                "stride_gm": BWD_COL_CHUNK, "stride_gn": 1}
    else:
        raise ValueError(kind)
    constexprs = {"WITH_COLUMNS": bool(with_columns), "INPUT_PRECISION": input_precision,
                  "DOT_UPCAST": False,
                  "BLOCK_M": config.BLOCK_M, "BLOCK_N": config.BLOCK_N,
                  "BLOCK_K": config.BLOCK_K}
    from ...testing.sm90 import launch_signature
    return (kernel, *launch_signature(sig, ints, constexprs))
