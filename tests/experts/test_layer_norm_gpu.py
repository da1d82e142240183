"""GPU tier of the per-modality LayerNorm (pytest -m gpu; skipped without CUDA).

The compiled kernels at real widths against the float64 reference; no host synchronisation
(forward and backward under ``set_sync_debug_mode("error")``); a captured CUDA graph replayed
with new modality ids; CUDA autocast runs it in float32 as it does ``nn.LayerNorm``.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mmkernels
from tests.experts.cases import make_ids, randn
from mmkernels.experts.reference import modality_layer_norm_reference
from mmkernels.testing.cuda_graph import capture, sync_free
from mmkernels.testing.numerics import assert_close

pytestmark = pytest.mark.gpu


def _grads(fn, x, w, b, dy):
    y = fn(x, w, b)
    return [y, *torch.autograd.grad(y, (x, w, b), dy)]


def _leaves(dtype, *ts):
    return [t.to("cuda", dtype).requires_grad_() for t in ts]


# bf16 at every width class the models use (and an odd one); fp16 and fp32 once: each case
# compiles three kernels, and the GPU test run has a time limit
WIDTH_DTYPES = [(768, torch.bfloat16), (1024, torch.bfloat16), (4096, torch.bfloat16), (97, torch.bfloat16),
                (1024, torch.float16), (1024, torch.float32)]


@pytest.mark.parametrize("h,dtype", WIDTH_DTYPES, ids=[f"{h}-{str(d)[6:]}" for h, d in WIDTH_DTYPES])
def test_real_widths_match_the_reference(h, dtype):
    """VLMo/BEiT-3 widths (and an odd one), 3 experts with ragged counts, every gradient."""
    b, s = 6, 237
    ids = make_ids((b, s), 3, seed=1).cuda()
    x0 = randn(b, s, h, seed=2) * 2 + randn(b, s, 1, seed=3)
    w0, b0, dy = 1 + 0.3 * randn(3, h, seed=4), 0.5 * randn(3, h, seed=5), randn(b, s, h, seed=6).cuda()

    def fused(x, w, bias):
        return mmkernels.modality_layer_norm(x, ids, w, bias, 1e-6)

    def ref(x, w, bias):
        return modality_layer_norm_reference(x, ids, w, bias, 1e-6)

    got = _grads(fused, *_leaves(dtype, x0, w0, b0), dy.to(dtype))
    want = _grads(ref, *_leaves(torch.float64, x0, w0, b0), dy.double())
    eager = _grads(ref, *_leaves(dtype, x0, w0, b0), dy.to(dtype))
    for name, g, r, e in zip(("y", "dx", "dw", "db"), got, want, eager):
        scale = 4.0 if name in ("dw", "db") else 1.0  # sums over ~470 tokens per expert
        assert_close(g, r, dtype, eager=e, scale=scale, name=f"{name} H={h}")


def test_sync_free_and_cuda_graph_replay_follows_new_ids():
    b, s, h = 4, 300, 1024
    dtype = torch.bfloat16
    module = mmkernels.MultiwayLayerNorm(h, num_experts=3, eps=1e-6).cuda().to(dtype)
    with torch.no_grad():
        module.weight.copy_(1 + 0.3 * randn(3, h, seed=11).cuda())
        module.bias.copy_(0.5 * randn(3, h, seed=12).cuda())
    x = randn(b, s, h, seed=13).to("cuda", dtype).requires_grad_()
    ids = make_ids((b, s), 3, seed=14).cuda()
    dy = randn(b, s, h, seed=15).to("cuda", dtype)

    def step():
        y = module(x, ids)
        return (y, *torch.autograd.grad(y, (x, module.weight, module.bias), dy))

    sync_free(step)
    graph, static_out = capture(step)
    for seed, layout in ((21, "random"), (22, "one"), (23, "empty")):
        ids.copy_(make_ids((b, s), 3, layout=layout, seed=seed).cuda())
        with torch.no_grad():
            x.copy_(randn(b, s, h, seed=seed + 10).to("cuda", dtype))
        graph.replay()
        torch.cuda.synchronize()
        for name, got, ref in zip(("y", "dx", "dw", "db"), static_out, step()):
            assert_close(got.float(), ref.double(), dtype, name=f"{layout} {name}")


def test_cuda_autocast_runs_in_float32_as_layer_norm_does():
    ln = nn.LayerNorm(256).cuda()
    module = mmkernels.MultiwayLayerNorm.from_experts([ln, ln])
    x = randn(3, 50, 256, seed=31).to("cuda", torch.bfloat16)
    ids = make_ids((3, 50), 2, seed=32).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, want = module(x, ids), ln(x)
    assert got.dtype == want.dtype == torch.float32
    assert_close(got, want.double(), torch.float32, scale=4.0)
