"""Launch configurations of the attention kernels: the config type, the heuristic tile table
(chosen from the sm_90a compile reports of tests/attention/test_sm90.py), the candidates the
compile tier covers, and the choice a launch makes (:func:`pick`)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ... import tuning
from ..._triton import DTYPES, block_d, input_precisions, triton_at_least

MAX_HEAD_DIM = 256
KERNEL_KINDS = ("fwd", "bwd_pre", "bwd_dkdv", "bwd_dq")
#: the case keys a tuning override may match on (see :mod:`mmkernels.tuning`)
TUNING_KEYS = ("dtype", "head_dim", "input_precision", "has_mask")


class AttnConfig(NamedTuple):
    """Tiles and launch options of one attention kernel (``BLOCK_N`` is 0 for ``bwd_pre``)."""

    BLOCK_M: int  # query rows per tile
    BLOCK_N: int  # key rows per tile
    num_warps: int
    num_stages: int
    split: bool = False  # bwd_dkdv only: dv and dk in two launches (one fp32 accumulator each)


for _kind in KERNEL_KINDS:
    tuning.register_kind("attention", _kind, AttnConfig, keys=TUNING_KEYS)


# Triton >= 3.9 generates more register-hungry code for these kernels and has ptxas allocate
# with --regAllocOptLevel=2: the default tiles spill there for the cases listed
# below, so on Triton >= 3.9 those cases take the tile given here instead, the largest one that
# compiles for sm_90a with no spills, shared memory within 227 KB and the same tensor-core
# instructions (tests/attention/test_sm90.py compiles them).  BLOCK_M, num_warps and the
# dk/dv split are kept where a smaller BLOCK_N or BLOCK_M suffices.  Every other case, and
# every case on older Triton, keeps its tile.  (fp32-with-tf32 at D > 128 (forward with a mask,
# dq, dk/dv) and the masked 16-bit dk/dv at D > 128 have no known tile with wgmma that compiles
# without spills on Triton 3.9: those keep their tile.)
# Key: (kind, "16bit" | "tf32" | "fma", block_d(D), has_mask).
_TRITON39_TILES = {
    ("fwd", "16bit", 128, True): AttnConfig(128, 16, 8, 2),
    ("fwd", "16bit", 256, True): AttnConfig(64, 16, 8, 2),
    ("fwd", "tf32", 128, True): AttnConfig(64, 16, 4, 2),
    ("bwd_dq", "16bit", 128, True): AttnConfig(64, 32, 8, 2),
    # two warpgroups of 64 query rows: each holds what one held at 64 x 16 with 4 warps, and
    # ptxas fits it (the 4- and 8-warp 64 x 16 tiles both spill)
    ("bwd_dq", "16bit", 256, True): AttnConfig(128, 16, 8, 1),
    ("bwd_dkdv", "16bit", 128, True): AttnConfig(16, 64, 8, 2),
    ("bwd_dkdv", "16bit", 256, False): AttnConfig(16, 64, 8, 2, True),
    # exact fp32: same tile with two stages, which ptxas fits without spills
    ("bwd_dkdv", "fma", 128, False): AttnConfig(16, 32, 8, 2),
}


def heuristic_config(kind: str, dtype: torch.dtype, D: int, input_precision: str,
                     has_mask: bool = True) -> AttnConfig:
    """The tile configuration of kernel ``kind`` for (dtype, D, precision, masked or not).

    Chosen from the sm_90a compile reports (tests/attention/test_sm90.py): no spills, shared
    memory within 227 KB, wgmma for 16-bit inputs and for fp32 with tf32.  (ptxas allocates
    differently with and without the per-element mask code, hence ``has_mask``.)  With
    Triton >= 3.9 the cases of ``_TRITON39_TILES`` take the tile given there.
    """
    cfg = _heuristic_config_triton36(kind, dtype, D, input_precision, has_mask)
    if kind != "bwd_pre" and triton_at_least(3, 9):
        fma = dtype == torch.float32 and input_precision == "ieee"
        cls = "fma" if fma else ("tf32" if dtype == torch.float32 else "16bit")
        cfg = _TRITON39_TILES.get((kind, cls, block_d(D), bool(has_mask)), cfg)
    return cfg


def _heuristic_config_triton36(kind: str, dtype: torch.dtype, D: int, input_precision: str,
                               has_mask: bool) -> AttnConfig:
    """The tiles chosen from Triton 3.6's compile reports (see :func:`heuristic_config`)."""
    bd = block_d(D)
    fma = dtype == torch.float32 and input_precision == "ieee"  # exact fp32: FMA dot, no tensor cores
    tf32 = dtype == torch.float32 and not fma
    if kind == "bwd_pre":
        return AttnConfig(64 if bd <= 128 else 32, 0, 4, 1)
    if kind == "fwd":
        if fma:
            return AttnConfig(32, 32, 4, 2) if bd <= 64 else AttnConfig(32, 16, 4, 2)
        if tf32:
            return AttnConfig(64, 32, 4, 2) if bd <= 128 else AttnConfig(64, 32, 8, 2)
        if bd <= 64:
            return AttnConfig(128, 64, 8, 3)
        return AttnConfig(128, 64, 8, 2) if bd <= 128 else AttnConfig(64, 64, 8, 2)
    if kind == "bwd_dkdv":
        # products are [BLOCK_N, *]: BLOCK_N = 64 rows per warpgroup for wgmma; two fp32
        # [BLOCK_N, BLOCK_D] accumulators, split into two launches when they do not fit
        if fma:
            return AttnConfig(16, 32, 8, 1)
        if tf32:
            if bd <= 64:
                return AttnConfig(32, 64, 4, 1)
            if bd <= 128:
                return AttnConfig(16, 64, 4, 1, True)
            return AttnConfig(16, 64, 8 if has_mask else 4, 1, True)
        if bd <= 64:
            return AttnConfig(32, 64, 4, 2)
        return AttnConfig(32, 64, 8, 2) if bd <= 128 else AttnConfig(32, 64, 8, 2, True)
    if kind == "bwd_dq":
        if fma:
            return AttnConfig(16, 16, 4, 1)
        if tf32:
            return AttnConfig(64, 16, 8 if (has_mask and bd > 128) else 4, 1)
        if bd <= 64:
            return AttnConfig(64, 64, 4, 2)
        return AttnConfig(64, 64, 8, 2) if bd <= 128 else AttnConfig(64, 16, 4, 1)
    raise ValueError(f"unknown kernel kind {kind!r}")


def dkdv_parts(config: AttnConfig) -> tuple[int, ...]:
    """Values of PART the dk/dv launcher runs with ``config``: (0,) or (1, 2) when split."""
    return (1, 2) if config.split else (0,)


def candidate_configs(kind: str, dtype: torch.dtype | None = None, D: int | None = None,
                      input_precision: str | None = None,
                      has_mask: bool | None = None) -> list[AttnConfig]:
    """Every configuration the launchers can pick for ``kind`` (deduplicated).

    Leave out dtype / D / precision / has_mask to take the union over all of them (D only
    matters through its padded size ``block_d(D)``: 16, 32, 64, 128, 256).
    """
    dtypes = DTYPES if dtype is None else (dtype,)
    Ds = (16, 32, 64, 128, 256) if D is None else (D,)
    out: list[AttnConfig] = []
    for dt in dtypes:
        for prec in (input_precisions(dt) if input_precision is None else (input_precision,)):
            for d in Ds:
                for hm in ((True, False) if has_mask is None else (has_mask,)):
                    c = heuristic_config(kind, dt, d, prec, hm)
                    if c not in out:
                        out.append(c)
    return out


def pick(kind: str, dtype: torch.dtype, D: int, input_precision: str, has_mask: bool,
         config=None) -> AttnConfig:
    """The config of one launch of ``kind``: ``config`` when given (an :class:`AttnConfig`, or a
    dict kind -> AttnConfig), else a :mod:`mmkernels.tuning` override matching the case, else
    :func:`heuristic_config`."""
    if isinstance(config, dict):
        config = config.get(kind)
    if config is None:
        config = tuning.lookup("attention", kind, dtype=dtype, head_dim=D,
                               input_precision=input_precision, has_mask=bool(has_mask))
    if config is None:
        config = heuristic_config(kind, dtype, D, input_precision, has_mask)
    return config
