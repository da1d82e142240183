"""patch_multiway: torchscale's MultiwayNetworks (BEiT-3, VLMo in torchscale) on mmkernels' routed modules.

torchscale is not installed: the model is the stand-in multiway encoder of tests/helpers/peer_models.py
(multiway q/k/v/out projections and inner_attn_ln, multiway LayerNorms, subln FFN). A patched copy
must compute what the original computes (output and every gradient, against the original in
float64) on the C++ and the interpreted Triton backends, keep torchscale's state-dict keys and
values, and load a torchscale checkpoint with strict=True.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import mmkernels
from mmkernels.integrations import MultiwayAdapter, patch_multiway
from mmkernels.integrations import torchscale as ts
from mmkernels.testing.numerics import assert_close
from tests.experts.cases import randn
from tests.helpers.peer_models import MultiwayNetwork, TorchscaleEncoder, TorchscaleFFN

H, HEADS, FFN_DIM, S, B = 16, 2, 24, 9, 2
PER_LAYER = 8  # q, k, v, out_proj, inner_attn_ln, self_attn_layer_norm, ffn, final_layer_norm


def make_encoder(seed=0, layers=1, dtype=torch.float32):
    torch.manual_seed(seed)
    model = TorchscaleEncoder(H, HEADS, FFN_DIM, layers=layers, layernorm_eps=1e-6).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # LayerNorms start as ones / zeros, and B as a copy of A: give each its own
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model.to(dtype)


def patched(model, **kw):
    model = copy.deepcopy(model)
    patch_multiway(model, **kw)
    return model


def set_split_position(model, p):
    """torchscale's ``model.apply(set_split_position(p))``."""
    model.apply(lambda m: setattr(m, "split_position", p) if hasattr(m, "split_position") else None)


def padding_mask():
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[1, -2:] = True  # the second sample's last two text tokens are padding
    return mask


@contextlib.contextmanager
def grads_as_data(model):
    """Parameters' ``.data`` swapped for their gradients (zeros where None), so ``state_dict()``
    gives the gradients under torchscale's keys."""
    saved = [(p, p.data) for p in model.parameters()]
    for p, d in saved:
        p.data = torch.zeros_like(d) if p.grad is None else p.grad
    try:
        yield
    finally:
        for p, d in saved:
            p.data = d


def run(model, x, dy, mask=None):
    """``(out, dx, {torchscale key: grad})`` of one forward/backward."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x, mask)
    out.backward(dy)
    with grads_as_data(model):
        grads = {k: v.clone() for k, v in model.state_dict().items()}
    return out.detach(), x.grad, grads


def inputs(dtype=torch.float32):
    return randn(B, S, H, seed=1).to(dtype), randn(B, S, H, seed=2).to(dtype)


def adapters(model):
    return [m for m in model.modules() if isinstance(m, MultiwayAdapter)]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("split", [0, 5, -1])
def test_patched_encoder_matches_torchscale(backend, split):
    """Output and every gradient (x, each expert's weights, biases and LayerNorms) of the patched
    encoder layer against the original in float64 (and within twice the original's own float32
    error), with a key padding mask; the split position set torchscale's way, after patching."""
    model = make_encoder()
    fast = patched(model)
    for m in (model, fast):
        set_split_position(m, split)
    x, dy = inputs()
    mask = padding_mask()
    with mmkernels.backend(backend):
        out, dx, grads = run(fast, x, dy, mask)
    ref = run(copy.deepcopy(model).double(), x.double(), dy.double(), mask)
    eager = run(model, x, dy, mask)
    assert_close(out, ref[0], torch.float32, eager=eager[0], name="y")
    assert_close(dx, ref[1], torch.float32, eager=eager[1], name="dx")
    assert list(grads) == list(ref[2])
    for k, g in grads.items():
        assert_close(g, ref[2][k], torch.float32, eager=eager[2][k], name=f"d {k}")
        if split in (0, -1):  # the expert that gets no token gets zero gradients, as in torchscale
            unused = ".A." if split == 0 else ".B."
            if unused in k:
                assert not g.any(), k


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("split", [0, -1])
def test_expert_without_tokens_gets_no_gradient_and_no_adamw_update(backend, split):
    """BEiT-3's image-only (split_position -1) and text-only (0) batches: torchscale runs only A
    or only B, so the other expert's parameters get no gradient (``None``) and AdamW neither
    decays nor moves them. The patched model (per-expert parameters) must do the same, every
    parameter's ``.grad`` None exactly where torchscale's is, over three AdamW steps."""
    model = make_encoder()
    fast = patched(model)
    for m in (model, fast):
        set_split_position(m, split)
    x, dy = inputs()
    untouched = ".B." if split == -1 else ".A."
    fused_untouched = "." + ("1" if split == -1 else "0")
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (model, fast)]
    for step in range(3):
        for m, opt in zip((model, fast), opts):
            opt.zero_grad(set_to_none=True)
            with mmkernels.backend(backend if m is fast else "reference"):
                m(x.clone().requires_grad_(), padding_mask()).backward(dy)
        none_ref = sorted(n for n, p in model.named_parameters() if p.grad is None)
        none_fast = [n for n, p in fast.named_parameters() if p.grad is None]
        assert none_ref and all(untouched in n for n in none_ref)
        assert len(none_fast) == len(none_ref)
        assert all(".fused." in n and n.endswith(fused_untouched) for n in none_fast), none_fast
        for opt in opts:
            opt.step()
    after = fast.state_dict()
    assert list(after) == list(before)
    for k in before:  # unchanged exactly where torchscale's own model leaves its weights
        assert (untouched in k) == torch.equal(after[k], before[k]), k
        assert (untouched in k) == torch.equal(model.state_dict()[k], before[k]), k


def test_count_idempotence_and_mode():
    model = make_encoder(layers=2)  # eval mode
    n = patch_multiway(model)
    assert n == 2 * PER_LAYER + 1 == len(adapters(model))
    assert not any(hasattr(m, "A") for m in model.modules())
    assert not any(m.training for a in adapters(model) for m in a.modules())
    kinds = sorted(a.kind for a in adapters(model))
    assert kinds.count("ffn") == 2 and kinds.count("linear") == 8 and kinds.count("layer_norm") == 7
    before = list(model.named_modules())
    assert patch_multiway(model) == 0
    assert [(k, id(m)) for k, m in model.named_modules()] == [(k, id(m)) for k, m in before]


@pytest.mark.parametrize("per_expert", [False, True])
def test_state_dict_keeps_torchscale_keys_and_values(per_expert):
    model = make_encoder(layers=2)
    want = model.state_dict()
    got = patched(model, per_expert_parameters=per_expert).state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("per_expert", [False, True])
def test_load_torchscale_checkpoint_strict(per_expert):
    """A torchscale checkpoint loads into a patched model of other weights with strict=True and gives
    the original's outputs; the patched model's checkpoint loads back into torchscale's model."""
    original = make_encoder(seed=0)
    fresh = make_encoder(seed=1)
    patch_multiway(fresh, per_expert_parameters=per_expert)
    x, _ = inputs()
    for m in (original, fresh):
        set_split_position(m, 5)
    with torch.no_grad():
        assert not torch.allclose(fresh(x), original(x), atol=1e-3)
        fresh.load_state_dict(original.state_dict(), strict=True)
        assert_close(fresh(x), copy.deepcopy(original).double()(x.double()), torch.float32, eager=original(x))
    assert all(a.fused.per_expert_parameters == per_expert for a in adapters(fresh))
    back = make_encoder(seed=2)
    back.load_state_dict(fresh.state_dict(), strict=True)
    for k, v in original.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    broken = original.state_dict()
    del broken["layers.0.ffn.A.fc1.bias"]
    with pytest.raises(RuntimeError, match="fc1.bias"):
        fresh.load_state_dict(broken, strict=True)


def test_split_position_copied_and_set_by_apply():
    model = make_encoder()
    set_split_position(model, 4)
    fast = patched(model)
    assert [a.split_position for a in adapters(fast)] == [4] * PER_LAYER + [4]
    x, _ = inputs()
    with torch.no_grad():
        for p in (7, 0, -1):
            set_split_position(fast, p)
            set_split_position(model, p)
            assert all(a.split_position == p for a in adapters(fast))
            assert_close(fast(x), copy.deepcopy(model).double()(x.double()), torch.float32, eager=model(x))


def test_unsupported_multiway_left_alone():
    class Extra(TorchscaleFFN):
        def __init__(self):
            super().__init__(H, FFN_DIM)
            self.scale = nn.Parameter(torch.ones(H))

    model = nn.ModuleDict(dict(
        emb=MultiwayNetwork(nn.Embedding(10, H)),                          # torchscale's MutliwayEmbedding
        mlp=MultiwayNetwork(nn.Sequential(nn.Linear(H, H), nn.ReLU())),
        extra=MultiwayNetwork(Extra()),                                     # state the fused FFN would not hold
        mixed=MultiwayNetwork(nn.Linear(H, H)),
        lin=MultiwayNetwork(nn.Linear(H, H)),
    ))
    model["mixed"].B = nn.LayerNorm(H)
    kept = {k: model[k] for k in ("emb", "mlp", "extra", "mixed")}
    assert patch_multiway(model) == 1
    assert isinstance(model["lin"], MultiwayAdapter)
    assert all(model[k] is m for k, m in kept.items())
    with pytest.raises(ValueError, match="from_multiway"):
        patch_multiway(MultiwayNetwork(nn.Linear(H, H)))


def test_shared_module_replaced_once_and_failed_patch_changes_nothing():
    shared = MultiwayNetwork(nn.Linear(H, H))
    model = nn.ModuleDict(dict(first=shared, second=shared))
    assert patch_multiway(model) == 1
    assert isinstance(model["first"], MultiwayAdapter) and model["second"] is model["first"]
    ffn = TorchscaleFFN(H, FFN_DIM)
    ffn.activation_fn = torch.tanh  # no fused activation for it: from_experts refuses the pair
    model = nn.ModuleList([nn.ModuleList([MultiwayNetwork(nn.Linear(H, H))]), nn.ModuleList([MultiwayNetwork(ffn)])])
    with pytest.raises(ValueError, match="activation"):
        patch_multiway(model)
    assert all(isinstance(m[0], MultiwayNetwork) for m in model)


def test_per_expert_parameters_with_frozen_a():
    """VLMo/BEiT-3 stages that train one modality's experts: A frozen, B trained."""
    model = make_encoder()
    for m in model.modules():
        if isinstance(m, MultiwayNetwork):
            m.A.requires_grad_(False)
    copy_before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="per_expert_parameters=True"):
        patch_multiway(model, per_expert_parameters=False)
    assert all(isinstance(m, MultiwayNetwork) for k, m in model.named_modules() if k.endswith(("proj", "ffn")))
    fast = patched(copy_before)  # the default: per-expert parameters
    for a in adapters(fast):
        for name, p in a.fused.named_parameters():
            assert p.requires_grad == name.endswith(".1"), name
    set_split_position(model, 5)
    set_split_position(fast, 5)
    x, dy = inputs()
    out, dx, grads = run(fast, x, dy)
    ref = run(copy.deepcopy(model).double(), x.double(), dy.double())
    eager = run(model, x, dy)
    assert_close(out, ref[0], torch.float32, eager=eager[0])
    assert_close(dx, ref[1], torch.float32, eager=eager[1])
    for k, g in grads.items():
        assert_close(g, ref[2][k], torch.float32, eager=eager[2][k], name=f"d {k}")
    assert all(p.grad is None for a in adapters(fast) for n, p in a.fused.named_parameters() if n.endswith(".0"))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_adapter_dim0_routes_by_ids(backend):
    """A MultiwayNetwork split along dim 0 (sequence-first x [S, B, H], or x [S, H]) routes by an ids tensor."""
    torch.manual_seed(4)
    mw = MultiwayNetwork(nn.Linear(H, 12), dim=0)
    adapter = MultiwayAdapter.from_multiway(mw)
    assert adapter.dim == 0 and adapter.kind == "linear"
    for shape in ((7, B, H), (7, H)):
        x = randn(*shape, seed=5).float()
        for p in (3, 0, -1, 7):
            mw.split_position = adapter.split_position = p
            with mmkernels.backend(backend), torch.no_grad():
                got = adapter(x)
            assert_close(got, copy.deepcopy(mw).double()(x.double()), torch.float32, eager=mw(x),
                         name=f"{shape} p={p}")


def test_bad_split():
    adapter = MultiwayAdapter.from_multiway(MultiwayNetwork(nn.Linear(H, H), dim=-1))
    x = randn(B, S, H, seed=0).float()
    adapter.split_position = 3
    with pytest.raises(ValueError, match="last"):
        adapter(x)
    adapter.dim = 1
    for p in (S + 1, -2):
        adapter.split_position = p
        with pytest.raises(ValueError, match="split_position"):
            adapter(x)


def test_ffn_dropout_warns():
    model = nn.Sequential(MultiwayNetwork(TorchscaleFFN(H, FFN_DIM, dropout=0.1, subln=True)))
    with pytest.warns(UserWarning, match="dropout"):
        assert patch_multiway(model) == 1
    assert list(ts.KEY_MAPS) == ["linear", "layer_norm", "ffn"]


def test_default_patch_keeps_every_parameter_shape():
    """With the default per-expert parameters the patched model has the original's parameter
    shapes (biases and LayerNorm scales stay 1-D), so optimiser groups chosen by shape (BEiT-3:
    no weight decay for 1-D parameters) are unchanged; the stacked layout would make them 2-D."""
    model = make_encoder(layers=2)
    shapes = sorted(tuple(p.shape) for p in model.parameters())
    assert sorted(tuple(p.shape) for p in patched(model).parameters()) == shapes
    one_d = sum(p.dim() == 1 for p in model.parameters())
    assert sum(p.dim() == 1 for p in patched(model, per_expert_parameters=False).parameters()) < one_d
