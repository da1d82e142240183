"""sm_90 compile tier for the contrastive Triton kernels (no GPU needed).

Every kernel at every configuration the launchers can pick (each dtype, input precision,
BLOCK_K and alignment class of D, with and without column statistics) is compiled for sm_90a.
Each must compile, use at most 227 KB of shared memory, not spill, and use wgmma/HGMMA, except
exact ("ieee") fp32, which runs on FMA units, and the light kernels (finalize, the blockwise
block kernels, the loss epilogue), which have no products.
"""
from __future__ import annotations


import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from mmkernels.contrastive import kernels as K  # noqa: E402
from mmkernels.testing import sm90  # noqa: E402
from tests.helpers.sm90_tier import Sm90Tier, launch_grid, reports  # noqa: E402, F401  (reports: the fixture)

# D values: D only reaches the compiled code through BLOCK_K and through
# Triton's divisible-by-16 specialisation of D and the row strides.
D_VALUES = (16, 32, 64, 88, 512, 768, 1536)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _jobs():
    jobs, seen = [], set()
    for kind, dtype, prec, D in launch_grid(K.KERNEL_KINDS, DTYPES, K.input_precisions, D_VALUES):
        for wc in (False, True):
            cfgs = ([K.grad_config(dtype, D, prec)] if kind == "grad"
                    else K.candidate_configs(dtype, D, prec))
            for cfg in cfgs:
                key = (kind, dtype, prec, wc, cfg, D % 16 == 0)
                if key in seen:
                    continue
                seen.add(key)
                kernel, sig, constexprs, div = K.compile_specs(kind, dtype, D, wc, prec, cfg)
                label = (f"{kind}-{_DT[dtype]}-{prec}-{'cols' if wc else 'rows'}-"
                         f"{'D%16' if D % 16 == 0 else 'D' + str(D)}-"
                         f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K}-w{cfg.num_warps}-s{cfg.num_stages}")
                jobs.append(sm90.CompileJob(kernel, sig, constexprs, cfg.num_warps, cfg.num_stages, div,
                                            label=label))
    for name in K.specs.LIGHT_KERNELS:
        for wc in (False, True):
            for dtype in (DTYPES if name in ("block_grad", "epilogue_fwd", "epilogue_bwd")
                          else (torch.float32,)):
                kernel, sig, constexprs, div, warps = K.specs.light_specs(name, wc, dtype)
                jobs.append(sm90.CompileJob(kernel, sig, constexprs, warps, 1, div,
                                            label=f"light-{name}-{_DT[dtype]}-"
                                                  f"{'cols' if wc else 'rows'}"))
    return jobs


JOBS = _jobs()


class TestSm90(Sm90Tier):
    def check(self, rep, job):
        if job.label.startswith("light-"):  # no products: no tensor cores expected
            sm90.assert_sm90_ok(rep, wgmma=False)
            return
        exact_fp32 = "-fp32-ieee-" in job.label
        sm90.assert_sm90_ok(rep, wgmma=not exact_fp32)
        if exact_fp32:  # "ieee" must really mean fp32 FMA, not TF32 tensor cores
            assert not rep.tensor_cores, rep.summary()


def test_default_configs_are_compiled():
    """The heuristic config of every (dtype, precision, D) is among the compiled jobs."""
    labels = {j.label for j in JOBS}
    for dtype in DTYPES:
        for prec in K.input_precisions(dtype):
            for D in (1, 8, 33, 100, 4096):
                cfg = K.heuristic_config(dtype, D, prec)
                assert cfg in K.candidate_configs(dtype, D, prec)
                part = f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K}-w{cfg.num_warps}-s{cfg.num_stages}"
                assert any(part in lb and f"-{_DT[dtype]}-{prec}-" in lb for lb in labels), (dtype, prec, D)


def test_every_candidate_config_is_compiled():
    """candidate_configs() (the union the stats launcher can pick from) is fully covered."""
    compiled = {(j.constexprs["BLOCK_M"], j.constexprs["BLOCK_N"], j.constexprs["BLOCK_K"],
                 j.num_warps, j.num_stages) for j in JOBS if j.label.startswith("stats-")}
    for cfg in K.candidate_configs():
        assert tuple(cfg) in compiled, cfg


# ---------------------------------------------------------------------------
# the helper itself, on a small module-level kernel
# ---------------------------------------------------------------------------

@triton.jit
def _tiny_matmul(a_ptr, b_ptr, c_ptr, K_dim, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K_dim, BK):
        a = tl.load(a_ptr + rm[:, None] * K_dim + (k0 + rk)[None, :])
        b = tl.load(b_ptr + rn[:, None] * K_dim + (k0 + rk)[None, :])
        acc = tl.dot(a, tl.trans(b), acc)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


_TINY_SIG = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "K_dim": "i32",
             "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}
_TINY_DIV = ["a_ptr", "b_ptr", "c_ptr", "K_dim"]


def test_helper_reports_wgmma_and_resources():
    good, big = sm90.compile_sm90_many([
        sm90.CompileJob(_tiny_matmul, _TINY_SIG, {"BM": 128, "BN": 128, "BK": 64}, 8, 3, _TINY_DIV,
                        label="tiny"),
        # 6 stages of 128x128 + 128x128 bf16 tiles: 384 KB of shared memory
        sm90.CompileJob(_tiny_matmul, _TINY_SIG, {"BM": 128, "BN": 128, "BK": 128}, 8, 6, _TINY_DIV,
                        label="too-big"),
    ], workers=2)
    sm90.assert_sm90_ok(good, wgmma=True)
    assert good.registers > 0 and good.shared_bytes > 0
    assert ".target sm_90a" in good.ptx and "HGMMA" in good.sass
    # an impossible shared-memory budget is reported, never silently passed
    assert big.error is not None or big.shared_bytes > sm90.SMEM_LIMIT_BYTES, big.summary()
    with pytest.raises(AssertionError):
        sm90.assert_sm90_ok(big)


@triton.jit
def _tiny_gathered_wgrad(a_ptr, x_ptr, idx_ptr, c_ptr, T, BN: tl.constexpr, BK: tl.constexpr,
                         BT: tl.constexpr):
    """c[n, k] = sum_t a[idx[t], n] x[idx[t], k]: the reduction's rows come from a load in the loop."""
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rt = tl.arange(0, BT)
    acc = tl.zeros([BN, BK], tl.float32)
    for t0 in range(0, T, BT):
        rows = tl.load(idx_ptr + t0 + rt).to(tl.int64)
        a = tl.load(a_ptr + rows[None, :] * BN + rn[:, None])
        x = tl.load(x_ptr + rows[:, None] * BK + rk[None, :])
        acc = tl.dot(a, x, acc)
    tl.store(c_ptr + rn[:, None] * BK + rk[None, :], acc)


def test_helper_reports_software_pipelining():
    """cp_async_pending tells a pipelined main loop from one whose waits drain every copy: Triton
    spends stages on a gathered reduction's index load, so 3 stages do not pipeline it, 5 do
    (the experts weight gradient ran unpipelined on the H200 for this reason)."""
    sig = {"a_ptr": "*bf16", "x_ptr": "*bf16", "idx_ptr": "*i32", "c_ptr": "*fp32", "T": "i32",
           "BN": "constexpr", "BK": "constexpr", "BT": "constexpr"}
    tiles = {"BN": 128, "BK": 128, "BT": 64}
    div = ["a_ptr", "x_ptr", "idx_ptr", "c_ptr", "T"]
    plain, gathered3, gathered5 = sm90.compile_sm90_many([
        sm90.CompileJob(_tiny_matmul, _TINY_SIG, {"BM": 128, "BN": 128, "BK": 64}, 8, 3, _TINY_DIV,
                        label="plain-s3"),
        sm90.CompileJob(_tiny_gathered_wgrad, sig, tiles, 8, 3, div, label="gathered-s3"),
        sm90.CompileJob(_tiny_gathered_wgrad, sig, tiles, 8, 5, div, label="gathered-s5"),
    ], workers=2)
    sm90.assert_pipelined(plain)
    sm90.assert_pipelined(gathered5)
    assert gathered3.cp_async_pending == 0, gathered3.summary()
    with pytest.raises(AssertionError, match="not pipelined"):
        sm90.assert_pipelined(gathered3)
    assert sm90.cp_async_pending("cp.async.wait_group 0;\n cp.async.wait_group \t3;") == 3
    assert sm90.cp_async_pending("ld.global.b32 %r1, [%rd1];") == -1


def test_mma_loop_sizes_reads_backward_branches():
    """mma_loop_sizes counts the instructions of each loop holding an MMA, and only those."""
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IMAD R2, R3, R4, RZ ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12], R24 ;
        /*0030*/                   LDGSTS.E.BYPASS.128 [R91], desc[UR22][R16.64], P5 ;
        /*0040*/              @!P2 BRA 0x10 ;
        /*0050*/                   FADD R5, R5, R6 ;
        /*0060*/              @!P3 BRA 0x50 ;
        /*0070*/                   BRA 0x80 ;
        /*0080*/                   EXIT ;
    """
    assert sm90.mma_loop_sizes(sass) == [4]
    assert sm90.mma_loop_sizes("") == []
