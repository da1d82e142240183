"""GPU tier of the attention family (``pytest -m gpu``): real sizes, no host syncs, no per-shape recompiles.

Skipped without CUDA (see conftest.py); run by ``bench/gpu_check.sh``.
"""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels import MultimodalMask
from mmkernels.attention import kernels, multimodal_attention_reference
from mmkernels.testing.numerics import assert_close

pytestmark = pytest.mark.gpu


def _qkv(b, hq, hkv, s, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, h, s, d, device="cuda", generator=g, dtype=dtype) for h in (hq, hkv, hkv)]


def _fwd_bwd(fn, q, k, v, mask, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, mask)
    out.backward(dout.to(out.dtype))
    return out, q.grad, k.grad, v.grad


def _masks(b, s):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(s // 2, s + 1, (b,), generator=g)
    mods = torch.zeros(b, s, dtype=torch.int64)
    mods[:, 16:16 + s // 4] = 1
    return {
        "causal": MultimodalMask.causal(b, s),
        "prefix_lm": MultimodalMask.prefix_lm(lengths // 3, lengths, s),
        "blip2_itg": MultimodalMask.blip2(32, lengths.clamp(max=s - 32), s - 32, objective="itg"),
        "image_spans": MultimodalMask.image_spans_in_causal(mods),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 88, 128])
@pytest.mark.parametrize("name", ["causal", "prefix_lm", "blip2_itg", "image_spans"])
def test_real_sizes_match_reference(dtype, d, name):
    b, s = 2, 1000
    mask = _masks(b, s)[name].to("cuda")
    q, k, v = _qkv(b, 8, 2, s, d, dtype)
    dout = torch.randn(q.shape, device="cuda", dtype=torch.float64)
    got = _fwd_bwd(mmkernels.multimodal_attention, q, k, v, mask, dout)
    ref = _fwd_bwd(multimodal_attention_reference, q.double(), k.double(), v.double(), mask, dout)
    eager = _fwd_bwd(multimodal_attention_reference, q, k, v, mask, dout)
    for nm, g_, r_, e_ in zip(("out", "dq", "dk", "dv"), got, ref, eager):
        assert_close(g_, r_, dtype, eager=e_, name=nm)


def test_mask_build_and_op_without_host_sync():
    b, s = 4, 2048
    q, k, v = (t.requires_grad_() for t in _qkv(b, 8, 8, s, 64, torch.bfloat16))
    lengths = torch.full((b,), s - 100, device="cuda")
    mmkernels.multimodal_attention(q, k, v, MultimodalMask.prefix_lm(lengths // 2, lengths, s)).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mask = MultimodalMask.prefix_lm(lengths // 2, lengths, s)
        mask.tile_map(128, 64)
        mmkernels.multimodal_attention(q, k, v, mask).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _compiled_variants(kern) -> int:
    # Triton 3.x: device_caches[device] = (kernel_cache, kernel_key_cache, target, backend, binder)
    return sum(len(entry[0]) for entry in kern.device_caches.values())


def test_no_recompilation_when_batch_or_length_change():
    # head dim 72 is used by no other GPU test: the kernel caches are process-wide, so count only
    # the variants this test adds
    mask_fn = MultimodalMask.causal
    kerns = (kernels.attn_fwd_kernel, kernels.attn_bwd_dq_kernel, kernels.attn_bwd_dkdv_kernel)
    before = [_compiled_variants(k) for k in kerns]
    for b, s in ((1, 1024), (3, 1024), (2, 1536), (2, 2048), (5, 1040)):
        q, k, v = (t.requires_grad_() for t in _qkv(b, 4, 4, s, 72, torch.bfloat16))
        mmkernels.multimodal_attention(q, k, v, mask_fn(b, s, device="cuda")).sum().backward()
    torch.cuda.synchronize()
    for kern, n0 in zip(kerns, before):
        variants = _compiled_variants(kern) - n0
        # Triton specialises ints on divisibility by 16 (the tile counts here: 8, 12, 16, 9 and
        # 16, 24, 32, 17), never on the values themselves: a few variants, not one per shape
        assert 1 <= variants <= 3, f"{kern.fn.__name__} compiled {variants} variants for 5 shapes"


def test_memory_grows_with_s():
    b, h, s, d = 1, 16, 16384, 128
    q, k, v = (t.requires_grad_() for t in _qkv(b, h, h, s, d, torch.bfloat16))
    mask = MultimodalMask.causal(b, s, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mmkernels.multimodal_attention(q, k, v, mask).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 16 * q.numel() * q.element_size(), f"extra {extra / 2**20:.0f} MiB"


def test_torch_compile_triton_path():
    q, k, v = _qkv(2, 4, 4, 512, 64, torch.bfloat16)
    mask = MultimodalMask.causal(2, 512, device="cuda")
    fn = torch.compile(lambda a, b_, c: mmkernels.multimodal_attention(a, b_, c, mask), fullgraph=True)
    assert_close(fn(q, k, v), multimodal_attention_reference(q.double(), k.double(), v.double(), mask),
                 torch.bfloat16)
