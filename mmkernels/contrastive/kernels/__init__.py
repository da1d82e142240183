"""Triton kernels of the contrastive family: ``jit`` (the kernels), ``launch`` (their
launchers), ``configs`` (tiles and tuning registration), ``specs`` (the compile tier's view).

The contract is in ``ops.py``; the algorithm (tiled online log-sum-exp forward, one backward grid
recomputing the logits) is described in docs/architecture.md.
"""

from __future__ import annotations

from ..._triton import input_precision, input_precisions
from .configs import (AUTOTUNE_BOUNDS, FINALIZE_BLOCK, FORWARD_MODES, KERNEL_KINDS, TileConfig,
                      autotune_configs, block_bounds, candidate_configs, forward_mode,
                      grad_block_d, grad_config, heuristic_config, resolve_config)
from .jit import finalize_kernel, grad_kernel, stats_kernel
from .launch import contrastive_grads_triton, contrastive_stats_triton, cols_per_split
from .specs import compile_specs

# the name bench/tune_gpu.py calls
_resolve_config = resolve_config

__all__ = [
    "AUTOTUNE_BOUNDS", "FINALIZE_BLOCK", "FORWARD_MODES", "KERNEL_KINDS", "TileConfig",
    "autotune_configs", "block_bounds", "candidate_configs", "cols_per_split", "compile_specs",
    "contrastive_grads_triton", "contrastive_stats_triton", "finalize_kernel", "forward_mode",
    "grad_block_d", "grad_config", "grad_kernel", "heuristic_config", "input_precision", "input_precisions",
    "resolve_config", "stats_kernel",
]
