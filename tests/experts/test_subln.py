"""The expert FFN with a LayerNorm between its layers (torchscale ``subln=True``, BEiT-3's default).

``MultiwayFFN.from_experts`` of torchscale ``FeedForwardNetwork(subln=True)`` experts (inside a
``MultiwayNetwork``, split by position) and of timm ``Mlp(norm_layer=nn.LayerNorm)`` experts
(routed by ids) must compute what those modules compute, forward and every gradient (x, both
layers, the LayerNorm's scale and shift), on every backend; ``modality_ffn_subln`` against the
same composition written with the reference functions in float64; per-expert parameters, state
dicts and bad input.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmkernels
from mmkernels import MultiwayFFN
from mmkernels.experts import activations
from mmkernels.experts.reference import modality_layer_norm_reference, modality_linear_reference
from mmkernels.testing.numerics import assert_close
from tests.experts.cases import make_ids, randn
from tests.helpers.peer_models import MultiwayNetwork, TimmMlp, TorchscaleFFN
from tests.helpers.backends import require_backend

BACKENDS = ["reference", "cpu", "triton"]


def _require(backend):
    require_backend(backend, "experts", "experts_layer_norm_fwd", "mmkernels.experts.kernels")


def _randomise_norms(module, seed):
    """LayerNorms start as ones / zeros: give every one its own scale and shift."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))


def _grads(module, x, dy, call):
    """``(out, {name: grad})`` of ``call(module, x)`` with ``x`` a fresh leaf."""
    x = x.clone().requires_grad_()
    out = call(module, x)
    out.backward(dy)
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    grads["x"] = x.grad
    return out, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", [0, 5, 11])
def test_beit3_subln_ffn_in_a_multiway_network(backend, split):
    """BEiT-3: torchscale ``MultiwayNetwork(FeedForwardNetwork(subln=True))``, experts A/B split by
    position, eps 1e-6 as BEiT-3's config; gradients of every parameter of both experts."""
    _require(backend)
    torch.manual_seed(3)
    mw = MultiwayNetwork(TorchscaleFFN(24, 40, subln=True, layernorm_eps=1e-6)).eval()
    _randomise_norms(mw, seed=4)
    mw.split_position = split
    fused = MultiwayFFN.from_experts([mw.A, mw.B])
    assert fused.ffn_layernorm is not None and fused.ffn_layernorm.eps == 1e-6 and "subln=True" in repr(fused)
    x = randn(2, 11, 24, seed=5).float()
    dy = randn(2, 11, 24, seed=6).float()
    with mmkernels.backend(backend):
        got, g = _grads(fused, x, dy, lambda m, t: m(t, split))
    ref64 = copy.deepcopy(mw).double()
    want, w = _grads(ref64, x.double(), dy.double(), lambda m, t: m(t))
    assert_close(got, want, torch.float32, scale=4.0, name="y")
    assert_close(g["x"], w["x"], torch.float32, scale=4.0, name="dx")
    for e, way in enumerate("AB"):
        if f"{way}.fc1.weight" not in w:  # this expert saw no token: zero gradients
            assert (g["ffn_layernorm.weight"][e] == 0).all() and (g["w_in"][e] == 0).all()
            continue
        pairs = {"w_in": "fc1.weight", "b_in": "fc1.bias", "w_out": "fc2.weight", "b_out": "fc2.bias",
                 "ffn_layernorm.weight": "ffn_layernorm.weight", "ffn_layernorm.bias": "ffn_layernorm.bias"}
        for ours, theirs in pairs.items():
            assert_close(g[ours][e], w[f"{way}.{theirs}"], torch.float32, scale=8.0, name=f"{ours}[{e}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_timm_mlps_with_a_norm_layer_routed_by_ids(backend):
    """Three timm ``Mlp(norm_layer=nn.LayerNorm)`` experts (VLMo-style text/image/VL), ids routing."""
    _require(backend)
    torch.manual_seed(7)
    mlps = [TimmMlp(16, 24, norm_layer=nn.LayerNorm) for _ in range(3)]
    for i, m in enumerate(mlps):
        _randomise_norms(m, seed=8 + i)
    fused = MultiwayFFN.from_experts(mlps)
    x = randn(3, 9, 16, seed=11).float()
    ids = make_ids((3, 9), 3, seed=12)
    with mmkernels.backend(backend):
        got = fused(x, ids)
    want = torch.zeros(3, 9, 16, dtype=torch.float64)
    for e, m in enumerate(mlps):
        want[ids == e] = copy.deepcopy(m).double()(x[ids == e].double())
    assert_close(got, want, torch.float32, scale=4.0)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_functional_form_matches_the_reference_composition(backend, activation):
    """``modality_ffn_subln`` in bf16 against fc1 -> act -> per-modality LN -> fc2 written with the
    reference functions in float64 (the eager rule: at most twice bf16 eager's error)."""
    _require(backend)
    e, h, f = 3, 16, 20
    fi = 2 * f if activation == "swiglu" else f
    x = randn(2, 13, h, seed=21)
    ids = make_ids((2, 13), e, "empty", seed=22)
    params = [randn(e, fi, h, seed=23, scale=h ** -0.5), randn(e, fi, seed=24, scale=0.3),
              1 + 0.3 * randn(e, f, seed=25), 0.3 * randn(e, f, seed=26),
              randn(e, h, f, seed=27, scale=f ** -0.5), randn(e, h, seed=28, scale=0.3)]
    dy = randn(2, 13, h, seed=29)

    def reference(x, w_in, b_in, nw, nb, w_out, b_out):
        a = activations.apply(activation, modality_linear_reference(x, ids, w_in, b_in))
        return modality_linear_reference(modality_layer_norm_reference(a, ids, nw, nb, 1e-6), ids, w_out, b_out)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in [x] + params]
        y = fn(*leaves)
        y.backward(dy.to(dtype))
        return [y] + [t.grad for t in leaves]

    with mmkernels.backend(backend):
        got = run(lambda *a: mmkernels.modality_ffn_subln(a[0], ids, *a[1:], activation=activation, eps=1e-6),
                  torch.bfloat16)
    ref = run(reference, torch.float64)
    eager = run(reference, torch.bfloat16)
    names = ["y", "dx", "dw_in", "db_in", "dnorm_w", "dnorm_b", "dw_out", "db_out"]
    for name, g, r, ea in zip(names, got, ref, eager):
        assert g.dtype == torch.bfloat16, name
        assert_close(g, r, torch.bfloat16, eager=ea, scale=2.0, name=name)


def test_per_expert_parameters_freeze_the_language_expert_norm_too():
    _require("cpu")
    ffns = [TorchscaleFFN(8, 12, subln=True) for _ in range(2)]
    for p in ffns[0].parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="per_expert_parameters=True"):
        MultiwayFFN.from_experts(ffns)
    fused = MultiwayFFN.from_experts(ffns, per_expert_parameters=True)
    assert [p.requires_grad for p in fused.ffn_layernorm.weight] == [False, True]
    x = randn(2, 5, 8, seed=31).float()
    with mmkernels.backend("cpu"):
        fused(x, make_ids((2, 5), 2, seed=32)).sum().backward()
    assert fused.ffn_layernorm.weight[0].grad is None and fused.w_in[0].grad is None
    assert fused.ffn_layernorm.weight[1].grad is not None and fused.w_in[1].grad is not None


def test_constructor_state_dict_and_either_layout():
    module = MultiwayFFN(8, 12, num_experts=2, subln=True, subln_eps=1e-6)
    assert module.ffn_layernorm.eps == 1e-6 and torch.equal(module.ffn_layernorm.weight, torch.ones(2, 12))
    keys = set(module.state_dict())
    assert {"ffn_layernorm.weight", "ffn_layernorm.bias", "w_in", "w_out"} <= keys
    per = MultiwayFFN(8, 12, num_experts=2, subln=True, subln_eps=1e-6, per_expert_parameters=True)
    with torch.no_grad():
        module.ffn_layernorm.weight.add_(torch.randn(2, 12))
    per.load_state_dict(module.state_dict())
    assert torch.equal(per.ffn_layernorm.weight[1], module.ffn_layernorm.weight[1])
    x = randn(2, 5, 8, seed=41).float()
    ids = make_ids((2, 5), 2, seed=42)
    with mmkernels.backend("reference"):
        assert torch.equal(per(x, ids), module(x, ids))
    plain = MultiwayFFN(8, 12, num_experts=2)
    assert plain.ffn_layernorm is None and "subln" not in repr(plain)


def test_bad_input():
    e, h, f = 2, 8, 12
    x = torch.randn(5, h)
    ids = torch.zeros(5, dtype=torch.long)
    w_in, w_out = torch.randn(e, f, h), torch.randn(e, h, f)
    with pytest.raises(ValueError, match=r"norm_weight must have shape \[E, F\] = \[2, 12\]"):
        mmkernels.modality_ffn_subln(x, ids, w_in, None, torch.ones(e, f + 1), None, w_out, None)
    with pytest.raises(ValueError, match="norm_weight"):
        mmkernels.modality_ffn_subln(x, ids, w_in, None, torch.ones(e, f), None, w_out, None, activation="swiglu")
    with pytest.raises(ValueError, match="w_out"):
        mmkernels.modality_ffn_subln(x, ids, w_in, None, torch.ones(e, f), None, torch.randn(e, h, f + 2), None)
    with pytest.raises(ValueError, match="activation"):
        mmkernels.modality_ffn_subln(x, ids, w_in, None, torch.ones(e, f), None, w_out, None, activation="tanh")
    bad = TimmMlp(8, 12, norm_layer=nn.BatchNorm1d)
    with pytest.raises(ValueError, match="only a LayerNorm"):
        MultiwayFFN.from_experts([bad, copy.deepcopy(bad)])
    with pytest.raises(ValueError, match="eps"):
        MultiwayFFN.from_experts([TorchscaleFFN(8, 12, subln=True), TorchscaleFFN(8, 12, subln=True,
                                                                                    layernorm_eps=1e-6)])


def test_torchscale_forward_runs_the_activation_in_float32():
    """The stand-in computes ``gelu(x.float())`` as torchscale does; in float32 that is F.gelu."""
    m = TorchscaleFFN(4, 6, subln=True).eval()
    x = torch.randn(3, 4)
    want = m.fc2(m.ffn_layernorm(F.gelu(m.fc1(x))))
    assert torch.allclose(m(x), want)
