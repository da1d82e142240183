"""Multiway modules with ``per_expert_parameters=True``: one parameter per expert, so one expert
can be frozen (CogVLM pretraining trains the visual expert beside a frozen language expert).

The per-expert parameters are views of one storage, read by the ops as the ``[E, ...]`` stack
without a copy; results must equal the stacked layout's exactly, and a frozen expert must get
no gradient and no optimiser update.
"""
from __future__ import annotations

import copy
import io
import operator

import pytest
import torch
from torch import nn

import mmkernels
from mmkernels import MultiwayFFN, MultiwayLinear, _storage
from mmkernels.testing.numerics import assert_close
from tests.helpers.peer_models import LlamaMLP
from tests.experts.cases import make_ids, randn, record_launches
from tests.helpers.backends import require_backend

BACKENDS = ["reference", "cpu", "triton"]


def _require(backend):
    require_backend(backend, "experts", "experts_linear_fwd")


def _names(module):
    return [n for n in ("weight", "bias", "w_in", "b_in", "w_out", "b_out") if getattr(module, n, None) is not None]


def _one_storage(module):
    return all(_storage.contiguous_run(list(getattr(module, n))) is not None for n in _names(module))


def _stacked_twin(module):
    """The same module in the stacked layout, with equal weights."""
    twin = copy.deepcopy(module)
    for n in _names(module):
        plist = getattr(module, n)
        setattr(twin, n, nn.Parameter(torch.stack([p.detach() for p in plist])))
    twin.per_expert_parameters = False
    return twin


def _make(kind):
    torch.manual_seed(3)
    if kind == "linear":
        return MultiwayLinear(20, 12, num_experts=3, per_expert_parameters=True)
    return MultiwayFFN(20, 28, num_experts=2, activation=kind, bias=kind != "swiglu", per_expert_parameters=True)


@pytest.mark.parametrize("kind", ["linear", "gelu", "swiglu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_expert_parameters_compute_what_the_stacked_layout_computes(backend, kind):
    _require(backend)
    m = _make(kind)
    assert isinstance(m.weight if kind == "linear" else m.w_in, nn.ParameterList) and _one_storage(m)
    twin = _stacked_twin(m)
    e = m.num_experts
    x = randn(2, 11, 20, seed=4, dtype=torch.float32)
    ids = make_ids((2, 11), e, seed=5)
    dy = randn(2, 11, 12 if kind == "linear" else 20, seed=6, dtype=torch.float32)
    outs = []
    for mod in (m, twin):
        xx = x.clone().requires_grad_()
        with mmkernels.backend(backend):
            y = mod(xx, ids)
        y.backward(dy)
        outs.append((y, xx.grad, {n: getattr(mod, n) for n in _names(mod)}))
    (y, dx, params), (y2, dx2, params2) = outs
    assert torch.equal(y, y2) and torch.equal(dx, dx2)
    for n in params:
        for i in range(e):
            assert torch.equal(params[n][i].grad, params2[n].grad[i]), f"{n}[{i}]"


def test_frozen_language_expert_stays_frozen_through_training():
    """CogVLM pretraining: the language expert (0) frozen, the visual expert (1) trained with
    AdamW and weight decay. The language weights get no gradient and stay bit-identical; the
    visual ones get the original module's gradients."""
    _require("cpu")
    torch.manual_seed(7)
    language, vision = LlamaMLP(16, 24), LlamaMLP(16, 24)
    language.requires_grad_(False)
    with pytest.raises(ValueError, match="per_expert_parameters=True"):
        MultiwayFFN.from_experts([language, vision])
    fused = MultiwayFFN.from_experts([language, vision], per_expert_parameters=True)
    assert [p.requires_grad for p in fused.w_in] == [False, True]
    assert [p.requires_grad for p in fused.w_out] == [False, True]
    assert _one_storage(fused)
    frozen = [p.detach().clone() for p in (fused.w_in[0], fused.w_out[0])]

    x = randn(2, 9, 16, seed=8, dtype=torch.float32)
    ids = make_ids((2, 9), 2, seed=9)
    dy = randn(2, 9, 16, seed=10, dtype=torch.float32)
    opt = torch.optim.AdamW(fused.parameters(), lr=1e-2, weight_decay=0.1)
    with mmkernels.backend("cpu"):
        fused(x, ids).backward(dy)
    assert fused.w_in[0].grad is None and fused.w_out[0].grad is None
    for g in (fused.w_in[1].grad, fused.w_out[1].grad):  # no dead frozen slice kept alive by a view
        assert g.untyped_storage().nbytes() == g.numel() * g.element_size()
    ref = copy.deepcopy(vision).double()
    mask = (ids == 1).unsqueeze(-1)
    (ref(x.double()) * mask).backward(dy.double())
    want_in = torch.cat([ref.gate_proj.weight.grad, ref.up_proj.weight.grad])
    assert_close(fused.w_in[1].grad, want_in, torch.float32, scale=4.0, name="visual w_in grad")
    assert_close(fused.w_out[1].grad, ref.down_proj.weight.grad, torch.float32, scale=4.0, name="visual w_out grad")
    before = fused.w_in[1].detach().clone()
    opt.step()
    assert torch.equal(fused.w_in[0], frozen[0]) and torch.equal(fused.w_out[0], frozen[1])
    assert not torch.equal(fused.w_in[1], before)
    assert _one_storage(fused)  # the optimiser updates in place


def test_from_experts_per_expert_still_refuses_a_split_expert():
    """Per expert, an expert's gate and up projections become one parameter: they must agree."""
    language, vision = LlamaMLP(16, 24), LlamaMLP(16, 24)
    language.gate_proj.requires_grad_(False)
    with pytest.raises(ValueError, match=r"w_in is frozen .* in expert\(s\) \[0\] but trained in expert\(s\) \[0\]"):
        MultiwayFFN.from_experts([language, vision], per_expert_parameters=True)
    lin = [nn.Linear(8, 4), nn.Linear(8, 4)]
    lin[1].weight.requires_grad_(False)
    fused = MultiwayLinear.from_experts(lin, per_expert_parameters=True)
    assert [p.requires_grad for p in fused.weight] == [True, False]
    assert [p.requires_grad for p in fused.bias] == [True, True]
    for i in range(2):
        assert torch.equal(fused.weight[i], lin[i].weight) and torch.equal(fused.bias[i], lin[i].bias)


def test_one_storage_survives_moves_copies_and_loading():
    m = _make("gelu")
    assert list(m.state_dict()) == ["w_in.0", "w_in.1", "b_in.0", "b_in.1", "w_out.0", "w_out.1",
                                    "b_out.0", "b_out.1"]
    ids_before = [id(p) for p in m.parameters()]
    m.double()
    assert _one_storage(m) and m.w_in[0].dtype == torch.float64
    assert [id(p) for p in m.parameters()] == ids_before  # optimisers keep their parameters
    m.to(torch.bfloat16)
    assert _one_storage(m)
    c = copy.deepcopy(m)
    assert _one_storage(c)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    assert _one_storage(torch.load(buf, weights_only=False))
    fresh = _make("gelu").to(torch.bfloat16)
    fresh.load_state_dict(m.state_dict())
    assert _one_storage(fresh) and torch.equal(fresh.w_out[1], m.w_out[1])
    stack = _storage.stacked(list(fresh.w_in), "w_in")
    assert stack.data_ptr() == fresh.w_in[0].data_ptr()  # read in place, no copy
    assert "per_expert_parameters=True" in repr(fresh)


def test_functional_ops_take_per_expert_lists():
    """``modality_linear`` / ``modality_ffn`` take a sequence of per-expert tensors anywhere they
    take an ``[E, ...]`` tensor (stacked with a copy when they are separate tensors), and
    gradients reach each of them; mismatched experts are named in the error."""
    _require("cpu")
    torch.manual_seed(11)
    w = [torch.randn(6, 8, requires_grad=True) for _ in range(3)]
    b = [torch.randn(6, requires_grad=True) for _ in range(3)]
    x = randn(5, 8, seed=12, dtype=torch.float32)
    ids = make_ids((5,), 3, seed=13)
    with mmkernels.backend("cpu"):
        y = mmkernels.modality_linear(x, ids, w, b)
        ws, bs = torch.stack(w).detach().requires_grad_(), torch.stack(b).detach().requires_grad_()
        y2 = mmkernels.modality_linear(x, ids, ws, bs)
    assert torch.equal(y, y2)
    y.sum().backward()
    y2.sum().backward()
    for i in range(3):
        assert torch.equal(w[i].grad, ws.grad[i]) and torch.equal(b[i].grad, bs.grad[i])
    with pytest.raises(ValueError, match=r"weight\[1\] is \(6, 7\)"):
        mmkernels.modality_linear(x, ids, [w[0], torch.randn(6, 7), w[2]])
    with pytest.raises(ValueError, match=r"w_out is an empty sequence"):
        mmkernels.modality_ffn(x, ids, torch.randn(3, 6, 8), None, [], None)


def test_per_expert_parameters_compile_and_autocast():
    """``torch.compile(fullgraph=True)`` (the stack is then a copy: storage views are not traced)
    and autocast (the stack is cast once) give the eager results."""
    _require("cpu")
    m = _make("swiglu")
    x = randn(2, 7, 20, seed=14, dtype=torch.float32)
    ids = make_ids((2, 7), 2, seed=15)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with mmkernels.backend("cpu"):
        assert torch.equal(compiled(x, ids), m(x, ids))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x, ids)
        assert y.dtype == torch.bfloat16
        twin = _stacked_twin(m)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(y, twin(x, ids))


def test_frozen_weights_cost_no_weight_gradient_work(monkeypatch):
    """triton backend: with every weight frozen (adapter training) the FFN backward runs the dh
    and dx GEMMs only; with a frozen expert among per-expert parameters each weight-gradient
    launch covers the trained expert alone."""
    _require("triton")
    x = randn(2, 9, 20, seed=16, dtype=torch.float32).requires_grad_()
    ids = make_ids((2, 9), 2, seed=17)
    m = _make("gelu")
    seen = record_launches(monkeypatch)
    m.requires_grad_(False)
    with mmkernels.backend("triton"):
        m(x, ids).sum().backward()
    assert [s for s in seen if s[0] == "wgrad"] == [] and ("mm", "ffn_bwd_dx") in seen
    seen.clear()
    m.requires_grad_(True)
    for name in ("w_in", "b_in", "w_out", "b_out"):
        getattr(m, name)[0].requires_grad_(False)
    with mmkernels.backend("triton"):
        m(x, ids).sum().backward()
    assert [s for s in seen if s[0] == "wgrad"] == [("wgrad", "wgrad_ffn_out", 1), ("wgrad", "wgrad_ffn_in", 1)]
    assert m.w_in[0].grad is None and m.w_in[1].grad is not None
    lin = _make("linear")
    lin.weight[1].requires_grad_(False)
    lin.bias[1].requires_grad_(False)
    seen.clear()
    with mmkernels.backend("triton"):
        lin(randn(2, 9, 20, seed=18, dtype=torch.float32), make_ids((2, 9), 3, seed=19)).sum().backward()
    assert [s for s in seen if s[0] == "wgrad"] == [("wgrad", "wgrad_linear", 1), ("wgrad", "wgrad_linear", 1)]


@pytest.mark.parametrize("kind", ["linear", "gelu", "swiglu"])
def test_state_dicts_load_across_layouts(kind):
    """A checkpoint of either layout loads strictly into the other (also nested in a model), so a
    run can switch per_expert_parameters on to freeze an expert and off again."""
    per = _make(kind)
    stacked = _stacked_twin(per)
    fresh_per = _make(kind)
    for p in fresh_per.parameters():
        p.data.zero_()
    fresh_per.load_state_dict(stacked.state_dict())
    assert _one_storage(fresh_per)
    for n in _names(per):
        for e in range(per.num_experts):
            assert torch.equal(getattr(fresh_per, n)[e], getattr(per, n)[e])
    fresh_stacked = _stacked_twin(_make(kind))
    outer = nn.Sequential(nn.Identity(), fresh_stacked)
    outer.load_state_dict(nn.Sequential(nn.Identity(), per).state_dict())
    for n in _names(per):
        assert torch.equal(getattr(fresh_stacked, n), getattr(stacked, n))
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh_per.load_state_dict({k: v for k, v in stacked.state_dict().items() if not k.startswith("w")})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", ["all_on_0", "all_on_1"])
def test_expert_without_tokens_gets_no_gradient(backend, split):
    """A split position that sends every token to one expert (torchscale's split_position -1
    and 0) leaves the other expert's per-expert parameters without a gradient (``None``, as in
    a model that never calls it) and without weight-gradient work; the touched expert's
    gradients equal those of the stacked layout. Linear, FFN (sub-LN included) and LayerNorm."""
    _require(backend)
    b, s, h = 2, 7, 16
    p, untouched = (s, 1) if split == "all_on_0" else (0, 0)
    torch.manual_seed(3)
    modules = [MultiwayLinear(h, 12, per_expert_parameters=True),
               MultiwayFFN(h, 24, activation="swiglu", per_expert_parameters=True),
               MultiwayFFN(h, 24, per_expert_parameters=True, subln=True),
               mmkernels.MultiwayLayerNorm(h, per_expert_parameters=True)]
    x = randn(b, s, h, seed=4).float()
    for module in modules:
        twin = _stacked_twin(module) if not isinstance(module, mmkernels.MultiwayLayerNorm) else None
        with mmkernels.backend(backend):
            launches = record_launches_of(module, x, p)
            if twin is not None:
                twin(x, p).square().sum().backward()
        for name, param in module.named_parameters():
            expert = int(name.rsplit(".", 1)[1])
            if expert == untouched:
                assert param.grad is None, (type(module).__name__, name)
            else:
                assert param.grad is not None and param.grad.abs().sum() > 0, (type(module).__name__, name)
                if twin is not None:
                    stacked = operator.attrgetter(name.rsplit(".", 1)[0])(twin)
                    ref = stacked[expert].grad if isinstance(stacked, nn.ParameterList) else stacked.grad[expert]
                    assert torch.equal(param.grad, ref), name
        if backend == "triton" and not isinstance(module, mmkernels.MultiwayLayerNorm):
            assert launches and all(e == 1 for what, _, *rest in launches if what == "wgrad" for e in rest)


def record_launches_of(module, x, p):
    """Forward and backward of ``module(x, p)``; the grouped-GEMM launches seen (triton only)."""
    with pytest.MonkeyPatch.context() as mp:
        seen = record_launches(mp)
        module(x, p).square().sum().backward()
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_without_tokens_in_an_ids_tensor_gets_a_zero_gradient(backend):
    """With an ids tensor the token counts exist only on the device; deciding would cost a host
    synchronisation, so every expert stays in the graph and one that receives no token gets a
    zero gradient (as an ``[E, ...]`` parameter does)."""
    _require(backend)
    torch.manual_seed(5)
    module = MultiwayLinear(16, 12, per_expert_parameters=True)
    x = randn(2, 7, 16, seed=6).float()
    ids = torch.zeros(2, 7, dtype=torch.int64)
    with mmkernels.backend(backend):
        module(x, ids).square().sum().backward()
    assert module.weight[0].grad.abs().sum() > 0
    assert module.weight[1].grad is not None and not module.weight[1].grad.any()
    assert module.bias[1].grad is not None and not module.bias[1].grad.any()
