"""sm_90 compile tier for the itc Triton kernels (no GPU needed).

Every kernel (the forward, the backward's query and key launches, the negatives) at every
configuration the launchers can pick (each dtype, input precision and class of D: its BLOCK_K,
the backward's feature chunk, D = 1 and D not a multiple of 16, which Triton specialises) is
compiled for sm_90a with its launch options: on every class of D with the teacher and BLIP-2's
32 tokens on either side (the token loops, and the backward's flattened tokens) and plain
features; with ALBEF's transposed key queue on three; no teacher, no hard targets and tokens
on both sides on one. Each must compile, use at most 227 KB of shared memory, not spill,
and run its products on wgmma/HGMMA, except exact ("ieee") fp32, which runs on FMA units.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from mmkernels._triton import input_precisions  # noqa: E402
from mmkernels.contrastive.itc import kernels as IK  # noqa: E402
from mmkernels.testing import sm90  # noqa: E402
from tests.helpers.sm90_tier import Sm90Tier, launch_grid, reports  # noqa: E402, F401  (reports: the fixture)

# one D of each class the launchers tell apart (BLOCK_K, the backward's feature chunk and
# whether one chunk covers D, D % 16, D = 1)
D_VALUES = (1, 7, 16, 24, 32, 40, 64, 100, 128, 200, 256)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# (tokens (Q, P), teacher, hard targets, key queue): on every class of D ...
HEAVY = (((32, 1), True, True, False), ((1, 32), True, True, False), ((1, 1), True, True, False))
# ... ALBEF's queue on small, unaligned and aligned D ...
QUEUE = (((1, 1), True, True, True),)
QUEUE_D = (7, 40, 256)
# ... and the rest on one
LIGHT = (((1, 1), False, True, False), ((1, 1), True, False, False), ((32, 32), False, True, False),
         ((32, 1), True, True, True))
LIGHT_D = 256
_TUNING_KIND = {"itc_rows": "itc_rows", "itc_dq": "itc_grads", "itc_dk": "itc_grads",
                "itc_negatives": "itc_negatives"}
# program counts: whether they divide by 16 only changes integer index arithmetic
_COUNTS = ("n_d_chunks",)


def _configs(kind, dtype, prec, D):
    return IK.candidate_configs(_TUNING_KIND[kind], dtype, D, prec)


def _variants(kind, D, variants=None):
    """The variants of ``kind`` compiled at ``D``: the key launch and the negatives never
    read the queue, and the negatives have no teacher."""
    if variants is None:
        variants = HEAVY + (QUEUE if D in QUEUE_D else ()) + (LIGHT if D == LIGHT_D else ())
    if kind in ("itc_dk", "itc_negatives"):
        variants = (v[:3] + (False,) for v in variants)
    if kind == "itc_negatives":
        variants = ((v[0], False, True, False) for v in variants)
    return tuple(dict.fromkeys(variants))


def _spec_key(kind, dtype, prec, cfg, D, variant):
    """What the compiled code depends on: the constexprs (D = 1 and one feature chunk among
    them), the divisibility hints (but those of program counts), the launch and compile
    options."""
    kernel, sig, constexprs, div = IK.compile_specs(kind, dtype, D, prec, cfg, *variant)
    return (kind, dtype, prec, variant, tuple(sorted(constexprs.items())),
            tuple(sorted(d for d in div if d not in _COUNTS)), cfg.num_warps, cfg.num_stages,
            tuple(sorted(IK.launch_options(dtype, prec).items())))


def _jobs():
    jobs, seen = [], set()
    for kind, dtype, prec, D in launch_grid(IK.COMPILE_KINDS, DTYPES, input_precisions, D_VALUES):
        for cfg in _configs(kind, dtype, prec, D):
            for variant in _variants(kind, D):
                key = _spec_key(kind, dtype, prec, cfg, D, variant)
                if key in seen:
                    continue
                seen.add(key)
                kernel, sig, constexprs, div = IK.compile_specs(kind, dtype, D, prec, cfg, *variant)
                (q, p), teacher, hard, queue = variant
                bd = f"-bd{constexprs['BLOCK_D']}" if "BLOCK_D" in constexprs else ""
                if constexprs.get("n_d_chunks") == 1:
                    bd += "-1chunk"
                d_class = "D1" if D == 1 else ("D%16" if D % 16 == 0 else f"D{D}")
                label = (f"{kind}-{_DT[dtype]}-{prec}-{d_class}-q{q}p{p}"
                         f"{'-teacher' if teacher else ''}{'' if hard else '-nohard'}"
                         f"{'-queue' if queue else ''}-"
                         f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K}{bd}"
                         f"-w{cfg.num_warps}-s{cfg.num_stages}")
                jobs.append(sm90.CompileJob(kernel, sig, constexprs, cfg.num_warps, cfg.num_stages,
                                            div, options=IK.launch_options(dtype, prec),
                                            label=label))
    return jobs


JOBS = _jobs()


class TestItcSm90(Sm90Tier):
    def check(self, rep, job):
        exact_fp32 = "-fp32-ieee-" in job.label
        sm90.assert_sm90_ok(rep, wgmma=not exact_fp32)
        if exact_fp32:  # "ieee" must really mean fp32 FMA, not TF32 tensor cores
            assert not rep.tensor_cores, rep.summary()


def test_every_default_config_is_compiled():
    """The launchers' choice for any D falls in a compiled class: each (kernel, dtype,
    precision, D) below, every D to 519 and some wide ones, has the specialisation of one of
    the jobs."""
    compiled = set()
    for kind, dtype, prec, D in launch_grid(IK.COMPILE_KINDS, DTYPES, input_precisions, D_VALUES):
        for cfg in _configs(kind, dtype, prec, D):
            for variant in _variants(kind, D):
                compiled.add(_spec_key(kind, dtype, prec, cfg, D, variant))
    assert len(compiled) == len(JOBS)
    every_d = tuple(range(2, 520)) + (768, 1024, 1536, 4096)
    for kind, dtype, prec, D in launch_grid(IK.COMPILE_KINDS, DTYPES, input_precisions, every_d):
        for cfg in _configs(kind, dtype, prec, D):
            for variant in _variants(kind, D, HEAVY):
                assert _spec_key(kind, dtype, prec, cfg, D, variant) in compiled, \
                    (kind, dtype, prec, D, cfg, variant)
