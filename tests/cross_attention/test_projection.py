"""fused_kv_projection: one GEMM for the K/V of every cross-attention layer, against per-layer
nn.functional.linear, forward and every gradient; share_kv_storage; bad inputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mmkernels
from mmkernels import _storage
from mmkernels.cross_attention import share_kv_storage
from mmkernels.testing.numerics import assert_close


def _layers(n, hd, c, dtype=torch.float64, bias=True, seed=0):
    torch.manual_seed(seed)
    return [(nn.Linear(c, hd, bias=bias).to(dtype), nn.Linear(c, hd, bias=bias).to(dtype)) for _ in range(n)]


def _per_layer(x, layers, heads):
    b, lk, _ = x.shape
    out = []
    for lin_k, lin_v in layers:
        k = lin_k(x).view(b, lk, heads, -1).transpose(1, 2)
        v = lin_v(x).view(b, lk, heads, -1).transpose(1, 2)
        out.append((k, v))
    return out


def _weights(layers):
    ws = [(k.weight, v.weight) for k, v in layers]
    bs = None if layers[0][0].bias is None else [(k.bias, v.bias) for k, v in layers]
    return ws, bs


def _params(layers):
    return [p for pair in layers for m in pair for p in m.parameters()]


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_per_layer_projections_with_gradients(shared, bias):
    heads, d, c = 3, 8, 20
    layers = _layers(4, heads * d, c, bias=bias)
    if shared:
        share_kv_storage(layers)
        assert _storage.contiguous_run([m.weight for p in layers for m in p]) is not None
    x = torch.randn(2, 7, c, dtype=torch.float64, requires_grad=True)
    ws, bs = _weights(layers)
    got = mmkernels.fused_kv_projection(x, ws, bs, num_heads=heads)
    douts = [(torch.randn_like(k), torch.randn_like(v)) for k, v in got]
    loss = sum((k * dk).sum() + (v * dv).sum() for (k, v), (dk, dv) in zip(got, douts))
    loss.backward()
    got_grads = [x.grad.clone()] + [p.grad.clone() for p in _params(layers)]
    x.grad = None
    for p in _params(layers):
        p.grad = None
    want = _per_layer(x, layers, heads)
    loss = sum((k * dk).sum() + (v * dv).sum() for (k, v), (dk, dv) in zip(want, douts))
    loss.backward()
    want_grads = [x.grad] + [p.grad for p in _params(layers)]
    for (gk, gv), (wk, wv) in zip(got, want):
        assert gk.shape == (2, heads, 7, d)
        assert_close(gk, wk)
        assert_close(gv, wv)
    for g, w in zip(got_grads, want_grads):
        assert_close(g, w)


def test_outputs_are_views_of_one_gemm_output():
    layers = _layers(3, 16, 12)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    out = mmkernels.fused_kv_projection(x, *_weights(layers), num_heads=2)
    base = out[0][0]._base
    assert base is not None and base.numel() == 2 * 5 * 3 * 2 * 16
    for k, v in out:
        assert k._base is base and v._base is base
        assert k.stride() == (5 * 96, 8, 96, 1)


def test_gradcheck():
    layers = _layers(2, 4, 5)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    params = _params(layers)

    def f(x, *ps):
        ws = [(ps[0], ps[2]), (ps[4], ps[6])]
        bs = [(ps[1], ps[3]), (ps[5], ps[7])]
        return tuple(t for pair in mmkernels.fused_kv_projection(x, ws, bs, num_heads=2) for t in pair)

    assert torch.autograd.gradcheck(f, (x, *params))


def test_only_some_outputs_used():
    """Layers whose outputs are unused get no gradient (None, as with separate projections); an
    unused half of a used layer gets zeros."""
    layers = _layers(3, 8, 6)
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    out = mmkernels.fused_kv_projection(x, *_weights(layers), num_heads=2)
    out[1][0].sum().backward()
    assert layers[0][0].weight.grad is None and layers[2][1].weight.grad is None
    assert torch.count_nonzero(layers[1][0].weight.grad) > 0
    assert torch.count_nonzero(layers[1][1].weight.grad) == 0
    want = torch.autograd.grad(_per_layer(x, layers, 2)[1][0].sum(), x)[0]
    assert_close(x.grad, want)


def test_share_kv_storage_keeps_parameters_and_values():
    layers = _layers(3, 8, 6, dtype=torch.float32)
    before = [p.detach().clone() for p in _params(layers)]
    ids = [id(p) for p in _params(layers)]
    opt = torch.optim.SGD(_params(layers), lr=0.1)
    share_kv_storage(layers)
    assert [id(p) for p in _params(layers)] == ids
    for p, b in zip(_params(layers), before):
        assert torch.equal(p.detach(), b)
    ws = [m.weight for pair in layers for m in pair]
    run = _storage.contiguous_run(ws)
    assert run is not None and run.shape == (6 * 8, 6)
    # an optimiser step updates the shared storage in place: the packed view sees it
    x = torch.randn(2, 3, 6)
    out = mmkernels.fused_kv_projection(x, *_weights(layers), num_heads=2)
    sum(t.sum() for pair in out for t in pair).backward()
    opt.step()
    assert torch.equal(_storage.contiguous_run(ws), torch.cat([w.detach() for w in ws]))
    new = mmkernels.fused_kv_projection(x, *_weights(layers), num_heads=2)
    assert_close(new[2][1], _per_layer(x, layers, 2)[2][1].double())


def test_weights_updated_through_data_are_seen():
    """Separate weights are concatenated per call, so updates through ``.data`` (no version bump) count."""
    layers = _layers(2, 4, 5)
    x = torch.randn(1, 3, 5, dtype=torch.float64)
    mmkernels.fused_kv_projection(x, *_weights(layers), num_heads=1)
    layers[1][1].weight.data.add_(1.0)
    got = mmkernels.fused_kv_projection(x, *_weights(layers), num_heads=1)
    assert_close(got[1][1], _per_layer(x, layers, 1)[1][1])


@pytest.mark.parametrize("case,exc,words", [
    ("rank", ValueError, "image_embeds must have 3 dimensions"),
    ("not_pairs", TypeError, "(k, v) pair"),
    ("empty", TypeError, "non-empty sequence"),
    ("width", ValueError, "image_embeds' width"),
    ("rows", ValueError, "shape [H * D, C]"),
    ("heads", ValueError, "multiple of num_heads"),
    ("heads_type", ValueError, "num_heads"),
    ("dtype", TypeError, "dtype"),
    ("bias_shape", ValueError, "biases[1].v"),
    ("bias_layers", ValueError, "layers"),
])
def test_bad_inputs(case, exc, words):
    c, hd = 6, 8
    x = torch.randn(2, 3, c)
    ws = [(torch.randn(hd, c), torch.randn(hd, c)) for _ in range(2)]
    bs = [(torch.randn(hd), torch.randn(hd)) for _ in range(2)]
    heads = 2
    if case == "rank":
        x = x[0]
    elif case == "not_pairs":
        ws = [torch.randn(hd, c)]
    elif case == "empty":
        ws = []
    elif case == "width":
        x = torch.randn(2, 3, c + 1)
    elif case == "rows":
        ws[1] = (ws[1][0], torch.randn(hd + 2, c))
    elif case == "heads":
        heads = 3
    elif case == "heads_type":
        heads = 0
    elif case == "dtype":
        ws[0] = (ws[0][0].double(), ws[0][1])
    elif case == "bias_shape":
        bs[1] = (bs[1][0], torch.randn(hd + 1))
    elif case == "bias_layers":
        bs = bs[:1]
    with pytest.raises(exc) as info:
        mmkernels.fused_kv_projection(x, ws, bs, num_heads=heads)
    assert words in str(info.value), str(info.value)


def test_torch_compile_fullgraph():
    layers = _layers(2, 8, 6, dtype=torch.float32)
    x0 = torch.randn(2, 3, 6)

    def step(x, *ps):
        out = mmkernels.fused_kv_projection(x, [(ps[0], ps[1]), (ps[2], ps[3])], None, num_heads=2)
        return sum((k * v).sum() for k, v in out)

    ws = [m.weight for pair in layers for m in pair]
    x = x0.clone().requires_grad_()
    loss = torch.compile(step, fullgraph=True)(x, *ws)
    loss.backward()
    got = [x.grad.clone()] + [w.grad.clone() for w in ws]
    for w in ws:
        w.grad = None
    x = x0.clone().requires_grad_()
    step(x, *ws).backward()
    for g, w in zip(got, [x.grad] + [w.grad for w in ws]):
        assert_close(g, w.double(), scale=4.0)
