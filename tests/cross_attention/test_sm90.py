"""sm_90 compile tier for the cross_attention Triton kernels (no GPU needed).

Every launch ``mmkernels.cross_attention.kernels.compile_specs()`` lists (forward, backward with
one or several query blocks, every tile the heuristic can pick, bf16/fp16/fp32, D in
{64, 88, 96, 128}, padding and dropout) is compiled for sm_90a. Each must compile, use at most
227 KB of shared memory, not spill, and use tensor cores (wgmma/HGMMA, or mma.sync/HMMA where a
product has fewer than 64 rows), except exact fp32 (FMA units).
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from mmkernels.cross_attention import kernels as K  # noqa: E402
from mmkernels._triton import PTR  # noqa: E402
from mmkernels.testing import sm90  # noqa: E402
from tests.helpers.sm90_tier import Sm90Tier, reports  # noqa: E402, F401  (reports: the fixture)

JOBS = K.compile_specs()


class TestSm90(Sm90Tier):
    def check(self, rep, job):
        exact_fp32 = "-fp32-ieee-" in job.label
        sm90.assert_sm90_ok(rep, tensor_cores=not exact_fp32)
        if exact_fp32:  # "ieee" must really mean fp32 FMA, not TF32 tensor cores
            assert not rep.tensor_cores, rep.summary()


def test_every_heuristic_config_is_compiled():
    """The config the launchers pick for every (kind, dtype, precision, D, Lq) is compiled."""
    compiled = {(j.label.split("-")[0], j.constexprs["BLOCK_M"], j.constexprs["BLOCK_N"],
                 j.constexprs["BLOCK_D"], j.num_warps, j.num_stages, j.constexprs.get("ONE_M", True),
                 j.constexprs["INPUT_PRECISION"], j.signature["q_ptr"])
                for j in JOBS}
    for kind in K.KERNEL_KINDS:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for prec in K.input_precisions(dtype):
                for D in (64, 88, 96, 128):
                    for Lq in (1, 7, 16, 17, 32, 33, 64, 65, 100, 128, 129, 256, 300, 2000):
                        cfg = K.heuristic_config(kind, dtype, D, prec, Lq)
                        one_m = kind == "fwd" or Lq <= cfg.BLOCK_M
                        key = (kind, cfg.BLOCK_M, cfg.BLOCK_N, K.block_d(D), cfg.num_warps,
                               cfg.num_stages, one_m, prec, PTR[dtype])
                        assert key in compiled, (kind, dtype, prec, D, Lq, cfg)
