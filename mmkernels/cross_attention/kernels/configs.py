"""Launch configurations of the cross-attention kernels: the config type, the heuristic tile
table (chosen from the sm_90a compile reports of tests/cross_attention/test_sm90.py), the
candidates the compile tier covers, and the choice a launch makes (:func:`pick`)."""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from ... import tuning
from ..._triton import block_d, sm_count, triton_at_least

MAX_HEAD_DIM = 128
KERNEL_KINDS = ("fwd", "bwd")
#: the case keys a tuning override may match on (``queries``: Lq; see :mod:`mmkernels.tuning`)
TUNING_KEYS = ("dtype", "head_dim", "input_precision", "queries")


class XAttnConfig(NamedTuple):
    """Tiles and launch options of one cross-attention kernel."""

    BLOCK_M: int  # query rows per tile
    BLOCK_N: int  # key rows per tile
    num_warps: int
    num_stages: int


for _kind in KERNEL_KINDS:
    tuning.register_kind("cross_attention", _kind, XAttnConfig, keys=TUNING_KEYS)


def _block_m(Lq: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(int(Lq))))


def max_block_m(kind: str, dtype: torch.dtype, D: int, input_precision: str) -> int:
    """The largest BLOCK_M the launchers pick for (kind, dtype, D, precision)."""
    fma = dtype == torch.float32 and input_precision == "ieee"
    tf32 = dtype == torch.float32 and not fma
    if kind == "fwd":
        if fma:
            return 32
        if tf32:
            return 64 if block_d(D) <= 64 else 32
        return 128
    if kind == "bwd":
        if fma or tf32:
            return 16
        return 32 if block_d(D) <= 64 else 16
    raise ValueError(f"unknown kernel kind {kind!r}")


def heuristic_config(kind: str, dtype: torch.dtype, D: int, input_precision: str, Lq: int) -> XAttnConfig:
    """The tile configuration of kernel ``kind`` for (dtype, D, precision, query length).

    ``BLOCK_M`` is the next power of two of Lq (at least 16) up to :func:`max_block_m`.  The
    rest comes from the sm_90a compile reports (tests/cross_attention/test_sm90.py): no spills,
    shared memory within 227 KB, tensor cores for 16-bit inputs and for tf32.  The backward holds
    more than the forward (the transposed ``[BLOCK_N, BLOCK_M]`` tiles of S, dP, dS, the dk and dv
    tiles, and dq when one query block covers Lq), hence its smaller BLOCK_M.

    Triton >= 3.9 generates more register-hungry code for these kernels and has ptxas allocate
    with --regAllocOptLevel=2, so two of the default tiles spill there; on Triton >= 3.9
    (only) they are replaced by the largest tile that compiles for sm_90a with no spills:
    the 16-bit forward with BLOCK_M = 128 and D > 64 takes one stage instead of two (same
    tile). The exact-fp32 backward with D > 64 and one query block (dq in registers) takes 8
    warps on every Triton (its state spread over twice the threads; with 4 it spills once the
    row max and sum are read apart), as does the exact-fp32 forward at D = 64.
    """
    bd = block_d(D)
    bm = _block_m(Lq, max_block_m(kind, dtype, D, input_precision))
    fma = dtype == torch.float32 and input_precision == "ieee"  # exact fp32: FMA dot
    tf32 = dtype == torch.float32 and not fma
    if kind == "fwd":
        if fma:  # Triton < 3.9, D = 64: 8 warps (with 4, storing the row max and sum spills
            # with dropout); Triton >= 3.9 caps 8 warps at 64 registers and spills, 4 fit there
            return XAttnConfig(bm, 32 if bd <= 64 else 16,
                               8 if (bd == 64 and not triton_at_least(3, 9)) else 4, 2)
        if tf32:
            return XAttnConfig(bm, 32, 4, 2)
        stages = 1 if (bm == 128 and bd > 64 and triton_at_least(3, 9)) else 2
        return XAttnConfig(bm, 64, 8 if bm == 128 or (bd > 64 and bm == 64) else 4, stages)
    if kind == "bwd":
        one_m = Lq <= bm
        if fma:
            return XAttnConfig(bm, 16, 8 if (one_m and bd > 64) else 4, 1)
        if tf32:
            return XAttnConfig(bm, 64 if bd <= 64 else 16, 4, 1)
        if bd <= 64:
            return XAttnConfig(bm, 64, 4, 1)
        # D = 128: dq in registers (one query block) needs the second warpgroup
        return XAttnConfig(bm, 64, 8 if one_m else 4, 1)
    raise ValueError(f"unknown kernel kind {kind!r}")


#: query lengths that reach every configuration (each power of two, one past it, and a long one)
_LQ_PROBES = (1, 16, 17, 32, 33, 64, 65, 128, 129, 256, 300)


def candidate_launches(kind: str, dtype: torch.dtype, D: int, input_precision: str
                       ) -> list[tuple[XAttnConfig, bool]]:
    """Every (config, one query block) the launchers can pick for (kind, dtype, D, precision)."""
    out: list[tuple[XAttnConfig, bool]] = []
    for lq in _LQ_PROBES:
        c = heuristic_config(kind, dtype, D, input_precision, lq)
        key = (c, kind == "fwd" or lq <= c.BLOCK_M)
        if key not in out:
            out.append(key)
    return out


def candidate_configs(kind: str, dtype: torch.dtype, D: int, input_precision: str) -> list[XAttnConfig]:
    """Every configuration the launchers can pick for (kind, dtype, D, precision)."""
    out: list[XAttnConfig] = []
    for c, _ in candidate_launches(kind, dtype, D, input_precision):
        if c not in out:
            out.append(c)
    return out


def pairs_per_program(n_pairs: int, work_programs: int, device: torch.device) -> int:
    """(b, h) pairs per program: up to 8, keeping at least ~4 programs per SM in the launch."""
    target = 4 * sm_count(device)
    return max(1, min(8, (n_pairs * work_programs) // max(1, target)))


def pick(kind: str, dtype: torch.dtype, D: int, input_precision: str, Lq: int, config=None) -> XAttnConfig:
    """The config of one launch of ``kind``: ``config`` when given (an :class:`XAttnConfig`, or a
    dict kind -> XAttnConfig), else a :mod:`mmkernels.tuning` override matching the case, else
    :func:`heuristic_config`."""
    if isinstance(config, dict):
        config = config.get(kind)
    if config is None:
        config = tuning.lookup("cross_attention", kind, dtype=dtype, head_dim=D,
                               input_precision=input_precision, queries=Lq)
    if config is None:
        config = heuristic_config(kind, dtype, D, input_precision, Lq)
    return config
