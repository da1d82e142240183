"""GPU tier of the SigLIP loss (``pytest -m gpu``): real sizes on every path, no host syncs, a
CUDA graph, the memory bound against the eager loss, compile of the Triton path.

Skipped on machines without CUDA (see conftest.py); run by ``bench/gpu_check.sh``.
"""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.contrastive.siglip.reference import siglip_loss_reference
from mmkernels.testing.numerics import assert_close

pytestmark = pytest.mark.gpu


def _pair(n, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, d, device="cuda", generator=g), dim=-1).to(dtype)
    b = torch.nn.functional.normalize(torch.randn(n, d, device="cuda", generator=g), dim=-1).to(dtype)
    return a, b


def _fwd_bwd(fn, a, b, scale, bias):
    ins = [t.detach().clone().requires_grad_() for t in (a, b, scale, bias)]
    loss = fn(*ins)
    loss.backward()
    return [loss.detach()] + [t.grad for t in ins]


def _context(path):
    return mmkernels.backend("triton") if path == "kernel" else mmkernels.use_path(path)


@pytest.mark.parametrize("path", ["kernel", "blockwise", "materialized"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("n,d", [(4096, 768), (1000, 1152), (3000, 88)])
def test_real_sizes_match_reference(path, dtype, n, d):
    if path == "materialized":
        mmkernels.tuning.set_option("memory_budget", 8 * n * n * 4)
    try:
        a, b = _pair(n, d, dtype)
        s, c = torch.tensor(10.0, device="cuda"), torch.tensor(-10.0, device="cuda")
        with _context(path):
            out = _fwd_bwd(mmkernels.siglip_loss, a, b, s, c)
    finally:
        mmkernels.tuning.set_option("memory_budget", None)
    ref = _fwd_bwd(siglip_loss_reference, a.double(), b.double(), s.double(), c.double())
    eager = _fwd_bwd(siglip_loss_reference, a, b, s.to(dtype), c.to(dtype))
    tol = "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else dtype
    for name, o, r, e in zip(("loss", "d image", "d text", "d scale", "d bias"), out, ref, eager):
        assert_close(o, r, tol, eager=e, scale=4.0, name=name)


@pytest.mark.parametrize("path", ["kernel", "blockwise"])
def test_no_host_sync_and_cuda_graph(path):
    a, b = _pair(2048, 512, torch.bfloat16)
    s = torch.tensor(10.0, device="cuda", requires_grad=True)
    c = torch.tensor(-10.0, device="cuda", requires_grad=True)
    with _context(path):
        mmkernels.siglip_loss(a, b, s, c).backward()  # warm up outside the checks
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            mmkernels.siglip_loss(a.requires_grad_(), b, s, c).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            with torch.cuda.graph(graph):
                static = mmkernels.siglip_loss(a.detach(), b.detach(), s.detach(), c.detach())
    graph.replay()
    torch.cuda.synchronize()
    assert_close(static, siglip_loss_reference(a.double(), b.double(), 10.0, -10.0), torch.bfloat16)


def test_memory_bound_against_eager():
    """N = 32768, D = 768, bf16, forward and backward: the kernels' extra memory is O(N * D) plus
    one block within ``memory_budget`` (no N x N tensor), a small fraction of what the eager loss
    (OpenCLIP's computation) allocates, measured here at N = 8192 and scaled by N^2 (its N x N
    tensors). The issue's target, 1% of eager, is a benchmark figure (bench/results)."""
    n, d = 32768, 768
    a, b = _pair(n, d, torch.bfloat16)
    a.requires_grad_()
    b.requires_grad_()
    s = torch.tensor(10.0, device="cuda", requires_grad=True)
    c = torch.tensor(-10.0, device="cuda", requires_grad=True)
    a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)

    def extra(fn, *args):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(*args).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with mmkernels.backend("triton"):
        ours = extra(mmkernels.siglip_loss, a, b, s, c)
    m = 8192
    eager_small = extra(siglip_loss_reference, a[:m].detach().requires_grad_(), b[:m].detach().requires_grad_(), s, c)
    eager = eager_small * (n / m) ** 2
    nd_bytes = n * d * 2
    budget = mmkernels.tuning.option("memory_budget")
    report = f"extra {ours / 2**20:.0f} MiB vs eager ~{eager / 2**20:.0f} MiB ({100 * ours / eager:.2f}%)"
    assert ours <= budget + 8 * nd_bytes, report
    assert ours <= 0.05 * eager, report


def test_torch_compile_triton_path():
    a, b = _pair(1024, 512, torch.bfloat16)
    fn = torch.compile(lambda x, y: mmkernels.siglip_loss(x, y, 10.0, -10.0), fullgraph=True)
    with mmkernels.backend("triton"):
        out = fn(a, b)
    assert_close(out, siglip_loss_reference(a.double(), b.double(), 10.0, -10.0), torch.bfloat16)


def test_opcheck_cuda():
    a, b = _pair(300, 96, torch.bfloat16)
    s = torch.tensor(10.0, device="cuda", requires_grad=True)
    c = torch.tensor(-3.0, device="cuda", requires_grad=True)
    t = torch.arange(300, device="cuda")
    torch.library.opcheck(torch.ops.mmkernels.siglip_rows.default,
                          (a.requires_grad_(), b.requires_grad_(), s, c, t, "triton"))
