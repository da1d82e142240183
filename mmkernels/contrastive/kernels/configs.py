"""Tile configurations of the contrastive kernels and their tuning registration.

A launch takes its config from, in order: the launcher's ``config=`` argument, an override set
through :mod:`mmkernels.tuning` (kinds ``contrastive/stats`` and ``contrastive/grad``; the
SigLIP kernels' ``contrastive/siglip_rows`` and ``contrastive/siglip_grads``), the autotuner
when the option ``contrastive.autotune`` is on (GPU only, the stats kernel), else the heuristic.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from ... import tuning
from ..._triton import DTYPES, input_precisions, interpreting, triton_at_least

# Elements per program of finalize_kernel (row merges and column log-sum-exps).
FINALIZE_BLOCK = 1024

KERNEL_KINDS = ("stats", "grad")
#: the SigLIP unit's launch kinds (contrastive/siglip/kernels.py): tuned through this family
SIGLIP_KINDS = ("siglip_rows", "siglip_grads")
#: the itc unit's launch kinds (contrastive/itc/kernels.py; ``BLOCK_M`` counts product rows,
#: items times their tokens)
ITC_KINDS = ("itc_rows", "itc_grads", "itc_negatives")
FORWARD_MODES = ("one_pass", "two_pass")


class TileConfig(NamedTuple):
    """One launch's tiles: ``BLOCK_M`` rows x ``BLOCK_N`` columns, ``BLOCK_K`` features per
    step of the K-loop, and Triton's ``num_warps`` / ``num_stages``."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


def _check_forward(value) -> str:
    if value not in FORWARD_MODES:
        raise ValueError(f"contrastive.forward must be one of {FORWARD_MODES}, got {value!r}")
    return value


def _check_flag(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"contrastive.autotune must be True or False, got {value!r}")
    return value


for _kind in KERNEL_KINDS + SIGLIP_KINDS + ITC_KINDS:
    tuning.register_kind("contrastive", _kind, TileConfig, keys=("dtype", "dim", "input_precision"))
tuning.register_option(
    "contrastive.forward", "one_pass", _check_forward,
    "how the forward gets column statistics: 'one_pass' merges each tile's column statistics "
    "under a lock; 'two_pass' runs a second, rows-only launch on the transposed problem")
tuning.register_option(
    "contrastive.autotune", False, _check_flag,
    "let Triton's autotuner pick the tiles among autotune_configs() (GPU only) instead of the "
    "heuristic; explicit configs and tuning overrides still win")


BACKWARD_MODES = ("auto", "one_grid", "blocks")
#: feature chunks up to which ``auto`` keeps the one-grid backward (each chunk recomputes the logits)
ONE_GRID_MAX_CHUNKS = 2


def _check_backward(value) -> str:
    if value not in BACKWARD_MODES:
        raise ValueError(f"contrastive.backward must be one of {BACKWARD_MODES}, got {value!r}")
    return value


tuning.register_option(
    "contrastive.backward", "auto", _check_backward,
    "how the fused kernels compute dq and dk: 'one_grid' in one grad_kernel launch (each program "
    "owns a feature chunk and recomputes its logits per chunk); 'blocks' as cuBLAS GEMMs over "
    "row blocks of the logits within memory_budget, the softmax arithmetic in one light kernel "
    "per block (the blockwise path's backward); 'auto' one_grid while D needs at most "
    f"{ONE_GRID_MAX_CHUNKS} feature chunks, else blocks")


def backward_mode(D: int, block_d: int) -> str:
    """``"one_grid"`` or ``"blocks"`` for features of width ``D`` split in chunks of ``block_d``."""
    mode = tuning.option("contrastive.backward")
    if mode != "auto":
        return mode
    return "one_grid" if triton.cdiv(max(int(D), 1), block_d) <= ONE_GRID_MAX_CHUNKS else "blocks"


def forward_mode() -> str:
    """The option ``contrastive.forward``: ``"one_pass"`` (default) or ``"two_pass"``."""
    return tuning.option("contrastive.forward")


def _block_k(dtype: torch.dtype, D: int, input_precision: str) -> int:
    if dtype == torch.float32 and input_precision == "ieee":
        return 16  # FMA dot: a thin K slice keeps the operand registers down
    cap = 32 if dtype == torch.float32 else 64
    return max(16, min(cap, triton.next_power_of_2(max(int(D), 1))))


def _triton39_unaligned(dtype: torch.dtype, D: int, input_precision: str) -> bool:
    """Whether (dtype, D, precision) takes the Triton >= 3.9 tiles below.

    Triton >= 3.9 generates more register-hungry code for the statistics kernel and has ptxas
    allocate with --regAllocOptLevel=2: when D is not a multiple of 16 (no divisible-by-16
    specialisation of D and the row strides) and BLOCK_K is at its cap, the tiles older Triton
    compiles without spills spill with column statistics. Those cases take the largest tiles
    that compile for sm_90a with no spills (tests/contrastive/test_sm90.py): BLOCK_K 32
    instead of 64 for 16-bit inputs; for fp32 with tf32 BLOCK_M 64 instead of 128 (or BLOCK_N
    32 instead of 64) with 8 warps, and BLOCK_K 16 instead of 32 with 4 warps; 8 warps for the
    exact-fp32 BLOCK_K = 32 candidate. Every other case, and every case on older Triton, is
    unchanged.
    """
    if D % 16 == 0 or not triton_at_least(3, 9):
        return False
    if dtype == torch.float32 and input_precision == "ieee":
        return True
    return _block_k(dtype, D, input_precision) == (32 if dtype == torch.float32 else 64)


def heuristic_config(dtype: torch.dtype, D: int, input_precision: str) -> TileConfig:
    """The tiles used without an explicit config, an override or the autotuner.

    Chosen from the sm_90a compile reports (tests/contrastive/test_sm90.py): 128 x 64 tiles
    with 8 warps (two warpgroups of m64n64 wgmma) keep both kernels, column statistics
    included, well below 255 registers with no spills; 128 x 128 sits at the limit and spills
    when D is not a multiple of 16.
    """
    bk = _block_k(dtype, D, input_precision)
    if dtype == torch.float32 and input_precision == "ieee":
        # exact fp32 products: no tensor cores, FMA dot (with 8 warps ptxas caps these kernels'
        # registers per thread, and they spill when D % 16 != 0); Triton >= 3.9 with D % 16 != 0:
        # one stage (two spill once the rows kernel keeps its sums relative to the max)
        return TileConfig(32, 64, bk, 4, 1 if _triton39_unaligned(dtype, D, input_precision) else 2)
    if _triton39_unaligned(dtype, D, input_precision):
        return TileConfig(64, 64, 32, 8, 3) if dtype == torch.float32 else TileConfig(128, 64, 32, 8, 3)
    return TileConfig(128, 64, bk, 8, 3)


def autotune_configs(dtype: torch.dtype, D: int, input_precision: str) -> list[TileConfig]:
    """The configurations the autotuner tries (option ``contrastive.autotune``, GPU only)."""
    bk = _block_k(dtype, D, input_precision)
    if dtype == torch.float32 and input_precision == "ieee":
        # (64x32x16 and 32x32x32 spill a few bytes with Triton 3.9's ptxas)
        if _triton39_unaligned(dtype, D, input_precision):
            return [TileConfig(32, 64, bk, 4, 1), TileConfig(32, 64, 32, 8, 2)]
        return [TileConfig(32, 64, bk, 4, 2), TileConfig(32, 64, 32, 4, 2)]
    if _triton39_unaligned(dtype, D, input_precision):
        if dtype == torch.float32:
            return [TileConfig(64, 64, 32, 8, 3), TileConfig(128, 32, 32, 8, 3),
                    TileConfig(64, 64, 16, 4, 3), TileConfig(64, 64, 16, 4, 4)]
        return [TileConfig(128, 64, 32, 8, 3), TileConfig(128, 64, 32, 8, 4),
                TileConfig(64, 64, 32, 4, 3), TileConfig(64, 64, 32, 4, 4)]
    return [
        TileConfig(128, 64, bk, 8, 3),
        TileConfig(128, 64, bk, 8, 4),
        TileConfig(64, 64, bk, 4, 3),
        TileConfig(64, 64, bk, 4, 4),
    ]


def candidate_configs(dtype: torch.dtype | None = None, D: int | None = None,
                      input_precision: str | None = None, autotune: bool = True) -> list[TileConfig]:
    """Every configuration the launchers can pick by themselves, deduplicated.

    With all three arguments: the heuristic config plus the autotune list for that
    (dtype, D, precision). Leave any of them out to take the union over every dtype / every
    precision / every BLOCK_K class of D.
    """
    dtypes = DTYPES if dtype is None else (dtype,)
    Ds = (16, 32, 64) if D is None else (D,)  # D only matters through BLOCK_K
    out: list[TileConfig] = []
    for dt in dtypes:
        precs = input_precisions(dt) if input_precision is None else (input_precision,)
        for prec in precs:
            for d in Ds:
                out.append(heuristic_config(dt, d, prec))
                if autotune:
                    out += autotune_configs(dt, d, prec)
    return list(dict.fromkeys(out))


def _block_bounds() -> tuple[int, int, int]:
    """(smallest BLOCK_M, smallest BLOCK_N, largest BLOCK_N) over every configuration."""
    cs = candidate_configs()
    return (min(c.BLOCK_M for c in cs), min(c.BLOCK_N for c in cs), max(c.BLOCK_N for c in cs))


AUTOTUNE_BOUNDS = _block_bounds()


def resolve_config(dtype: torch.dtype, D: int, input_precision: str, config: TileConfig | None,
                   kind: str = "stats", heuristic=None) -> TileConfig | None:
    """The config a ``kind`` launch uses, or None when the autotuner picks (see the module).

    ``heuristic(dtype, D, input_precision)``: the default of a kind this module has no table
    for (the SigLIP kernels'), which is never autotuned.
    """
    if config is not None:
        return config
    override = tuning.lookup("contrastive", kind, dtype=dtype, dim=int(D),
                             input_precision=input_precision)
    if override is not None:
        return override
    if heuristic is not None:
        return heuristic(dtype, D, input_precision)
    if kind == "grad":
        return grad_config(dtype, D, input_precision)
    if tuning.option("contrastive.autotune") and not interpreting():
        return None
    return heuristic_config(dtype, D, input_precision)


def grad_config(dtype: torch.dtype, D: int, input_precision: str) -> TileConfig:
    """The tiles of ``grad_kernel`` without an explicit config or override (it is not
    autotuned): it holds a logit tile, G, their exponentials and an fp32 accumulator at once,
    so its tiles are smaller than the forward's: 64 rows against 32 rows per step with 4
    warps (32 x 32 for exact fp32 on FMA units), compiled without spills for sm_90a."""
    bk = min(32, _block_k(dtype, D, input_precision))
    if dtype == torch.float32 and input_precision == "ieee":
        return TileConfig(32, 32, 16, 4, 2)
    return TileConfig(64, 32, bk, 4, 2)


def grad_block_d(D: int, config: TileConfig) -> int:
    """Features per program of ``grad_kernel``: its fp32 accumulator is BLOCK_M x BLOCK_D,
    kept to 16 values per thread so that it, the logit tile and G stay in registers without
    spills (tests/contrastive/test_sm90.py); a larger D is split across programs, each
    recomputing its logits."""
    cap = max(16, 16 * 32 * config.num_warps // config.BLOCK_M)
    return max(16, min(cap, 128, triton.next_power_of_2(max(int(D), 1))))


def block_bounds(config: TileConfig | None) -> tuple[int, int, int]:
    """(min BLOCK_M, min BLOCK_N, max BLOCK_N) that buffers must be sized for (None: the
    autotuner's, i.e. every candidate's)."""
    if config is None:
        return AUTOTUNE_BOUNDS
    return config.BLOCK_M, config.BLOCK_N, config.BLOCK_N
