"""Triton kernels of the contrastive family: ``jit`` (the kernels), ``launch`` (their
launchers), ``configs`` (tiles and tuning registration), ``specs`` (the compile tier's view).

The contract is in ``ops.py``; the algorithm (tiled online log-sum-exp forward, G recomputed in
bounded blocks for cuBLAS in the backward) is described in docs/architecture.md.
"""

from __future__ import annotations

from ..._triton import input_precision, input_precisions
from .configs import (AUTOTUNE_BOUNDS, BWD_COL_CHUNK, BWD_ROW_CHUNK, FORWARD_MODES, KERNEL_KINDS,
                      TileConfig, autotune_configs, block_bounds, candidate_configs, forward_mode,
                      heuristic_config, resolve_config)
from .jit import grad_kernel, stats_kernel
from .launch import (contrastive_grads_triton, contrastive_stats_triton, cols_per_split,
                     merge_row_parts)
from .specs import compile_specs

# the name bench/tune_gpu.py calls
_resolve_config = resolve_config

__all__ = [
    "AUTOTUNE_BOUNDS", "BWD_COL_CHUNK", "BWD_ROW_CHUNK", "FORWARD_MODES", "KERNEL_KINDS",
    "TileConfig", "autotune_configs", "block_bounds", "candidate_configs", "cols_per_split",
    "compile_specs", "contrastive_grads_triton", "contrastive_stats_triton", "forward_mode",
    "grad_kernel", "heuristic_config", "input_precision", "input_precisions", "merge_row_parts",
    "resolve_config", "stats_kernel",
]
