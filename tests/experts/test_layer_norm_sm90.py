"""sm_90 compile tier for the per-modality LayerNorm's Triton kernels (no GPU needed).

Every launch kind (``NORM_KINDS``) at the tiles ``norm_config`` picks, for model widths, odd
widths and the widest rows (one width per BLOCK_H class), E = 8 and E = 1, is compiled for
sm_90a. Each must compile, use at most 227 KB of shared memory and not spill.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from mmkernels.experts.layer_norm import kernels as NK  # noqa: E402
from mmkernels.testing import sm90  # noqa: E402
from tests.helpers.sm90_tier import Sm90Tier, reports  # noqa: E402, F401  (reports: the fixture)

_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
WIDTHS = (768, 1024, 4096, 97, 16384, 12289)  # every dtype, bias, backward variant
# one odd width per remaining BLOCK_H class (the worst case for registers), 8192 (aligned
# column parts) and 8196 (rows 8-byte aligned in bf16: the backward's unaligned parts with
# ALIGN = 4): bf16 and fp32
CLASS_WIDTHS = (13, 29, 37, 255, 511, 2047, 8191, 8192, 8196)
# (needs_dx, has_dw) of the backward launches
BWD_VARIANTS = {"dx-dw": (True, True), "dx": (True, False), "dw": (False, True)}


def _job(kind, dtype, H, bias, E=8, variant="dx-dw", param_dtype=None):
    needs_dx, has_dw = BWD_VARIANTS[variant]
    kernel, sig, constexprs, div, warps, stages = NK.norm_compile_specs(
        kind, dtype, H, bias, E=E, needs_dx=needs_dx, has_dw=has_dw, param_dtype=param_dtype)
    label = f"{kind}-{_DT[dtype]}-H{H}-{'bias' if bias else 'nobias'}-E{E}"
    if kind == "ln_bwd":
        label += f"-{variant}"
    if param_dtype is not None:
        label += f"-params{_DT[param_dtype]}"
    return sm90.CompileJob(kernel, sig, constexprs, warps, stages, div, label=label)


def _jobs():
    jobs = []
    for H in WIDTHS:
        # bf16: every launch variant; fp16 (the same code with another element type) and fp32
        # (twice the bytes a row: the register-heaviest loads): the forward and the full backward
        for bias in (False, True):
            jobs.append(_job("ln_fwd", torch.bfloat16, H, bias))
            jobs.append(_job("ln_dw_reduce", torch.bfloat16, H, bias))
            jobs.append(_job("ln_bwd", torch.bfloat16, H, bias, variant="dx-dw"))
            jobs.append(_job("ln_bwd", torch.bfloat16, H, bias, variant="dw"))
        jobs.append(_job("ln_bwd", torch.bfloat16, H, False, variant="dx"))  # no partial sums: no bias
        for dtype in (torch.float16, torch.float32):
            jobs.append(_job("ln_fwd", dtype, H, True))
            jobs.append(_job("ln_bwd", dtype, H, True, variant="dx-dw"))
            jobs.append(_job("ln_dw_reduce", dtype, H, True))
    for H in CLASS_WIDTHS:
        for dtype in (torch.bfloat16, torch.float32):
            jobs.append(_job("ln_fwd", dtype, H, True))
            jobs.append(_job("ln_bwd", dtype, H, True))
    for kind in NK.NORM_KINDS:  # one expert (mask 1 -> constexpr); fp32 parameters beside bf16
        jobs.append(_job(kind, torch.bfloat16, 768, True, E=1))
        jobs.append(_job(kind, torch.bfloat16, 768, True, param_dtype=torch.float32))
    return jobs


JOBS = _jobs()


class TestSm90(Sm90Tier):
    """Each job compiles, does not spill and uses at most 227 KB of shared memory (the default check)."""


def test_every_norm_config_is_compiled():
    """The forward and backward launch shape ``norm_config`` gives every width 1..MAX_NORM_H
    (it depends on BLOCK_H and, above 4096, the rows' alignment only) is among the compiled
    jobs."""
    fwd = {(j.constexprs["BLOCK_H"], j.constexprs["ROWS"], j.num_warps) for j in JOBS
           if j.label.startswith("ln_fwd-")}
    bwd = {(j.constexprs["BLOCK_P"], j.constexprs["SPLIT"], j.constexprs["ROWS"], j.num_warps)
           for j in JOBS if j.label.startswith("ln_bwd-")}
    block = 16
    while block <= NK.MAX_NORM_H:
        for H in {max(1, block // 2 + 1), block} if block > 16 else {1, 16}:
            for aligned in (True, False):
                cfg = NK.norm_config(H, aligned)
                assert (cfg.BLOCK_H, cfg.fwd_rows, cfg.fwd_warps) in fwd, (H, cfg)
                assert (cfg.BLOCK_P, cfg.bwd_split, cfg.bwd_rows, cfg.bwd_warps) in bwd, (H, cfg)
        block *= 2
