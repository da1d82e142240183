"""Attention, cross-attention and the fused K/V projection under ``torch.autocast``.

Their PyTorch counterparts (``scaled_dot_product_attention``, ``nn.Linear``) are ops autocast
runs in its lower-precision dtype, so under autocast these cast their floating inputs to it
first (``mmkernels._autocast``): mixed bf16/fp32 inputs, which mixed-precision training
produces, work, and fp32 inputs run the 16-bit kernels. Each check compares against the same op
called with the inputs already cast, outside autocast: the cast must be the only difference.
The experts ops have their own file (tests/experts/test_autocast.py).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mmkernels
from mmkernels import _autocast
from mmkernels.testing.numerics import assert_close

BACKENDS = ["reference", "cpu", "triton"]
BF16 = torch.bfloat16


def _randn(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _run(fn, leaves, dy):
    out = fn(*leaves)
    out.backward(dy)
    return out, [t.grad for t in leaves]


def _same_as_cast_inputs(fn, inputs, dy, backend, dtype=BF16):
    """``fn`` under autocast on ``inputs`` against ``fn`` on the inputs cast to ``dtype`` outside
    it: same output (in ``dtype``), and gradients equal to the cast run's, in each input's dtype.
    Equal bit for bit on the kernel backends; the reference backend is eager PyTorch, whose own
    ops autocast also changes (softmax in fp32), so there the two agree to bf16 tolerance."""
    leaves = [_leaf(t) for t in inputs]
    with torch.autocast("cpu", dtype=dtype), mmkernels.backend(backend):
        out, grads = _run(fn, leaves, dy)
    cast = [_leaf(t.to(dtype)) for t in inputs]
    with mmkernels.backend(backend):
        want, want_grads = _run(fn, cast, dy)
    assert out.dtype == dtype
    same = (lambda a, b, n: assert_close(a, b.double(), dtype, name=n)) if backend == "reference" else \
        (lambda a, b, n: torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n))
    same(out, want, "output")
    for i, (t, g, w) in enumerate(zip(inputs, grads, want_grads)):
        assert g.dtype == t.dtype
        same(g, w.to(t.dtype), f"grad {i}")


def test_lower_precision_casts_what_autocast_casts():
    x32, x64, i = torch.ones(2), torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.int64)
    assert _autocast.lower_precision(x32, x64, i, None, 3) == (x32, x64, i, None, 3)  # autocast off
    with torch.autocast("cpu", dtype=torch.float16):
        a, b, c, d, e = _autocast.lower_precision(x32, x64, i, None, 3)
        assert a.dtype == torch.float16 and b is x64 and c is i and d is None and e == 3
        meta = torch.ones(2, device="meta")
        assert _autocast.lower_precision(meta, x32)[0] is meta  # no autocast state for meta
        with torch.autocast("cpu", enabled=False):
            assert _autocast.lower_precision(x32)[0] is x32


@pytest.mark.parametrize("backend", BACKENDS)
def test_multimodal_attention_under_autocast(backend):
    q = _randn(2, 4, 9, 16, seed=1)
    k = _randn(2, 2, 9, 16, seed=2)
    v = _randn(2, 2, 9, 16, seed=3)
    mask = mmkernels.MultimodalMask.causal(2, 9)
    _same_as_cast_inputs(lambda *t: mmkernels.multimodal_attention(*t, mask), [q, k, v],
                         _randn(2, 4, 9, 16, seed=4, dtype=BF16), backend)
    with mmkernels.backend(backend):
        # mixed: bf16 queries beside fp32 keys/values
        with torch.autocast("cpu", dtype=BF16):
            assert mmkernels.multimodal_attention(q.to(BF16), k, v, mask).dtype == BF16
        with pytest.raises(TypeError, match="dtype"):
            mmkernels.multimodal_attention(q.to(BF16), k, v, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_attention_under_autocast(backend):
    q = _randn(2, 3, 8, 16, seed=5)
    k = _randn(2, 3, 20, 16, seed=6)
    v = _randn(2, 3, 20, 16, seed=7)
    pad = torch.ones(2, 20, dtype=torch.bool)
    pad[1, 13:] = False
    _same_as_cast_inputs(lambda *t: mmkernels.cross_attention(*t, key_padding_mask=pad), [q, k, v],
                         _randn(2, 3, 8, 16, seed=8, dtype=BF16), backend)
    with mmkernels.backend(backend):
        with torch.autocast("cpu", dtype=BF16):
            assert mmkernels.cross_attention(q, k.to(BF16), v, key_padding_mask=pad).dtype == BF16
        with pytest.raises(TypeError, match="dtype"):
            mmkernels.cross_attention(q, k.to(BF16), v, key_padding_mask=pad)


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared_storage"])
def test_fused_kv_projection_under_autocast(shared):
    """bf16 image features (an fp16/bf16 vision tower) with the fp32 K/V linears of a Q-Former:
    runs under autocast as the separate ``nn.Linear`` s do, bf16 K/V, fp32 parameter gradients,
    the backward GEMMs in bf16 (the gradients equal those of bf16 copies of the weights)."""
    torch.manual_seed(9)
    layers, heads, c, hd = 3, 2, 24, 16
    linears = [(nn.Linear(c, hd), nn.Linear(c, hd)) for _ in range(layers)]
    if shared:
        mmkernels.share_kv_storage(linears)
    low = [(nn.Linear(c, hd).to(BF16), nn.Linear(c, hd).to(BF16)) for _ in range(layers)]
    for pair, lpair in zip(linears, low):
        for m, lm in zip(pair, lpair):
            lm.load_state_dict(m.state_dict())
    x = _randn(2, 10, c, seed=10, dtype=BF16)
    dys = [_randn(2, heads, 10, hd // heads, seed=20 + i, dtype=BF16) for i in range(2 * layers)]

    def project(mods, feats):
        kv = mmkernels.fused_kv_projection(feats, [(a.weight, b.weight) for a, b in mods],
                                           [(a.bias, b.bias) for a, b in mods], num_heads=heads)
        return [t for pair in kv for t in pair]

    xa = _leaf(x)
    with torch.autocast("cpu", dtype=BF16):
        outs = project(linears, xa)
        eager = [m(xa) for pair in linears for m in pair]
    assert all(o.dtype == BF16 for o in outs) and all(e.dtype == BF16 for e in eager)
    torch.autograd.backward(outs, dys)
    xl = _leaf(x)
    want = project(low, xl)
    torch.autograd.backward(want, dys)
    for o, w in zip(outs, want):
        assert torch.equal(o, w)
    assert torch.equal(xa.grad, xl.grad)
    for pair, lpair in zip(linears, low):
        for m, lm in zip(pair, lpair):
            for p, lp in ((m.weight, lm.weight), (m.bias, lm.bias)):
                assert p.grad.dtype == torch.float32
                assert torch.equal(p.grad, lp.grad.float())
    with pytest.raises(TypeError, match="dtype"):
        project(linears, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_contrastive_losses_under_autocast(backend):
    """OpenCLIP computes ``CE(logit_scale * img @ txt.T)`` inside autocast: a bf16 matmul of its
    (fp32, normalised) features and an fp32 cross-entropy. The losses follow that rule: features
    cast to the autocast dtype, the loss in float32, gradients back in each feature's dtype."""
    img = torch.nn.functional.normalize(_randn(12, 16, seed=30), dim=-1)
    txt = torch.nn.functional.normalize(_randn(12, 16, seed=31), dim=-1)
    keys = torch.nn.functional.normalize(_randn(20, 16, seed=32), dim=-1)
    targets = torch.arange(12) + 3
    cases = {"contrastive_loss": (lambda a, b, s: mmkernels.contrastive_loss(a, b, s), (img, txt)),
             "infonce_loss": (lambda a, b, s: mmkernels.infonce_loss(a, b, s, targets=targets), (img, keys))}
    for name, (fn, (a, b)) in cases.items():
        la, lb, ls = _leaf(a), _leaf(b), torch.tensor(14.0, requires_grad=True)
        with torch.autocast("cpu", dtype=BF16), mmkernels.backend(backend):
            loss = fn(la, lb, ls)
        assert loss.dtype == torch.float32, name
        loss.backward()
        ca, cb, cs = _leaf(a.to(BF16)), _leaf(b.to(BF16)), torch.tensor(14.0, requires_grad=True)
        with mmkernels.backend(backend):
            want = fn(ca, cb, cs)
        want.backward()
        assert want.dtype == BF16
        assert la.grad.dtype == lb.grad.dtype == torch.float32
        if backend == "reference":  # eager PyTorch: autocast also changes its own ops
            assert_close(loss, want.double(), BF16, name=name)
            continue
        assert torch.equal(loss.to(BF16), want), name
        for got, ref in ((la.grad, ca.grad), (lb.grad, cb.grad), (ls.grad, cs.grad)):
            torch.testing.assert_close(got, ref.to(got.dtype), rtol=0, atol=0, msg=name)
    with mmkernels.backend(backend):
        with torch.autocast("cpu", dtype=BF16):  # mixed dtypes, float64 left alone
            assert mmkernels.contrastive_loss(img.to(BF16), txt, 10.0).dtype == torch.float32
            if backend != "triton":  # the triton backend takes no float64
                assert mmkernels.contrastive_loss(img.double(), txt.double(), 10.0).dtype == torch.float64
        with pytest.raises(TypeError, match="dtype"):
            mmkernels.contrastive_loss(img.to(BF16), txt, 10.0)
