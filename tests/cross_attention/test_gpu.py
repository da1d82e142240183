"""GPU tier of the cross_attention family (pytest -m gpu; skipped without CUDA).

Real BLIP-2 / CoCa sizes against the float64 reference under sync-debug mode "error"; the
dropout mask reproduced from the seed; CUDA-graph capture; torch.compile of the Triton path; the
memory bound (no [B, H, Lq, Lk] tensor); the fused K/V projection in bf16.
"""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.cross_attention import share_kv_storage
from mmkernels.cross_attention.reference import cross_attention_reference, make_seed
from mmkernels.testing.cuda_graph import capture
from mmkernels.testing.numerics import assert_close

pytestmark = pytest.mark.gpu


def _qkv(b, h, lq, lk, d, dtype, seed=0):
    """q [B,H,Lq,D]; k, v strided views of one [B, Lk, 2, H, D] projection, as the Q-Former has them."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, lq, h, d, device="cuda", generator=g).to(dtype).transpose(1, 2)
    kv = torch.randn(b, lk, 2, h, d, device="cuda", generator=g).to(dtype)
    return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)


def _padding(b, lk, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mask = torch.rand(b, lk, device="cuda", generator=g) > 0.2
    mask[:, 0] = True
    mask[-1] = False  # one sample with every key padded
    return mask


def _fwd_bwd(q, k, v, mask, dropout_p, seed, dtype, reference=False):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    dout = torch.randn(q.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(9)).to(dtype)
    if reference:
        out = cross_attention_reference(*leaves, mask, dropout_p=dropout_p, seed=seed)
    else:
        out = torch.ops.mmkernels.cross_attention_fwd(*leaves, mask, seed, q.shape[-1] ** -0.5, dropout_p,
                                                      "triton")[0]
    grads = torch.autograd.grad(out, leaves, dout)
    return [out.detach(), *grads]


# every shape in bf16 with and without dropout, fp16 at the BLIP-2 shape (kept short: the GPU
# tests of every family share gpu_check's time budget)
_REAL = [(shape, torch.bfloat16, p) for shape in [(32, 12, 32, 677, 64), (16, 8, 256, 257, 96),
                                                  (8, 12, 33, 300, 88), (4, 4, 300, 129, 128)]
         for p in (0.0, 0.1)] + [((32, 12, 32, 677, 64), torch.float16, 0.1)]


@pytest.mark.parametrize("shape,dtype,dropout_p", _REAL,
                         ids=[f"{'x'.join(map(str, s))}-{str(t)[6:]}-p{p}" for s, t, p in _REAL])
def test_real_sizes_against_reference_without_host_sync(shape, dtype, dropout_p):
    b, h, lq, lk, d = shape
    q, k, v = _qkv(b, h, lq, lk, d, dtype)
    mask = _padding(b, lk)
    seed = make_seed("cuda", torch.Generator(device="cuda").manual_seed(3)) if dropout_p else None
    _fwd_bwd(q, k, v, mask, dropout_p, seed, dtype)  # compile outside sync-debug mode
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = _fwd_bwd(q, k, v, mask, dropout_p, seed, dtype)
        with mmkernels.backend("triton"):
            api = mmkernels.cross_attention(q, k, v, key_padding_mask=mask)  # validation included
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = _fwd_bwd(q, k, v, mask, dropout_p, seed, torch.float64, reference=True)
    eager = _fwd_bwd(q, k, v, mask, dropout_p, seed, dtype, reference=True)
    for name, g, w, e in zip(("out", "dq", "dk", "dv"), got, want, eager):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        assert_close(g, w, dtype, eager=e, name=f"{name} {tuple(q.shape)} p={dropout_p}")
    if not dropout_p:
        assert_close(api, want[0], dtype, eager=eager[0], name="api out")


def test_fp32_real_size():
    q, k, v = _qkv(16, 12, 32, 257, 64, torch.float32)
    mask = _padding(16, 257)
    got = _fwd_bwd(q, k, v, mask, 0.0, None, torch.float32)
    want = _fwd_bwd(q, k, v, mask, 0.0, None, torch.float64, reference=True)
    eager = _fwd_bwd(q, k, v, mask, 0.0, None, torch.float32, reference=True)
    for name, g, w, e in zip(("out", "dq", "dk", "dv"), got, want, eager):
        assert_close(g, w, torch.float32, eager=e, name=name)


def test_memory_has_no_scores_tensor():
    """Forward + backward allocate far less than one fp32 [B, H, Lq, Lk] tensor beyond inputs and grads."""
    b, h, lq, lk, d = 128, 12, 32, 677, 64
    q, k, v = _qkv(b, h, lq, lk, d, torch.bfloat16)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    dout = torch.randn_like(leaves[0])
    out = mmkernels.cross_attention(*leaves)
    torch.autograd.grad(out, leaves, dout)
    del out
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = mmkernels.cross_attention(*leaves, dropout_p=0.1)
    grads = torch.autograd.grad(out, leaves, dout)
    extra = torch.cuda.max_memory_allocated() - base
    io = sum(t.numel() * t.element_size() for t in (out, *grads))
    scores = b * h * lq * lk * 4
    assert extra - io < 0.1 * scores, f"extra {extra - io} bytes beyond outputs; one score tensor is {scores}"


def test_cuda_graph_capture_and_replay():
    q, k, v = _qkv(8, 12, 32, 257, 64, torch.bfloat16)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    mask = _padding(8, 257)
    dout = torch.randn_like(leaves[0])

    def step():
        out = mmkernels.cross_attention(*leaves, key_padding_mask=mask)
        return (out, *torch.autograd.grad(out, leaves, dout))

    graph, captured = capture(step)
    with torch.no_grad():
        for t in leaves:
            t.copy_(torch.randn_like(t))
    graph.replay()
    eager = step()
    for c, e in zip(captured, eager):
        assert torch.equal(c, e)

    # with dropout the seed is drawn inside the graph: each replay draws a new mask
    def step_dropout():
        return mmkernels.cross_attention(*leaves, key_padding_mask=mask, dropout_p=0.3)

    graph, captured = capture(step_dropout)
    graph.replay()
    first = captured.clone()
    graph.replay()
    assert torch.isfinite(captured).all() and not torch.equal(first, captured)


def test_torch_compile_triton_path():
    q, k, v = _qkv(4, 12, 32, 257, 64, torch.bfloat16)
    mask = _padding(4, 257)

    def step(q, k, v):
        return mmkernels.cross_attention(q, k, v, key_padding_mask=mask)

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = torch.compile(step, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(out.float().square().sum(), leaves)
    ref = [t.detach().requires_grad_() for t in (q, k, v)]
    want = step(*ref)
    want_grads = torch.autograd.grad(want.float().square().sum(), ref)
    assert torch.equal(out, want)
    for g, w in zip(grads, want_grads):
        assert torch.equal(g, w)


def test_fused_kv_projection_bf16():
    """bf16 on the GPU against the same projections done per layer in fp32 from the same weights."""
    torch.manual_seed(0)
    layers = [(torch.nn.Linear(1408, 768), torch.nn.Linear(1408, 768)) for _ in range(6)]
    layers = [(a.cuda().bfloat16(), b.cuda().bfloat16()) for a, b in layers]
    share_kv_storage(layers)
    x = torch.randn(8, 257, 1408, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    douts = [(torch.randn(8, 12, 257, 64, device="cuda"), torch.randn(8, 12, 257, 64, device="cuda"))
             for _ in layers]
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = mmkernels.fused_kv_projection(x, [(a.weight, b.weight) for a, b in layers],
                                            [(a.bias, b.bias) for a, b in layers], num_heads=12)
        loss = sum((k.float() * dk).sum() + (v.float() * dv).sum() for (k, v), (dk, dv) in zip(out, douts))
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    params = [p for pair in layers for m in pair for p in (m.weight, m.bias)]
    got = [x.grad] + [p.grad for p in params]
    x32 = x.detach().float().requires_grad_()
    p32 = [p.detach().float().requires_grad_() for p in params]
    want, loss = [], 0.0
    for i, (dk, dv) in enumerate(douts):
        wk, bk, wv, bv = p32[4 * i:4 * i + 4]
        k = torch.nn.functional.linear(x32, wk, bk).view(8, 257, 12, 64).transpose(1, 2)
        v = torch.nn.functional.linear(x32, wv, bv).view(8, 257, 12, 64).transpose(1, 2)
        want.append((k, v))
        loss = loss + (k * dk).sum() + (v * dv).sum()
    loss.backward()
    for (gk, gv), (wk, wv) in zip(out, want):
        assert_close(gk, wk.double(), torch.bfloat16, name="k")
        assert_close(gv, wv.double(), torch.bfloat16, name="v")
    for i, (g, w) in enumerate(zip(got, [x32.grad] + [p.grad for p in p32])):
        assert_close(g.float(), w.double(), torch.bfloat16, scale=2.0, name=f"grad {i}")


def test_fused_kv_projection_backward_memory_like_separate_projections():
    """The fused projection's backward peak stays within one layer's K/V gradient of twelve separate
    F.linear calls' peak: each layer's gradients are consumed as they arrive."""
    b, lk, c, hd, layers = 64, 257, 1408, 768, 6
    torch.manual_seed(0)
    pairs = [(torch.nn.Linear(c, hd), torch.nn.Linear(c, hd)) for _ in range(layers)]
    pairs = [(a.cuda().bfloat16(), v.cuda().bfloat16()) for a, v in pairs]
    share_kv_storage(pairs)
    x = torch.randn(b, lk, c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ws = [(a.weight, v.weight) for a, v in pairs]
    bs = [(a.bias, v.bias) for a, v in pairs]

    def fused():
        return mmkernels.fused_kv_projection(x, ws, bs, num_heads=12)

    def separate():
        return [(a(x).view(b, lk, 12, 64).transpose(1, 2), v(x).view(b, lk, 12, 64).transpose(1, 2))
                for a, v in pairs]

    def peak(make):
        x.grad = None
        for a, v in pairs:
            a.zero_grad(set_to_none=True)
            v.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = make()
        # the attention consumes k, v and returns contiguous [B, H, Lk, D] gradients, layer by layer
        loss = sum((mmkernels.cross_attention(torch.ones_like(k[:, :, :32]), k, v).float()).sum() for k, v in out)
        del out
        loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    peak(fused)
    fused_peak, separate_peak = peak(fused), peak(separate)
    one_layer = 2 * b * lk * hd * 2
    assert fused_peak <= separate_peak + one_layer, (fused_peak, separate_peak, one_layer)


def _tiny_blip2_qformer(dtype):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Blip2QFormerConfig(hidden_size=256, num_attention_heads=4, intermediate_size=512,
                                          num_hidden_layers=4, cross_attention_frequency=2,
                                          encoder_hidden_size=192, use_qformer_text_input=True,
                                          attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.Blip2QFormerModel(cfg).to("cuda", dtype).eval()


def test_qformer_on_gpu_without_host_sync_matches_reference_backend():
    """mmkernels.QFormer in bf16 on the GPU (32 queries + 16 text tokens, padded text and image
    tokens): no host synchronisation in forward and backward, and the same output and input
    gradient as the same module on the reference backend."""
    hf = _tiny_blip2_qformer(torch.bfloat16)
    model = mmkernels.QFormer.from_hf(hf)
    b, s, lk = 8, 48, 257
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(b, s, 256, device="cuda", generator=g).bfloat16()
    img = torch.randn(b, lk, 192, device="cuda", generator=g).bfloat16()
    am = torch.ones(b, s, dtype=torch.bool, device="cuda")
    am[1:, 40:] = False
    em = torch.ones(b, lk, dtype=torch.bool, device="cuda")
    em[2, 200:] = False

    def step():
        xx = x.clone().requires_grad_()
        out = model(xx, img, query_length=32, attention_mask=am, encoder_attention_mask=em)
        out.float().square().sum().backward()
        return out.detach(), xx.grad

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with mmkernels.backend("reference"):
        want = step()
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    assert_close(got[0], want[0].double(), torch.bfloat16, scale=2.0, name="out")
    # dx went through four bf16 layers both ways: compare against its largest magnitude
    err = (got[1].float() - want[1].float()).abs().max().item()
    assert err <= 0.05 * want[1].float().abs().max().item(), err


def test_patch_blip2_on_gpu_matches_hf():
    """HF's Q-Former in fp32 on the GPU, before and after patch_blip2 (eval mode)."""
    from mmkernels.integrations.transformers import patch_blip2
    hf = _tiny_blip2_qformer(torch.float32)
    b, s, lk = 4, 48, 257
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(b, s, 256, device="cuda", generator=g)
    img = torch.randn(b, lk, 192, device="cuda", generator=g)

    def step():
        xx = x.clone().requires_grad_()
        out = hf(xx, query_length=32, encoder_hidden_states=img).last_hidden_state
        out.square().sum().backward()
        return out.detach(), xx.grad

    want = step()
    unpatch = patch_blip2(hf)
    got = step()
    unpatch()
    for a, r in zip(got, want):  # two fp32 computations of the same function
        torch.testing.assert_close(a, r, atol=2e-4, rtol=2e-4)
