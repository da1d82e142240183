"""Triton kernels for multimodal masked attention (contract: ``ops.py`` and docs/architecture.md).

``attention_fwd_triton(q, k, v, meta, scale) -> (out, lse, row_max, row_sum)`` and
``attention_bwd_triton(q, k, v, out, row_max, row_sum, dout, meta, scale) -> (dq, dk, dv)``; ``meta`` is
``[]`` (full attention) or the 9 metadata tensors of a
:class:`~mmkernels.attention.mask.MultimodalMask`. Modules: :mod:`.jit` (the kernels),
:mod:`.configs` (tiles, tuning kinds), :mod:`.launch` (launchers), :mod:`.specs` (compile tier).
"""
from __future__ import annotations

from ..._triton import block_d, input_precision, input_precisions
from .configs import (KERNEL_KINDS, MAX_HEAD_DIM, TUNING_KEYS, AttnConfig, candidate_configs, dkdv_parts,
                      heuristic_config, pick)
from .jit import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel, attn_fwd_kernel
from .launch import attention_bwd_triton, attention_fwd_triton, mask_from_meta
from .specs import compile_specs

__all__ = ["AttnConfig", "KERNEL_KINDS", "MAX_HEAD_DIM", "TUNING_KEYS", "attention_bwd_triton",
           "attention_fwd_triton", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel", "attn_bwd_preprocess_kernel",
           "attn_fwd_kernel", "block_d", "candidate_configs", "compile_specs", "dkdv_parts", "heuristic_config",
           "input_precision", "input_precisions", "mask_from_meta", "pick"]
