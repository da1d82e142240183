"""MultiwayLinear / MultiwayFFN: construction, and ``from_experts`` reproducing real per-expert modules.

The per-expert modules below are faithful stand-ins (same attribute names, same forward) for the
ones in the models: torchscale's ``FeedForwardNetwork`` and ``MultiwayNetwork`` (BEiT-3), timm's
``Mlp`` as used by VLMo's text/image/vision-language experts, and CogVLM's ``MLP`` (LLaMA MLP)
inside ``VisionExpertMLP`` plus its expert attention projections. The fused modules must compute
what those modules compute, forward and backward, on every backend.
"""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmkernels
from mmkernels import MultiwayFFN, MultiwayLinear
from mmkernels.testing.numerics import assert_close
from tests.helpers.peer_models import LlamaMLP, MultiwayNetwork, TimmMlp, TorchscaleFFN
from tests.helpers.backends import require_backend

BACKENDS = ["reference", "cpu", "triton"]


def _require(backend):
    require_backend(backend, "experts", "experts_linear_fwd")


# ----------------------------------------------------------------------------- stand-ins of the models' modules

class VLMoFFN(nn.Module):
    """VLMo block FFN: text tokens (the first ``text_len``) through mlp_text, image tokens through
    mlp_imag; in the top (vision-language) layers every token goes through mlp_vl."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.mlp_text = TimmMlp(dim, hidden)
        self.mlp_imag = TimmMlp(dim, hidden)
        self.mlp_vl = TimmMlp(dim, hidden)

    def forward(self, x, text_len, modality_type):
        if modality_type == "vl":
            return self.mlp_vl(x)
        return torch.cat([self.mlp_text(x[:, :text_len]), self.mlp_imag(x[:, text_len:])], dim=1)


class TimmSwiGLU(nn.Module):
    """timm.layers.SwiGLU: fc2(act(fc1_g(x)) * fc1_x(x)), with biases."""

    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1_g = nn.Linear(in_features, hidden_features)
        self.fc1_x = nn.Linear(in_features, hidden_features)
        self.act = nn.SiLU()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1_g(x)) * self.fc1_x(x)))))


class GELUTanh(nn.Module):  # the name of transformers' ACT2FN["gelu_pytorch_tanh"] class
    def forward(self, x):
        return F.gelu(x, approximate="tanh")


LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE = 0, 1


def get_expert_mask(token_type_ids):
    """CogVLM: a token is a vision token when it and the next one are vision tokens (the last image
    token, before the text, goes to the language expert)."""
    vision_token_mask = torch.zeros_like(token_type_ids, dtype=torch.bool)
    vision_token_mask[:, :-1] = (token_type_ids[:, :-1] == VISION_TOKEN_TYPE) & \
        (token_type_ids[:, 1:] == VISION_TOKEN_TYPE)
    return ~vision_token_mask, vision_token_mask


class VisionExpertMLP(nn.Module):
    """CogVLM's VisionExpertMLP (language_mlp / vision_mlp chosen per token by token_type_ids)."""

    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.language_mlp = LlamaMLP(hidden_size, intermediate_size)
        self.vision_mlp = LlamaMLP(hidden_size, intermediate_size)

    def forward(self, hidden_states, token_type_ids):
        output = torch.empty(hidden_states.shape, dtype=hidden_states.dtype, device=hidden_states.device)
        language_token_mask, vision_token_mask = get_expert_mask(token_type_ids)
        output[vision_token_mask] = self.vision_mlp(hidden_states[vision_token_mask])
        output[language_token_mask] = self.language_mlp(hidden_states[language_token_mask])
        return output


class VisionExpertProjections(nn.Module):
    """CogVLM's VisionExpertAttention projections (query_key_value and dense, one per expert, no bias)."""

    def __init__(self, hidden_size):
        super().__init__()
        self.vision_expert_query_key_value = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.vision_expert_dense = nn.Linear(hidden_size, hidden_size, bias=False)
        self.language_expert_query_key_value = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.language_expert_dense = nn.Linear(hidden_size, hidden_size, bias=False)

    def qkv(self, hidden_states, token_type_ids):
        language_token_mask, vision_token_mask = get_expert_mask(token_type_ids)
        shape = list(hidden_states.shape)
        shape[-1] = shape[-1] * 3
        mixed = torch.empty(shape, dtype=hidden_states.dtype, device=hidden_states.device)
        mixed[vision_token_mask] = self.vision_expert_query_key_value(hidden_states[vision_token_mask])
        mixed[language_token_mask] = self.language_expert_query_key_value(hidden_states[language_token_mask])
        return mixed


# ----------------------------------------------------------------------------- helpers

def _x(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _fused_vs_original(fused, original, x, call_fused, call_original, backend, scale=4.0):
    """Forward + backward of both in float32; the original evaluated in float64 is the reference
    and the original in float32 is "eager". Returns the fused module's outputs and grads and the
    float64 original's, for parameter-level comparisons."""
    dy = _x(*call_original(original, x).shape, seed=123)
    fused.zero_grad(set_to_none=True)
    original.zero_grad(set_to_none=True)
    ref64 = copy.deepcopy(original).double()
    xr = x.double().requires_grad_()
    r = call_original(ref64, xr)
    r.backward(dy.double())
    xe = x.clone().requires_grad_()
    e = call_original(original, xe)
    e.backward(dy)
    xf = x.clone().requires_grad_()
    with mmkernels.backend(backend):
        y = call_fused(fused, xf)
    y.backward(dy)
    assert y.dtype == x.dtype and y.shape == r.shape
    assert_close(y, r, torch.float32, eager=e, scale=scale, name=f"{backend} output")
    assert_close(xf.grad, xr.grad, torch.float32, eager=xe.grad, scale=scale, name=f"{backend} dx")
    return _grads(fused), _grads(ref64), _grads(original)


def _check_param_grads(got, ref, eager, mapping, scale=4.0):
    """``mapping``: fused name -> list of (expert, original names whose grads stack/concatenate to it)."""
    for fused_name, per_expert in mapping.items():
        for e, names in per_expert:
            g = got[fused_name][e]
            r = torch.cat([ref[n] for n in names])
            ea = torch.cat([eager[n] for n in names])
            assert_close(g, r, torch.float32, eager=ea, scale=scale, name=f"{fused_name}[{e}]")


# ----------------------------------------------------------------------------- construction

def test_multiway_linear_init_like_nn_linear():
    torch.manual_seed(0)
    m = MultiwayLinear(48, 20, num_experts=3)
    assert m.weight.shape == (3, 20, 48) and m.bias.shape == (3, 20)
    bound = 1 / math.sqrt(48)
    assert m.weight.abs().max() <= bound and m.bias.abs().max() <= bound
    assert m.weight.std() > 0.4 * bound  # actually initialised, not zeros
    assert not torch.equal(m.weight[0], m.weight[1])  # experts initialised independently
    assert set(dict(m.named_parameters())) == {"weight", "bias"}
    m2 = MultiwayLinear(8, 4, 2, bias=False, dtype=torch.float64)
    assert m2.bias is None and m2.weight.dtype == torch.float64
    assert "num_experts=2" in repr(m2)


def test_multiway_ffn_init_and_shapes():
    torch.manual_seed(0)
    m = MultiwayFFN(32, 64, num_experts=2, activation="swiglu")
    assert m.w_in.shape == (2, 128, 32) and m.b_in.shape == (2, 128)
    assert m.w_out.shape == (2, 32, 64) and m.b_out.shape == (2, 32)
    assert m.w_in.abs().max() <= 1 / math.sqrt(32) and m.w_out.abs().max() <= 1 / math.sqrt(64)
    m = MultiwayFFN(16, 24, num_experts=3, activation="relu", bias=False, out_features=8)
    assert m.w_in.shape == (3, 24, 16) and m.w_out.shape == (3, 8, 24) and m.b_in is None and m.b_out is None
    x = _x(2, 5, 16)
    ids = torch.randint(0, 3, (2, 5))
    assert m(x, ids).shape == (2, 5, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_forward_every_backend(backend):
    _require(backend)
    torch.manual_seed(1)
    lin, ffn = MultiwayLinear(24, 16, 2), MultiwayFFN(24, 40, 2, "gelu_tanh")
    x = _x(3, 9, 24, seed=2)
    ids = torch.randint(0, 2, (3, 9), generator=torch.Generator().manual_seed(3))
    with mmkernels.backend(backend):
        for m in (lin, ffn):
            y_ids = m(x, ids)
            y_split = m(x, 4)
            ids4 = torch.ones(3, 9, dtype=torch.int64)
            ids4[:, :4] = 0
            assert torch.equal(y_split, m(x, ids4))
    for m in (lin, ffn):
        with mmkernels.backend(backend):
            y = m(x, ids)
        with mmkernels.backend("reference"):
            r = copy.deepcopy(m).double()(x.double(), ids)
        assert_close(y, r, torch.float32, scale=4.0)


# ----------------------------------------------------------------------------- from_experts: exact copies

def test_from_experts_copies_linear_weights_exactly():
    torch.manual_seed(4)
    linears = [nn.Linear(12, 7) for _ in range(3)]
    m = MultiwayLinear.from_experts(linears)
    assert m.num_experts == 3 and m.in_features == 12 and m.out_features == 7
    for e, lin in enumerate(linears):
        assert torch.equal(m.weight[e], lin.weight) and torch.equal(m.bias[e], lin.bias)
    assert m.weight.data_ptr() != linears[0].weight.data_ptr()  # a copy, not a view
    nb = MultiwayLinear.from_experts(nn.ModuleList([nn.Linear(4, 5, bias=False, dtype=torch.float64)] * 2))
    assert nb.bias is None and nb.weight.dtype == torch.float64


def test_from_experts_copies_ffn_weights_exactly():
    torch.manual_seed(5)
    mlps = [LlamaMLP(16, 24) for _ in range(2)]
    m = MultiwayFFN.from_experts(mlps)
    assert m.activation == "swiglu" and m.b_in is None and m.b_out is None
    for e, mlp in enumerate(mlps):
        assert torch.equal(m.w_in[e, :24], mlp.gate_proj.weight)
        assert torch.equal(m.w_in[e, 24:], mlp.up_proj.weight)
        assert torch.equal(m.w_out[e], mlp.down_proj.weight)
    ffns = [TorchscaleFFN(16, 40) for _ in range(3)]
    m = MultiwayFFN.from_experts(ffns)
    assert m.activation == "gelu" and m.num_experts == 3
    for e, f in enumerate(ffns):
        assert torch.equal(m.w_in[e], f.fc1.weight) and torch.equal(m.b_in[e], f.fc1.bias)
        assert torch.equal(m.w_out[e], f.fc2.weight) and torch.equal(m.b_out[e], f.fc2.bias)
    assert set(dict(m.named_parameters())) == {"w_in", "b_in", "w_out", "b_out"}


@pytest.mark.parametrize("act_layer,expected", [
    (nn.GELU, "gelu"), (functools.partial(nn.GELU, approximate="tanh"), "gelu_tanh"),
    (nn.SiLU, "silu"), (nn.ReLU, "relu")])
def test_from_experts_reads_the_activation(act_layer, expected):
    m = MultiwayFFN.from_experts([TimmMlp(8, 16, act_layer=act_layer) for _ in range(2)])
    assert m.activation == expected
    assert MultiwayFFN.from_experts([TorchscaleFFN(8, 16, "swish")] * 2).activation == "silu"
    assert MultiwayFFN.from_experts([TorchscaleFFN(8, 16, "relu")] * 2).activation == "relu"


def test_from_experts_activation_override():
    class Opaque(nn.Module):  # an activation from_experts cannot name
        def forward(self, x):
            return F.gelu(x, approximate="tanh")

    mlps = [TimmMlp(8, 16, act_layer=Opaque) for _ in range(2)]
    with pytest.raises(ValueError, match="activation="):
        MultiwayFFN.from_experts(mlps)
    m = MultiwayFFN.from_experts(mlps, activation="gelu_tanh")
    assert m.activation == "gelu_tanh"
    x = _x(2, 6, 8, seed=6)
    ids = torch.tensor([[0, 1, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    want = torch.empty(2, 6, 8)
    for e in range(2):
        want[ids == e] = mlps[e](x[ids == e])
    with mmkernels.backend("reference"):
        assert_close(m(x, ids), want.double(), scale=4.0)
    # a fc1 holding [gate; up] can be forced to swiglu
    fc = [TimmMlp(8, 32, out_features=8) for _ in range(2)]
    for f in fc:
        f.fc2 = nn.Linear(16, 8)
    m = MultiwayFFN.from_experts(fc, activation="swiglu")
    assert m.w_in.shape == (2, 32, 8) and m.w_out.shape == (2, 8, 16)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_timm_swiglu_and_hf_activation_names(backend):
    _require(backend)
    torch.manual_seed(18)
    experts = [TimmSwiGLU(16, 20) for _ in range(3)]
    m = MultiwayFFN.from_experts(experts)
    assert m.activation == "swiglu" and m.b_in.shape == (3, 40)
    assert torch.equal(m.b_in[1], torch.cat([experts[1].fc1_g.bias, experts[1].fc1_x.bias]))
    x = _x(4, 6, 16, seed=19)
    ids = torch.randint(0, 3, (4, 6), generator=torch.Generator().manual_seed(20))
    want = torch.empty(4, 6, 16, dtype=torch.float64)
    for e in range(3):
        want[ids == e] = copy.deepcopy(experts[e]).double()(x[ids == e].double())
    with mmkernels.backend(backend):
        assert_close(m(x, ids), want, scale=4.0)
    assert MultiwayFFN.from_experts([TimmMlp(8, 16, act_layer=GELUTanh)] * 2).activation == "gelu_tanh"


# ----------------------------------------------------------------------------- from_experts: the models' blocks

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", [0, 5, 13])
def test_beit3_multiway_network_split_position(backend, split):
    """torchscale MultiwayNetwork(FeedForwardNetwork): experts A/B by split position."""
    _require(backend)
    torch.manual_seed(7)
    mw = MultiwayNetwork(TorchscaleFFN(32, 64)).eval()
    mw.split_position = split if split < 13 else -1  # -1: every position through A
    fused = MultiwayFFN.from_experts([mw.A, mw.B])
    x = _x(2, 13, 32, seed=8)
    got, ref, eager = _fused_vs_original(fused, mw, x, lambda m, t: m(t, split), lambda m, t: m(t), backend)
    mapping = {"w_in": [(0, ["A.fc1.weight"]), (1, ["B.fc1.weight"])],
               "b_in": [(0, ["A.fc1.bias"]), (1, ["B.fc1.bias"])],
               "w_out": [(0, ["A.fc2.weight"]), (1, ["B.fc2.weight"])],
               "b_out": [(0, ["A.fc2.bias"]), (1, ["B.fc2.bias"])]}
    # experts that saw no token: zero gradients in the fused module, no grad in the original
    for name in mapping:
        for e, names in mapping[name]:
            if names[0] not in ref:
                assert (got[name][e] == 0).all()
    mapping = {k: [(e, n) for e, n in v if n[0] in ref] for k, v in mapping.items()}
    _check_param_grads(got, ref, eager, mapping)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vlmo_three_experts(backend):
    """VLMo: text/image experts below, the vision-language expert in the top layers (3 experts, ids)."""
    _require(backend)
    torch.manual_seed(9)
    vlmo = VLMoFFN(32, 48).eval()
    fused = MultiwayFFN.from_experts([vlmo.mlp_text, vlmo.mlp_imag, vlmo.mlp_vl])
    assert fused.num_experts == 3 and fused.activation == "gelu"
    b, text_len, s = 2, 7, 19
    x = _x(b, s, 32, seed=10)
    ids_lower = torch.ones(b, s, dtype=torch.int64)
    ids_lower[:, :text_len] = 0
    ids_vl = torch.full((b, s), 2, dtype=torch.int64)
    mapping = lambda names: {  # noqa: E731
        "w_in": [(e, [f"{n}.fc1.weight"]) for e, n in names], "b_in": [(e, [f"{n}.fc1.bias"]) for e, n in names],
        "w_out": [(e, [f"{n}.fc2.weight"]) for e, n in names], "b_out": [(e, [f"{n}.fc2.bias"]) for e, n in names]}
    got, ref, eager = _fused_vs_original(fused, vlmo, x, lambda m, t: m(t, ids_lower),
                                         lambda m, t: m(t, text_len, "lower"), backend)
    _check_param_grads(got, ref, eager, mapping([(0, "mlp_text"), (1, "mlp_imag")]))
    assert (got["w_in"][2] == 0).all() and (got["b_out"][2] == 0).all()
    got, ref, eager = _fused_vs_original(fused, vlmo, x, lambda m, t: m(t, ids_vl),
                                         lambda m, t: m(t, text_len, "vl"), backend)
    _check_param_grads(got, ref, eager, mapping([(2, "mlp_vl")]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cogvlm_vision_expert_mlp(backend):
    """CogVLM: language_mlp / vision_mlp (LLaMA MLPs) chosen by token_type_ids."""
    _require(backend)
    torch.manual_seed(11)
    block = VisionExpertMLP(32, 40)
    fused = MultiwayFFN.from_experts([block.language_mlp, block.vision_mlp])
    assert fused.activation == "swiglu" and fused.b_in is None
    # [BOS, 9 image tokens, 6 text tokens] and [BOS, 4 image, 11 text]
    tt = torch.zeros(2, 16, dtype=torch.int64)
    tt[0, 1:10] = VISION_TOKEN_TYPE
    tt[1, 1:5] = VISION_TOKEN_TYPE
    _, vision_mask = get_expert_mask(tt)
    ids = vision_mask.long()  # expert 0: language_mlp, expert 1: vision_mlp
    x = _x(2, 16, 32, seed=12)
    got, ref, eager = _fused_vs_original(fused, block, x, lambda m, t: m(t, ids), lambda m, t: m(t, tt), backend)
    _check_param_grads(got, ref, eager, {
        "w_in": [(0, ["language_mlp.gate_proj.weight", "language_mlp.up_proj.weight"]),
                 (1, ["vision_mlp.gate_proj.weight", "vision_mlp.up_proj.weight"])],
        "w_out": [(0, ["language_mlp.down_proj.weight"]), (1, ["vision_mlp.down_proj.weight"])]})


@pytest.mark.parametrize("backend", BACKENDS)
def test_cogvlm_expert_projections(backend):
    """CogVLM's vision/language expert query_key_value as one MultiwayLinear."""
    _require(backend)
    torch.manual_seed(13)
    proj = VisionExpertProjections(16)
    fused = MultiwayLinear.from_experts([proj.language_expert_query_key_value, proj.vision_expert_query_key_value])
    assert fused.bias is None and fused.weight.shape == (2, 48, 16)
    tt = torch.zeros(2, 11, dtype=torch.int64)
    tt[:, 2:8] = VISION_TOKEN_TYPE
    ids = get_expert_mask(tt)[1].long()
    x = _x(2, 11, 16, seed=14)
    got, ref, eager = _fused_vs_original(fused, proj, x, lambda m, t: m(t, ids), lambda m, t: m.qkv(t, tt), backend)
    _check_param_grads(got, ref, eager, {"weight": [(0, ["language_expert_query_key_value.weight"]),
                                                    (1, ["vision_expert_query_key_value.weight"])]})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_from_experts_keeps_dtype(dtype):
    _require("cpu")
    torch.manual_seed(15)
    mlps = [LlamaMLP(16, 24).to(dtype) for _ in range(2)]
    m = MultiwayFFN.from_experts(mlps)
    assert m.w_in.dtype == dtype
    x = _x(3, 5, 16, seed=16, dtype=dtype)
    ids = torch.randint(0, 2, (3, 5), generator=torch.Generator().manual_seed(17))
    with mmkernels.backend("cpu"):
        y = m(x, ids)
    want = torch.empty(3, 5, 16, dtype=dtype)
    ref = torch.empty(3, 5, 16, dtype=torch.float64)
    for e in range(2):
        want[ids == e] = mlps[e](x[ids == e])
        ref[ids == e] = copy.deepcopy(mlps[e]).double()(x[ids == e].double())
    assert y.dtype == dtype
    assert_close(y, ref, dtype, eager=want)


def test_from_experts_keeps_frozen_layers_frozen():
    """A layer frozen in every expert stays frozen in the copy (and gets no gradient); trained
    layers train. The op then computes no gradient for the frozen weights."""
    _require("cpu")
    torch.manual_seed(18)
    mlps = [TimmMlp(16, 24) for _ in range(3)]
    for m in mlps:
        m.fc1.requires_grad_(False)
    fused = MultiwayFFN.from_experts(mlps)
    assert not fused.w_in.requires_grad and not fused.b_in.requires_grad
    assert fused.w_out.requires_grad and fused.b_out.requires_grad
    linears = [nn.Linear(16, 8).requires_grad_(False) for _ in range(2)]
    lin = MultiwayLinear.from_experts(linears)
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    x = _x(2, 7, 16, seed=19).requires_grad_()
    ids = torch.randint(0, 3, (2, 7), generator=torch.Generator().manual_seed(20))
    with mmkernels.backend("cpu"):
        fused(x, ids).sum().backward()
    assert fused.w_in.grad is None and fused.b_in.grad is None
    assert fused.w_out.grad is not None and x.grad is not None


@pytest.mark.parametrize("layer,linear_part", [("gate_proj", "weight"), ("up_proj", "bias"), ("down_proj", "weight")])
def test_from_experts_refuses_one_frozen_expert(layer, linear_part):
    """CogVLM pretraining freezes the language expert and trains the visual one: one stacked
    parameter cannot hold that, so the conversion says so instead of training both."""
    language, vision = LlamaMLP(16, 24), LlamaMLP(16, 24)
    getattr(language, layer).requires_grad_(False)
    with pytest.raises(ValueError, match=r"frozen \(requires_grad=False\) in expert\(s\) \[0\] but trained in expert\(s\) \[(0, )?1\]"):
        MultiwayFFN.from_experts([language, vision])
    lang, vis = nn.Linear(16, 48), nn.Linear(16, 48)
    getattr(lang, linear_part).requires_grad_(False)
    with pytest.raises(ValueError, match="cannot freeze one expert alone"):
        MultiwayLinear.from_experts([lang, vis])


# ----------------------------------------------------------------------------- from_experts: refused layouts

def test_from_experts_errors():
    with pytest.raises(TypeError, match="nn.Linear"):
        MultiwayLinear.from_experts([nn.Linear(4, 4), nn.Conv1d(4, 4, 1)])
    with pytest.raises(ValueError, match="maps"):
        MultiwayLinear.from_experts([nn.Linear(4, 4), nn.Linear(4, 5)])
    with pytest.raises(ValueError, match="bias"):
        MultiwayLinear.from_experts([nn.Linear(4, 4), nn.Linear(4, 4, bias=False)])
    with pytest.raises(TypeError, match="dtype"):
        MultiwayLinear.from_experts([nn.Linear(4, 4), nn.Linear(4, 4).double()])
    with pytest.raises(ValueError, match="1..8"):
        MultiwayLinear.from_experts([])
    with pytest.raises(ValueError, match="1..8"):
        MultiwayLinear.from_experts([nn.Linear(2, 2)] * 9)
    with pytest.raises(TypeError, match="sequence"):
        MultiwayLinear.from_experts(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown layout"):
        MultiwayFFN.from_experts([nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))] * 2)
    with pytest.raises(ValueError, match="LayerNorm between their two layers"):
        MultiwayFFN.from_experts([TorchscaleFFN(8, 16, subln=True), TorchscaleFFN(8, 16)])
    with pytest.raises(ValueError, match="layout"):
        MultiwayFFN.from_experts([TorchscaleFFN(8, 16), LlamaMLP(8, 16)])
    with pytest.raises(ValueError, match="activation"):
        MultiwayFFN.from_experts([TorchscaleFFN(8, 16), TorchscaleFFN(8, 16, "relu")])
    with pytest.raises(ValueError, match="shapes"):
        MultiwayFFN.from_experts([TorchscaleFFN(8, 16), TorchscaleFFN(8, 32)])
    with pytest.raises(ValueError, match="SiLU"):  # GeGLU-style gated MLP: not swiglu
        MultiwayFFN.from_experts([LlamaMLP(8, 16, act_fn=nn.GELU())] * 2)
    with pytest.raises(ValueError, match="swiglu"):
        MultiwayFFN.from_experts([LlamaMLP(8, 16)] * 2, activation="gelu")
    with pytest.raises(ValueError, match="activation must be one of"):
        MultiwayFFN.from_experts([TorchscaleFFN(8, 16)] * 2, activation="tanh")
    with pytest.raises(ValueError, match="outputs"):  # fc1 width != fc2 input width
        bad = TimmMlp(8, 16)
        bad.fc2 = nn.Linear(12, 8)
        MultiwayFFN.from_experts([bad, copy.deepcopy(bad)])
    norm = TimmMlp(8, 16)
    norm.norm = nn.GroupNorm(1, 16)  # a LayerNorm there is taken (subln: tests/experts/test_subln.py)
    with pytest.raises(ValueError, match="only a LayerNorm"):
        MultiwayFFN.from_experts([norm] * 2)
    glu = TimmMlp(8, 32)
    glu.chunk_dim = -1  # timm GluMlp
    with pytest.raises(ValueError, match="GluMlp|gate"):
        MultiwayFFN.from_experts([glu] * 2)


def test_module_constructor_errors():
    with pytest.raises(ValueError, match="num_experts"):
        MultiwayLinear(4, 4, num_experts=0)
    with pytest.raises(ValueError, match="num_experts"):
        MultiwayFFN(4, 8, num_experts=9)
    with pytest.raises(ValueError, match="activation"):
        MultiwayFFN(4, 8, activation="gelu_new_fast")
    m = MultiwayFFN(4, 8, num_experts=3)
    with pytest.raises(ValueError, match="2 experts"):
        m(_x(1, 3, 4), 1)  # a split position needs exactly two experts
