"""``mmkernels.modality_layer_norm`` and ``MultiwayLayerNorm`` against the loop-over-experts reference.

The public function on the ``cpu`` and ``triton`` backends, forward and every gradient, in
float64; gradcheck, opcheck and ``torch.compile``; the module against VLMo's per-modality
LayerNorms and torchscale's ``MultiwayNetwork``; per-expert parameters, autocast, bad input.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmkernels
from mmkernels import _ext
from mmkernels.experts import routing
from mmkernels.experts.reference import modality_layer_norm_reference
from mmkernels.testing.numerics import assert_close
from tests.experts.cases import leaf, make_ids, randn
from tests.helpers.backends import require_backend

BACKENDS = ["cpu", "triton"]
NAMES = ("y", "dx", "dweight", "dbias")


def _require(backend):
    require_backend(backend, "layer-norm", "experts_layer_norm_fwd", "mmkernels.experts.layer_norm.kernels")


def _inputs(lead, h, e, bias=True, seed=0):
    """x with a per-token offset and spread (the mean and variance matter), scales around 1."""
    x = randn(*lead, h, seed=seed) * (1 + randn(*lead, 1, seed=seed + 1).abs()) + randn(*lead, 1, seed=seed + 2)
    w = 1 + 0.3 * randn(e, h, seed=seed + 3)
    b = 0.5 * randn(e, h, seed=seed + 4) if bias else None
    return x, w, b


def _run(backend, x, ids, w, b, dy, dtype, wdtype=None, eps=1e-5):
    """Forward and backward on ``backend`` (``"reference"``: the reference function with dense ids)."""
    wdtype = dtype if wdtype is None else wdtype
    x, w, b = leaf(x, dtype), leaf(w, wdtype), leaf(b, wdtype)
    if backend == "reference":
        dense = ids if isinstance(ids, torch.Tensor) else routing.split_ids(x.shape[0], x.shape[1], ids, x.device)
        y = modality_layer_norm_reference(x, dense, w, b, eps)
    else:
        with mmkernels.backend(backend):
            y = mmkernels.modality_layer_norm(x, ids, w, b, eps)
    y.backward(dy.to(y.dtype))
    return [y, x.grad, w.grad, None if b is None else b.grad]


def _compare(backend, x, ids, w, b, dtype=torch.float32, wdtype=None, seed=9, eps=1e-5):
    dy = randn(*x.shape, seed=seed)
    got = _run(backend, x, ids, w, b, dy, dtype, wdtype, eps)
    ref = _run("reference", x, ids, w, b, dy, torch.float64, eps=eps)
    eager = _run("reference", x, ids, w, b, dy, dtype, wdtype, eps)
    wdtype = dtype if wdtype is None else wdtype
    for name, g, r, ea, want in zip(NAMES, got, ref, eager, (dtype, dtype, wdtype, wdtype)):
        if r is None:
            assert g is None, name
            continue
        assert g is not None, f"{name}: no gradient"
        assert g.dtype == want, f"{name}: dtype {g.dtype}, expected {want}"
        # the weight and bias gradients sum over an expert's tokens: the tolerance scales with it
        scale = 4.0 if name in ("dweight", "dbias") else 1.0
        assert_close(g, r, want if name in ("dweight", "dbias") else dtype, eager=ea, scale=scale,
                     name=f"{backend} layer_norm {name}")
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("e,layout", [(1, "random"), (2, "random"), (3, "random"), (3, "empty"), (3, "one")])
def test_experts_and_layouts(backend, e, layout):
    _require(backend)
    x, w, b = _inputs((3, 13), 40, e, seed=1)
    _compare(backend, x, make_ids((3, 13), e, layout, seed=2), w, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1, 7, 97])
def test_ragged_token_counts(backend, t):
    _require(backend)
    x, w, b = _inputs((t,), 24, 3, seed=3)
    _compare(backend, x, make_ids((t,), 3, seed=4), w, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
                                          (torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
                         ids=["fp32", "bf16", "fp16", "bf16-fp32params", "fp16-fp32params"])
def test_dtypes(backend, dtype, wdtype):
    _require(backend)
    x, w, b = _inputs((2, 19), 96, 2, seed=5)
    _compare(backend, x, make_ids((2, 19), 2, seed=6), w, b, dtype, wdtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_bias_and_other_eps(backend):
    _require(backend)
    x, w, _ = _inputs((21,), 33, 2, bias=False, seed=7)
    x = x * 1e-3  # variance ~1e-6: eps = 1e-6 is not negligible
    _compare(backend, x, make_ids((21,), 2, seed=8), w, None, eps=1e-6)


def test_cpu_float64():
    _require("cpu")
    x, w, b = _inputs((2, 9), 17, 3, seed=10)
    ids = make_ids((2, 9), 3, "empty", seed=11)
    dy = randn(2, 9, 17, seed=12)
    got = _run("cpu", x, ids, w, b, dy, torch.float64)
    ref = _run("reference", x, ids, w, b, dy, torch.float64)
    for name, g, r in zip(NAMES, got, ref):
        assert_close(g, r, torch.float64, name=name)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("p", [0, 3, 9])
def test_split_position_equals_ids(backend, p):
    if backend != "reference":
        _require(backend)
    x, w, b = _inputs((2, 9), 16, 2, seed=13)
    dy = randn(2, 9, 16, seed=14)
    by_split = _run(backend, x, p, w, b, dy, torch.float32)
    ids = routing.split_ids(2, 9, p, x.device)
    by_ids = _run(backend, x, ids, w, b, dy, torch.float32)
    for name, s, i in zip(NAMES, by_split, by_ids):
        assert torch.equal(s, i), name


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_zero_tokens(backend, lead):
    if backend != "reference":
        _require(backend)
    x, w, b = _inputs(lead, 8, 2, seed=15)
    got = _run(backend, x, make_ids(lead, 2, seed=16), w, b, randn(*lead, 8, seed=17), torch.float32)
    assert got[0].shape == (*lead, 8) and got[1].shape == (*lead, 8)
    assert torch.equal(got[2], torch.zeros_like(got[2])) and torch.equal(got[3], torch.zeros_like(got[3]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_ids_and_strided_views(backend):
    _require(backend)
    x, w, b = _inputs((5, 16), 30, 3, seed=18)
    wide = torch.cat([x, randn(5, 16, 7, seed=19)], -1)[..., :30]     # rows strided
    tr = x.transpose(0, 1).contiguous().transpose(0, 1)                # leading dims permuted
    for view in (wide, tr):
        assert not view.is_contiguous()
        _compare(backend, view, make_ids((5, 16), 3, seed=20, dtype=torch.int32), w, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_needs_input_grad_subsets(backend):
    """Only the gradients asked for are computed, and each equals the full backward's."""
    _require(backend)
    x0, w0, b0 = (t.float() for t in _inputs((2, 11), 20, 3, seed=21))
    ids = make_ids((2, 11), 3, seed=22)
    dy = randn(2, 11, 20, seed=23).float()
    with mmkernels.backend(backend):
        full = [t.clone().requires_grad_() for t in (x0, w0, b0)]
        mmkernels.modality_layer_norm(full[0], ids, full[1], full[2]).backward(dy)
        for wanted in ((0,), (1,), (2,), (1, 2)):
            ts = [t.clone().requires_grad_(i in wanted) for i, t in enumerate((x0, w0, b0))]
            mmkernels.modality_layer_norm(ts[0], ids, ts[1], ts[2]).backward(dy)
            for i, t in enumerate(ts):
                if i in wanted:
                    assert torch.equal(t.grad, full[i].grad), (wanted, i)
                else:
                    assert t.grad is None


def test_backward_is_asked_only_for_what_autograd_wants(monkeypatch):
    """The backward op gets ``needs_dx`` and a per-expert weight-gradient mask from
    ``requires_grad``: a frozen expert (per-expert parameters) or frozen parameters get no
    weight-gradient work, an input that needs no gradient gets no dx."""
    _require("cpu")
    calls = []
    real = _ext.C.experts_layer_norm_bwd

    def recording(*args):
        calls.append((args[-2], list(args[-1])))
        return real(*args)

    monkeypatch.setattr(_ext.C, "experts_layer_norm_bwd", recording)
    x0, w0, b0 = (t.float() for t in _inputs((2, 9), 16, 3, seed=60))
    ids = make_ids((2, 9), 3, seed=61)
    cases = [
        # (x trains, per-expert trains flags, expected (needs_dx, mask))
        (True, [False, True, True], (True, [False, True, True])),
        (True, [False, False, False], (True, [False, False, False])),
        (False, [True, False, True], (False, [True, False, True])),
    ]
    for x_trains, trains, want in cases:
        calls.clear()
        x = x0.clone().requires_grad_(x_trains)
        ws = [w0[e].clone().requires_grad_(f) for e, f in enumerate(trains)]
        bs = [b0[e].clone().requires_grad_(f) for e, f in enumerate(trains)]
        with mmkernels.backend("cpu"):
            y = mmkernels.modality_layer_norm(x, ids, ws, bs)
        if not y.requires_grad:
            assert not x_trains and not any(trains)
            continue
        y.sum().backward()
        assert calls == [want]
        for e, f in enumerate(trains):
            assert (ws[e].grad is not None) == f and (bs[e].grad is not None) == f


# ----------------------------------------------------------------------------- gradcheck, opcheck, compile

def test_gradcheck_float64_cpu():
    _require("cpu")
    x, w, b = (t.requires_grad_() for t in _inputs((2, 5), 6, 3, seed=24))
    ids = make_ids((2, 5), 3, "empty", seed=25)
    with mmkernels.backend("cpu"):
        assert torch.autograd.gradcheck(lambda *a: mmkernels.modality_layer_norm(a[0], ids, *a[1:]), (x, w, b))
        assert torch.autograd.gradcheck(lambda a, s: mmkernels.modality_layer_norm(a, 2, s, None, 1e-3),
                                        (x, w[:2].detach().requires_grad_()))


def _op_args(t=13, e=3, bias=True):
    x, w, b = (None if p is None else p.float() for p in _inputs((t,), 12, e, bias, seed=26))
    perm, offsets = routing.route(make_ids((t,), e, "empty", seed=27), e)
    return x, w, b, perm, offsets


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_cpu(bias):
    _require("cpu")
    ops = torch.ops.mmkernels
    x, w, b, perm, offsets = _op_args(bias=bias)
    e = w.shape[0]
    all_e, some_e, none_e = [True] * e, [i % 2 == 1 for i in range(e)], [False] * e
    leafs = [None if t is None else t.clone().requires_grad_() for t in (x, w, b)]
    for mask in (all_e, some_e):
        torch.library.opcheck(ops.modality_layer_norm_fwd.default, (*leafs, perm, offsets, 1e-5, mask, "cpu"))
    y, mean, rstd = ops.modality_layer_norm_fwd(x, w, b, perm, offsets, 1e-5, all_e, "cpu")
    dy = torch.randn_like(y)
    for needs_dx, mask in ((True, all_e), (True, none_e), (False, some_e)):
        torch.library.opcheck(ops.modality_layer_norm_bwd.default,
                              (dy, x, w, b, perm, offsets, mean, rstd, needs_dx, mask, "cpu"))


def test_opcheck_triton_schema_and_fake():
    _require("triton")
    ops = torch.ops.mmkernels
    x, w, b, perm, offsets = _op_args(t=9, e=2)
    torch.library.opcheck(ops.modality_layer_norm_fwd.default,
                          (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), perm, offsets, 1e-5,
                           [True, False], "triton"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("form", ["ids", "split"])
def test_torch_compile_fullgraph_cpu(form):
    _require("cpu")
    x0, w0, b0 = (t.float() for t in _inputs((2, 11), 16, 2, seed=28))
    ids = make_ids((2, 11), 2, seed=29) if form == "ids" else 4

    def step(x, w, b):
        return mmkernels.modality_layer_norm(x, ids, w, b)

    compiled = torch.compile(step, fullgraph=True)
    with mmkernels.backend("cpu"):
        c = [t.clone().requires_grad_() for t in (x0, w0, b0)]
        out = compiled(*c)
        (out * out).sum().backward()
        r = [t.clone().requires_grad_() for t in (x0, w0, b0)]
        ref = step(*r)
        (ref * ref).sum().backward()
    assert_close(out, ref.double(), scale=4.0)
    for a, b in zip(c, r):
        assert_close(a.grad, b.grad.double(), scale=4.0)


# ----------------------------------------------------------------------------- the module

def _layer_norms(n, h, eps, dtype=torch.float32, seed=30):
    norms = [nn.LayerNorm(h, eps=eps, dtype=dtype) for _ in range(n)]
    with torch.no_grad():
        for i, ln in enumerate(norms):
            ln.weight.copy_(1 + 0.3 * randn(h, seed=seed + 2 * i))
            ln.bias.copy_(0.5 * randn(h, seed=seed + 2 * i + 1))
    return norms


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_experts_reproduces_vlmo_norms(backend):
    """VLMo: ``norm2_text`` on the text positions, ``norm2_imag`` on the image ones, ``norm2_vl``
    in the vision-language layers (here: every token of the third modality)."""
    _require(backend)
    norms = _layer_norms(3, 48, eps=1e-6)
    module = mmkernels.MultiwayLayerNorm.from_experts(norms)
    assert module.eps == 1e-6 and module.num_experts == 3
    x = _inputs((2, 15), 48, 1, seed=31)[0].float()
    ids = make_ids((2, 15), 3, seed=32)
    want = torch.zeros_like(x)
    for e, ln in enumerate(norms):
        want[ids == e] = ln(x[ids == e])
    with mmkernels.backend(backend):
        got = module(x, ids)
    assert_close(got, want.double(), scale=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_experts_reproduces_torchscale_multiway(backend):
    """torchscale's ``MultiwayNetwork`` around a LayerNorm: split at ``split_position`` along the
    sequence, ``A`` on the first part, ``B`` on the rest, concatenate; gradients too."""
    _require(backend)
    a, b = _layer_norms(2, 32, eps=1e-5, seed=40)
    module = mmkernels.MultiwayLayerNorm.from_experts([a, b])
    x0 = _inputs((3, 10), 32, 1, seed=41)[0].float()
    dy = randn(3, 10, 32, seed=42).float()
    x1 = x0.clone().requires_grad_()
    x2, y2 = x0.split([4, 6], dim=1)
    want = torch.cat([a(x2), b(y2)], dim=1)
    want.backward(dy)
    x = x0.clone().requires_grad_()
    with mmkernels.backend(backend):
        got = module(x, 4)
    got.backward(dy)
    assert_close(got, want.double(), scale=2.0)
    assert_close(x.grad, torch.autograd.grad(torch.cat([a(x1[:, :4]), b(x1[:, 4:])], 1), x1, dy)[0].double(),
                 scale=2.0)
    assert_close(module.weight.grad[0], a.weight.grad.double(), scale=4.0)
    assert_close(module.bias.grad[1], b.bias.grad.double(), scale=4.0)


def test_per_expert_parameters_freeze_one_expert_and_load_either_layout():
    _require("cpu")
    norms = _layer_norms(2, 16, eps=1e-5, seed=50)
    norms[0].weight.requires_grad_(False)
    norms[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="per_expert_parameters=True"):
        mmkernels.MultiwayLayerNorm.from_experts(norms)
    module = mmkernels.MultiwayLayerNorm.from_experts(norms, per_expert_parameters=True)
    assert [p.requires_grad for p in module.weight] == [False, True]
    x = _inputs((2, 7), 16, 1, seed=51)[0].float().requires_grad_()
    ids = make_ids((2, 7), 2, seed=52)
    with mmkernels.backend("cpu"):
        module(x, ids).square().sum().backward()
    assert module.weight[0].grad is None and module.bias[0].grad is None
    assert module.weight[1].grad is not None and module.weight[1].grad.abs().sum() > 0
    stacked = mmkernels.MultiwayLayerNorm(16, 2)
    stacked.load_state_dict(module.state_dict())
    assert torch.equal(stacked.weight, torch.stack(list(module.weight)))
    back = mmkernels.MultiwayLayerNorm(16, 2, per_expert_parameters=True)
    back.load_state_dict(stacked.state_dict())
    assert torch.equal(back.bias[1], module.bias[1])


def test_module_defaults_are_the_identity_affine():
    module = mmkernels.MultiwayLayerNorm(12, num_experts=3, bias=False)
    assert module.bias is None and torch.equal(module.weight, torch.ones(3, 12))
    x = _inputs((4,), 12, 1, seed=53)[0].float()
    with mmkernels.backend("reference"):
        got = module(x, make_ids((4,), 3, seed=54))
    assert_close(got, F.layer_norm(x.double(), (12,)))


def test_cpu_autocast_keeps_the_input_dtype_as_layer_norm_does():
    """CPU autocast leaves ``layer_norm`` alone: bf16 activations with fp32 parameters give bf16,
    fp32 activations give fp32, as ``nn.LayerNorm`` does there."""
    _require("cpu")
    ln = nn.LayerNorm(16)
    module = mmkernels.MultiwayLayerNorm.from_experts([ln, ln])
    ids = make_ids((5,), 2, seed=55)
    for dtype in (torch.bfloat16, torch.float32):
        x = _inputs((5,), 16, 1, seed=56)[0].to(dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16), mmkernels.backend("cpu"):
            got, want = module(x, ids), ln(x)
        assert got.dtype == want.dtype == dtype
        assert_close(got, want.double(), scale=2.0)


# ----------------------------------------------------------------------------- bad input

def _x(h=8):
    return torch.randn(3, h)


@pytest.mark.parametrize("make,err,match", [
    (lambda: (_x(), torch.zeros(3, dtype=torch.long), torch.ones(2, 9), None), ValueError, "H = 9"),
    (lambda: (_x(), torch.zeros(3, dtype=torch.long), torch.ones(2, 8), torch.zeros(3, 8)), ValueError, r"\[2, 8\]"),
    (lambda: (_x(), torch.zeros(3, dtype=torch.long), torch.ones(8), None), ValueError, "2"),
    (lambda: (_x(), torch.zeros(3, dtype=torch.long), torch.ones(9, 8), None), ValueError, "1..8"),
    (lambda: (_x(), torch.zeros(3, dtype=torch.long), torch.ones(2, 8, dtype=torch.float16), None), TypeError,
     "x's dtype"),
    (lambda: (_x().half(), torch.zeros(3, dtype=torch.long), torch.ones(2, 8), torch.zeros(2, 8).half()), TypeError,
     "weight has"),
    (lambda: (_x(), torch.tensor([0, 2, 1]), torch.ones(2, 8), None), ValueError, "modality_ids"),
    (lambda: (_x(), torch.zeros(3, dtype=torch.bool), torch.ones(2, 8), None), TypeError, "bool"),
    (lambda: (_x(), torch.zeros(4, dtype=torch.long), torch.ones(2, 8), None), ValueError, "leading shape"),
    (lambda: (_x().long(), torch.zeros(3, dtype=torch.long), torch.ones(2, 8), None), TypeError, "float"),
])
def test_bad_inputs(make, err, match):
    x, ids, w, b = make()
    for backend in ("reference", "cpu"):
        with pytest.raises(err, match=match), mmkernels.backend(backend):
            mmkernels.modality_layer_norm(x, ids, w, b)


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), True, "1e-5"])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        mmkernels.modality_layer_norm(_x(), torch.zeros(3, dtype=torch.long), torch.ones(2, 8), None, eps)
    with pytest.raises(ValueError, match="eps"):
        mmkernels.MultiwayLayerNorm(8, eps=eps)


def test_from_experts_refuses_what_it_cannot_reproduce():
    ln = nn.LayerNorm(8)
    with pytest.raises(TypeError, match="RMSNorm"):
        mmkernels.MultiwayLayerNorm.from_experts([nn.RMSNorm(8), nn.RMSNorm(8)])
    with pytest.raises(ValueError, match="eps"):
        mmkernels.MultiwayLayerNorm.from_experts([ln, nn.LayerNorm(8, eps=1e-6)])
    with pytest.raises(ValueError, match="normalises"):
        mmkernels.MultiwayLayerNorm.from_experts([ln, nn.LayerNorm(9)])
    with pytest.raises(ValueError, match="elementwise_affine"):
        mmkernels.MultiwayLayerNorm.from_experts([nn.LayerNorm(8, elementwise_affine=False)] * 2)
    with pytest.raises(ValueError, match="last dimension"):
        mmkernels.MultiwayLayerNorm.from_experts([nn.LayerNorm((2, 8))] * 2)
    with pytest.raises(ValueError, match="bias"):
        mmkernels.MultiwayLayerNorm.from_experts([ln, nn.LayerNorm(8, bias=False)])
    with pytest.raises(TypeError, match="dtypes"):
        mmkernels.MultiwayLayerNorm.from_experts([ln, nn.LayerNorm(8, dtype=torch.float64)])
    with pytest.raises(TypeError, match="sequence"):
        mmkernels.MultiwayLayerNorm.from_experts(ln)
    with pytest.raises(ValueError, match="normalized_shape"):
        mmkernels.MultiwayLayerNorm((2, 8))
