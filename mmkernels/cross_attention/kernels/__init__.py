"""Triton kernels for few-query cross-attention (contract: ``ops.py``).

``cross_attention_fwd_triton(q, k, v, key_padding_mask, seed, scale, dropout_p) -> (out, lse,
row_max, row_sum)`` and ``cross_attention_bwd_triton(q, k, v, out, row_max, row_sum, dout,
key_padding_mask, seed, scale, dropout_p) -> (dq, dk, dv)``; the math is that of :mod:`mmkernels.cross_attention.reference`.
Modules: :mod:`.jit` (the kernels), :mod:`.configs` (tiles, tuning kinds), :mod:`.launch`
(launchers), :mod:`.specs` (compile tier).
"""
from __future__ import annotations

from ..._triton import block_d, input_precision, input_precisions
from .configs import (KERNEL_KINDS, MAX_HEAD_DIM, TUNING_KEYS, XAttnConfig, candidate_configs,
                      candidate_launches, heuristic_config, max_block_m, pairs_per_program, pick)
from .jit import xattn_bwd_kernel, xattn_fwd_kernel
from .launch import cross_attention_bwd_triton, cross_attention_fwd_triton
from .specs import COMPILE_HEAD_DIMS, compile_spec, compile_specs

__all__ = ["COMPILE_HEAD_DIMS", "KERNEL_KINDS", "MAX_HEAD_DIM", "TUNING_KEYS", "XAttnConfig", "block_d",
           "candidate_configs", "candidate_launches", "compile_spec", "compile_specs",
           "cross_attention_bwd_triton", "cross_attention_fwd_triton", "heuristic_config", "input_precision",
           "input_precisions", "max_block_m", "pairs_per_program", "pick", "xattn_bwd_kernel",
           "xattn_fwd_kernel"]
