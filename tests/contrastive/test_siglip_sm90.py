"""sm_90 compile tier for the SigLIP Triton kernels (no GPU needed).

Every kernel at every configuration the launchers can pick (each dtype, input precision and
class of D: its BLOCK_K, the features per backward program, D = 1 and D not a multiple of 16,
which Triton specialises) is compiled for sm_90a. Each must compile, use at most 227 KB of
shared memory, not spill, and run its tile loops on wgmma/HGMMA, except exact ("ieee") fp32,
which runs on FMA units, and the sum of the backward's scalar shares, which has no products.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from mmkernels._triton import input_precisions  # noqa: E402
from mmkernels.contrastive.siglip import kernels as SK  # noqa: E402
from mmkernels.testing import sm90  # noqa: E402
from tests.helpers.sm90_tier import Sm90Tier, launch_grid, reports  # noqa: E402, F401  (reports: the fixture)

D_VALUES = (1, 8, 16, 24, 32, 40, 64, 88, 128, 200, 512, 1536)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


# program counts: whether they divide by 16 only changes integer index arithmetic
_COUNTS = ("n_dq_progs", "n_d_chunks")


def _spec_key(kind, dtype, prec, cfg, D):
    """What the compiled code depends on: the constexprs (D = 1 and one feature chunk among
    them), the divisibility hints (but those of program counts) and the launch options."""
    kernel, sig, constexprs, div = SK.compile_specs(kind, dtype, D, prec, cfg)
    return (kind, dtype, prec, tuple(sorted(constexprs.items())),
            tuple(sorted(d for d in div if d not in _COUNTS)), cfg.num_warps, cfg.num_stages)


def _jobs():
    jobs, seen = [], set()
    for kind, dtype, prec, D in launch_grid(SK.KINDS, DTYPES, input_precisions, D_VALUES):
        for cfg in SK.candidate_configs(kind, dtype, D, prec):
            key = _spec_key(kind, dtype, prec, cfg, D)
            if key in seen:
                continue
            seen.add(key)
            kernel, sig, constexprs, div = SK.compile_specs(kind, dtype, D, prec, cfg)
            bd = f"-bd{constexprs['BLOCK_D']}" if "BLOCK_D" in constexprs else ""
            if constexprs.get("n_d_chunks") == 1:
                bd += "-1chunk"
            d_class = "D1" if D == 1 else ("D%16" if D % 16 == 0 else f"D{D}")
            label = (f"{kind}-{_DT[dtype]}-{prec}-{d_class}-"
                     f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K}{bd}-w{cfg.num_warps}-s{cfg.num_stages}")
            jobs.append(sm90.CompileJob(kernel, sig, constexprs, cfg.num_warps, cfg.num_stages, div,
                                        label=label))
    kernel, sig, constexprs, div = SK.compile_specs("siglip_sum")
    jobs.append(sm90.CompileJob(kernel, sig, constexprs, SK.SUM_NUM_WARPS, 1, div,
                                label="light-siglip_sum"))
    return jobs


JOBS = _jobs()


class TestSiglipSm90(Sm90Tier):
    def check(self, rep, job):
        if job.label.startswith("light-"):  # no products: no tensor cores expected
            sm90.assert_sm90_ok(rep)
            return
        exact_fp32 = "-fp32-ieee-" in job.label
        sm90.assert_sm90_ok(rep, wgmma=not exact_fp32)
        if exact_fp32:  # "ieee" must really mean fp32 FMA, not TF32 tensor cores
            assert not rep.tensor_cores, rep.summary()


def test_every_default_config_is_compiled():
    """The launchers' choice for any D falls in a compiled class: each (kind, dtype, precision,
    D) below has the specialisation of one of the jobs."""
    compiled = set()
    for kind, dtype, prec, D in launch_grid(SK.KINDS, DTYPES, input_precisions, D_VALUES):
        for cfg in SK.candidate_configs(kind, dtype, D, prec):
            compiled.add(_spec_key(kind, dtype, prec, cfg, D))
    assert len(compiled) == len(JOBS) - 1
    for kind, dtype, prec, D in launch_grid(SK.KINDS, DTYPES, input_precisions,
                                            (2, 7, 17, 33, 48, 96, 100, 120, 130, 200, 1152, 4096)):
        for cfg in SK.candidate_configs(kind, dtype, D, prec):
            assert _spec_key(kind, dtype, prec, cfg, D) in compiled, (kind, dtype, prec, D, cfg)
