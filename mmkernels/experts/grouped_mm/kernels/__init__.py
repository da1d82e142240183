"""Triton kernels of the modality grouped GEMM (contract: ``../ops.py``).

Modules: :mod:`.jit_mm` (the grouped GEMM with its fused epilogues), :mod:`.jit_wgrad` (the
weight and bias gradients), :mod:`.configs` (launch kinds, tiles, tuning kinds), :mod:`.launch`
(launchers), :mod:`.specs` (compile tier).
"""
from __future__ import annotations

from . import configs
from .jit_mm import grouped_mm_kernel, round_bf16
from .jit_wgrad import grouped_wgrad_kernel
from .launch import (ffn_bwd_triton, ffn_fwd_triton, launch_grouped_mm, launch_wgrad, linear_bwd_triton,
                     linear_fwd_triton, offsets_fit_int32, weight_strides, weight_t_strides)
from .specs import compile_specs

__all__ = ["compile_specs", "configs", "ffn_bwd_triton", "ffn_fwd_triton", "grouped_mm_kernel",
           "grouped_wgrad_kernel", "launch_grouped_mm", "launch_wgrad", "linear_bwd_triton",
           "linear_fwd_triton", "offsets_fit_int32", "round_bf16", "weight_strides", "weight_t_strides"]
