"""sm_90 compile tier for the experts Triton kernels (no GPU needed).

Every launch kind (``KERNEL_KINDS``: routing sort, grouped GEMMs, weight gradients) at every tile
the heuristic can pick, bf16/fp16/fp32, E = 8, aligned and odd widths, is compiled for sm_90a.
Each must compile, use at most 227 KB of shared memory, not spill, use wgmma/HGMMA (except exact
fp32 and the sort), be software-pipelined where rows are aligned, and leave registers for two
8-warp programs per SM.
"""
from __future__ import annotations


import pytest
import torch

triton = pytest.importorskip("triton")

from mmkernels.experts import routing_kernels as R  # noqa: E402
from mmkernels.experts.grouped_mm.kernels import configs as C  # noqa: E402
from mmkernels.experts.grouped_mm import kernels as K  # noqa: E402
from mmkernels.testing import sm90  # noqa: E402
from tests.helpers.sm90_tier import Sm90Tier, reports  # noqa: E402, F401  (reports: the fixture)

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
E_MAX = R.MAX_EXPERTS
# (T, H, F) size classes: multiples of 16; multiples of 8 (ALIGN = 8: rows still 16-byte
# aligned for bf16, the launchers pass widths and row strides divided by ALIGN); odd widths
# (ALIGN = 1: scalar loads, the heuristic's unaligned tiles)
SIZES = {"al16": (4096, 1024, 4096), "al8": (4099, 88, 200), "odd": (4099, 97, 201)}
# which (dtype, precision) each size class is compiled for (al16: every dtype and precision)
EXTRA_CLASSES = {"al8": ((torch.bfloat16, "tf32"),),
                 "odd": ((torch.bfloat16, "tf32"), (torch.float16, "tf32"), (torch.float32, "tf32"),
                         (torch.float32, "ieee"))}


def _activations(kind):
    return C.ACTIVATIONS if kind in ("ffn_fwd_in", "ffn_bwd_dh") else (None,)


def _biases(kind):
    return (False, True) if kind in ("linear_fwd", "ffn_fwd_in", "ffn_fwd_out") + C.WGRAD_KINDS else (False,)


def _label(kind, dtype, prec, act, bias, cfg, size_class):
    tile = "x".join(str(v) for v in cfg[:3])
    split = getattr(cfg, "epilogue_split", 1)
    return (f"{kind}-{_DT[dtype]}-{prec}-{act or 'noact'}-{'bias' if bias else 'nobias'}-"
            f"{size_class}-{tile}-w{cfg.num_warps}-s{cfg.num_stages}" + (f"-e{split}" if split > 1 else ""))


def _job(kind, dtype, prec, act, bias, cfg, size_class, atomic=False, row32=True):
    kernel, sig, constexprs, div = K.compile_specs(kind, dtype, prec, cfg, act, bias, E=E_MAX,
                                                   sizes=SIZES[size_class], atomic=atomic, row32=row32)
    label = (_label(kind, dtype, prec, act, bias, cfg, size_class) + ("-atomic" if atomic else "")
             + ("" if row32 else "-row64"))
    return sm90.CompileJob(kernel, sig, constexprs, cfg.num_warps, cfg.num_stages, div, label=label,
                           options=C.launch_options(kind, cfg))


def _jobs():
    jobs = []
    for E in (2, E_MAX):
        kernel, sig, constexprs, div = R.compile_specs("route", E=E)
        jobs.append(sm90.CompileJob(kernel, sig, constexprs, R.ROUTE_WARPS, 1, div,
                                    label=f"route-E{E}"))
    kernel, sig, constexprs, div = R.compile_specs("route_split")
    jobs.append(sm90.CompileJob(kernel, sig, constexprs, 4, 1, div, label="route-split"))
    for kind in C.KERNEL_KINDS:
        for act in _activations(kind):
            swiglu = act == "swiglu"
            # every aligned config (wide and narrow outputs), with and without bias
            for dtype in DTYPES:
                for prec in C.input_precisions(dtype):
                    for bias in _biases(kind):
                        for cfg in C.candidate_configs(kind, dtype, prec, swiglu, aligned=True):
                            jobs.append(_job(kind, dtype, prec, act, bias, cfg, "al16"))
                            if kind in C.WGRAD_KINDS:  # the token-chunked variant (fp32 atomics)
                                jobs.append(_job(kind, dtype, prec, act, bias, cfg, "al16", atomic=True))
            # the other size classes: the config the heuristic picks for them
            for size_class, pairs in EXTRA_CLASSES.items():
                T, H, F = SIZES[size_class]
                for dtype, prec in pairs:
                    aligned = R.is_aligned(dtype, R.align_of(H, F))
                    cfg = C.heuristic_config(kind, dtype, prec, swiglu, 4096, aligned)
                    jobs.append(_job(kind, dtype, prec, act, False, cfg, size_class))
                    if kind in C.WGRAD_KINDS:  # masked dW rows/columns (EVEN off), bias, atomics
                        jobs.append(_job(kind, dtype, prec, act, True, cfg, size_class, atomic=True))
        if kind in C.WGRAD_KINDS:  # int64 row offsets (inputs past 2**31 elements), bf16 heuristic
            for atomic in (False, True):
                cfg = C.heuristic_config(kind, torch.bfloat16, "tf32", False, 4096, True)
                jobs.append(_job(kind, torch.bfloat16, "tf32", None, True, cfg, "al16", atomic=atomic,
                                 row32=False))
    return jobs


JOBS = _jobs()


class TestSm90(Sm90Tier):
    def int64_jobs(self):
        # ROW32 (the weight gradient's int32 row offsets) is launched only when every offset fits
        return sm90.one_job_per_kernel(JOBS, keep=lambda job: not job.constexprs.get("ROW32", False))

    def check(self, rep, job):
        no_products = job.label.startswith("route")
        exact_fp32 = "-fp32-ieee-" in job.label
        sm90.assert_sm90_ok(rep, wgmma=not (exact_fp32 or no_products))
        if exact_fp32:  # "ieee" must really mean fp32 FMA, not TF32 tensor cores
            assert not rep.tensor_cores, rep.summary()
        if job.num_warps == 8:  # two 8-warp programs fit on an SM (one hides the other's latency)
            need = C.RESIDENT_PROGRAMS * rep.registers * 32 * job.num_warps
            assert need <= C.REGISTERS_PER_SM, rep.summary()
        if _pipelined_expected(job):
            # the loads of later steps overlap the math: the weight gradient's gathered reduction
            # ran with every wait draining all copies until its heuristic took 5 stages
            sm90.assert_pipelined(rep)


def _pipelined_expected(job) -> bool:
    """Tensor-core launches with 16-byte aligned rows (cp.async) must keep loads in flight."""
    kind = job.label.split("-")[0]
    return (kind != "route" and "-fp32-ieee-" not in job.label and job.num_stages >= 3
            and ("-al16-" in job.label or "-al8-" in job.label))


def test_every_heuristic_config_is_compiled():
    """The config the launchers pick for every (kind, dtype, precision, width, alignment) is compiled."""
    compiled = {(j.label.split("-")[0], j.num_warps, j.num_stages,
                 tuple(j.constexprs[n] for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_T",
                                                 "EPI_SPLIT") if n in j.constexprs))
                for j in JOBS}
    for kind in C.KERNEL_KINDS:
        for dtype in DTYPES:
            for prec in C.input_precisions(dtype):
                for act in _activations(kind):
                    swiglu = act == "swiglu"
                    for N in (1, 7, 16, 64, 65, 88, 200, 1024, 4096, 11008):
                        for aligned in (True, False):
                            cfg = C.heuristic_config(kind, dtype, prec, swiglu, N, aligned)
                            assert cfg in C.candidate_configs(kind, dtype, prec, swiglu)
                            tiles = tuple(cfg[:3]) + tuple(cfg[6:])  # + the epilogue split
                            assert (kind, cfg.num_warps, cfg.num_stages, tiles) in compiled, \
                                (kind, dtype, prec, act, N, aligned, cfg)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
@pytest.mark.parametrize("kind", C.WGRAD_KINDS)
@pytest.mark.parametrize("atomic", (False, True), ids=("store", "atomic"))
def test_wgrad_bias_gradient_stays_out_of_the_issue_budget(reports, kind, dtype, atomic):
    """The bias gradient adds at most 1/5 to the weight gradient's main loop (16-bit inputs).

    A row sum of the A tile would need a cross-warp reduction through shared memory every step,
    close to doubling the loop's instructions where the four wgmma of a step leave the
    schedulers little room for anything else. As a 16-column MMA against ones it costs one more
    wgmma per warpgroup step.
    """
    cfg = C.heuristic_config(kind, dtype, "tf32", False, 4096, True)
    sizes = {}
    for bias in (False, True):
        label = _label(kind, dtype, "tf32", None, bias, cfg, "al16") + ("-atomic" if atomic else "")
        rep = reports[label]
        sm90.assert_compiled(rep)
        loops = sm90.mma_loop_sizes(rep.sass)
        assert len(loops) == 1, (label, loops)
        sizes[bias] = loops[0]
    assert sizes[True] <= 1.2 * sizes[False], sizes
