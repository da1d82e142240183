"""GPU tier (``pytest -m gpu``): real sizes, no host syncs, the memory bound, compile of the Triton path.

Skipped on machines without CUDA (see conftest.py); run by ``bench/gpu_check.sh``.
"""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.contrastive import reference
from mmkernels.testing.numerics import assert_close

pytestmark = pytest.mark.gpu


def _pair(n, d, dtype, seed=0, m=None):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, d, device="cuda", generator=g), dim=-1).to(dtype)
    b = torch.nn.functional.normalize(torch.randn(m or n, d, device="cuda", generator=g), dim=-1).to(dtype)
    return a.requires_grad_(), b.requires_grad_()


def _fwd_bwd(fn, a, b, scale, **kw):
    a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    s = scale.detach().clone().requires_grad_()
    loss = fn(a, b, s, **kw)
    (loss * a.shape[0]).backward()
    return loss, a.grad, b.grad, s.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("n,d", [(4096, 768), (1000, 1152), (3000, 88), (2048, 1536)])
def test_real_sizes_match_reference(dtype, n, d):
    a, b = _pair(n, d, dtype)
    s = torch.tensor(14.3, device="cuda")
    out = _fwd_bwd(mmkernels.contrastive_loss, a, b, s, label_smoothing=0.1)
    ref = _fwd_bwd(reference.contrastive_loss_reference, a.double(), b.double(), s.double(), label_smoothing=0.1)
    eager = _fwd_bwd(reference.contrastive_loss_reference, a, b, s.to(dtype), label_smoothing=0.1)
    tol_dtype = "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else dtype
    for name, o, r, e in zip(("loss", "d image", "d text"), out[:3], ref[:3], eager[:3]):
        assert_close(o, r, tol_dtype, eager=e, name=name)
    assert_close(out[3], ref[3], tol_dtype, scale=4.0, name="d logit_scale")


def test_infonce_queue_real_size():
    q, k = _pair(2048, 256, torch.bfloat16, m=2048 + 57344)
    t = torch.randint(0, k.shape[0], (2048,), device="cuda")
    s = torch.tensor(14.3, device="cuda")
    out = _fwd_bwd(mmkernels.infonce_loss, q, k, s, targets=t)
    ref = _fwd_bwd(reference.infonce_loss_reference, q.double(), k.double(), s.double(), targets=t)
    for o, r in zip(out, ref):
        assert_close(o, r, torch.bfloat16, scale=2.0)


def test_no_host_sync_and_cuda_graph():
    a, b = _pair(2048, 512, torch.bfloat16)
    s = torch.tensor(14.3, device="cuda", requires_grad=True)
    mmkernels.contrastive_loss(a, b, s).backward()  # warm up: compile kernels outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, stats = mmkernels.contrastive_loss(a, b, s, return_stats=True)
        loss.backward()
        mmkernels.infonce_loss(a, b, s, targets=torch.arange(2048, device="cuda")).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):
            static = mmkernels.contrastive_loss(a.detach(), b.detach(), s.detach())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(static)
    assert_close(static, reference.contrastive_loss_reference(a.double(), b.double(), s.double()), torch.bfloat16)


def test_memory_bound_no_n_by_n():
    n, d = 32768, 768
    a, b = _pair(n, d, torch.bfloat16)
    s = torch.tensor(14.3, device="cuda", requires_grad=True)
    a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mmkernels.contrastive_loss(a, b, s).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    nd_bytes = n * d * 2
    assert extra <= 8 * nd_bytes, f"extra {extra / 2**20:.0f} MiB"
    assert extra < n * n * 2 // 4


def test_torch_compile_triton_path():
    a, b = _pair(1024, 512, torch.bfloat16)
    fn = torch.compile(lambda x, y: mmkernels.contrastive_loss(x, y, 14.3), fullgraph=True)
    out = fn(a, b)
    assert_close(out, reference.contrastive_loss_reference(a.double(), b.double(), 14.3), torch.bfloat16)


def test_opcheck_cuda():
    a, b = _pair(300, 96, torch.bfloat16)
    s = torch.tensor(10.0, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.mmkernels.contrastive_stats.default,
                          (a, b, s, torch.arange(300, device="cuda"), True, "triton"))
