"""patch_blip2: HF transformers' BLIP-2 Q-Former on mmkernels.cross_attention (tiny random models).

The main comparisons run on the default backend (auto: the C++ `cpu` kernels on CPU tensors);
one small comparison runs the Triton kernels (through the interpreter without a GPU).
"""
import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import mmkernels  # noqa: E402
from mmkernels import _storage  # noqa: E402
from mmkernels.testing.numerics import assert_close  # noqa: E402
from mmkernels.integrations import is_patched, key_padding_from_hf_mask, patch_blip2, unpatch_blip2  # noqa: E402
from mmkernels.integrations import transformers as integ  # noqa: E402

from transformers import Blip2QFormerConfig  # noqa: E402

from tests.helpers.qformer import (  # noqa: E402
    B, LK, Q, T, assert_same, assert_seeded_dropout, hf_fn, instruction, make_blip2, make_inputs, make_instructblip,
)
from tests.helpers.qformer import run_grads as run_fn_grads  # noqa: E402


def run_grads(model, x, e, up, **kw):
    """Output and gradients of the HF Q-Former ``model`` called with ``x`` as its input."""
    return run_fn_grads(hf_fn(model, **kw), model, x, e, up)


def no_patch_left(model) -> bool:
    return not any(k in m.__dict__ for m in model.modules()
                   for k in ("forward", integ._KV, integ._PREV, integ._STATE))


def encoder_mask(kind, dtype):
    keep = torch.ones(B, LK, dtype=torch.bool)
    keep[0, 6:] = False
    if kind == "2d":
        return keep.long()
    keep4 = keep[:, None, None, :]
    if kind == "4d_bool":
        return keep4
    return torch.zeros(keep4.shape, dtype=dtype).masked_fill(~keep4, torch.finfo(dtype).min)


# HF builds a [B, 1, S, Lk] mask from a 2D encoder mask, which only works when S == Q (queries
# only); with text tokens it is given the 4D padding mask (bool for sdpa, additive for eager).
CASES = {
    "queries": dict(s=Q),
    "text_padding": dict(s=Q + T, attention_mask=True),
    "encoder_padding_2d": dict(s=Q, encoder="2d"),
    "text_and_encoder_padding_4d": dict(s=Q + T, attention_mask=True, encoder="4d"),
}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_patched_matches_hf(case, impl):
    dtype = torch.float64
    spec = CASES[case]
    s = spec["s"]
    hf = make_blip2(dtype, impl)
    x, e, up = make_inputs(dtype, s)
    kw = {}
    if s > Q:
        kw["query_length"] = Q
    if spec.get("attention_mask"):
        am = torch.ones(B, s, dtype=torch.long)
        am[1, s - 3:] = 0
        kw["attention_mask"] = am
    if "encoder" in spec:
        kind = spec["encoder"]
        if kind == "4d":
            kind = "4d_bool" if impl == "sdpa" else "4d_float"
        kw["encoder_attention_mask"] = encoder_mask(kind, dtype)
    ref = run_grads(hf, x, e, up, **kw)
    unpatch = patch_blip2(hf)
    assert is_patched(hf)
    got = run_grads(hf, x, e, up, **kw)
    assert_same(got, ref, dtype)
    unpatch()
    assert not is_patched(hf) and no_patch_left(hf)
    again = run_grads(hf, x, e, up, **kw)
    for t_a, t_b in zip(again[:3], ref[:3]):
        assert torch.equal(t_a, t_b)


def test_patched_matches_hf_float32_sdpa():
    dtype = torch.float32
    hf = make_blip2(dtype, "sdpa")
    x, e, up = make_inputs(dtype)
    am = torch.ones(B, Q + T, dtype=torch.bool)
    am[0, -2:] = False
    ref = run_grads(hf, x, e, up, query_length=Q, attention_mask=am)
    with torch.no_grad():
        plain = hf(x, encoder_hidden_states=e, query_length=Q, attention_mask=am,
                   return_dict=False)
    unpatch = patch_blip2(hf)
    got = run_grads(hf, x, e, up, query_length=Q, attention_mask=am)
    assert_same(got, ref, dtype)
    with torch.no_grad():                       # the tuple output structure is unchanged
        patched = hf(x, encoder_hidden_states=e, query_length=Q, attention_mask=am, return_dict=False)
    assert type(patched) is type(plain) and len(patched) == len(plain)
    unpatch()


def test_fused_projection_once_and_stash_cleared(monkeypatch):
    hf = make_blip2(torch.float64)
    patch_blip2(hf)
    cross = [l.crossattention.attention for l in hf.encoder.layer if l.has_cross_attention]
    # patching shares the cross layers' K/V storage: the fused GEMM reads a view
    weights = [t for m in cross for t in (m.key.weight, m.value.weight)]
    biases = [t for m in cross for t in (m.key.bias, m.value.bias)]
    assert _storage.contiguous_run(weights) is not None and _storage.contiguous_run(biases) is not None
    calls, seen = [], []
    real = integ.fused_kv_projection

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    real_cross = integ.cross_attention

    def spying(q, k, v, **kwargs):
        seen.append(all(integ._KV in m.__dict__ for m in cross))
        return real_cross(q, k, v, **kwargs)

    monkeypatch.setattr(integ, "fused_kv_projection", counting)
    monkeypatch.setattr(integ, "cross_attention", spying)
    own_kv = []
    hooks = [lin.register_forward_hook(lambda *a: own_kv.append(1)) for m in cross for lin in (m.key, m.value)]
    x, e, _ = make_inputs(torch.float64)
    with torch.no_grad():
        hf(x, encoder_hidden_states=e, query_length=Q)
    for h in hooks:
        h.remove()
    assert calls == [2]                     # 2 cross-attention layers, one GEMM
    assert own_kv == []                     # no cross layer ran its own key/value linear
    assert len(seen) == 6 and all(seen)     # 4 self + 2 cross attentions ran with the stash set
    assert not any(integ._KV in m.__dict__ for m in cross)
    # an exception inside the layers still clears the stash
    with pytest.raises(ValueError):
        hf(x, encoder_hidden_states=e, query_length=Q, attention_mask=torch.ones(B, 1, 1, 3, dtype=torch.bool))
    assert calls == [2, 2]
    assert not any(integ._KV in m.__dict__ for m in cross)


def test_patch_twice_and_unpatch_unpatched():
    hf = make_blip2(torch.float64, num_hidden_layers=2)
    unpatch_blip2(hf)                                    # not patched: no-op
    assert no_patch_left(hf)
    first = patch_blip2(hf)
    forwards = [m.__dict__.get("forward") for m in hf.modules()]
    second = patch_blip2(hf)                             # no-op
    assert [m.__dict__.get("forward") for m in hf.modules()] == forwards
    second()
    assert no_patch_left(hf)
    first()                                              # already unpatched: no-op
    assert no_patch_left(hf)


def test_unpatch_restores_previous_instance_forward():
    hf = make_blip2(torch.float64, num_hidden_layers=2)
    att = hf.encoder.layer[0].attention.attention
    calls = []
    own = att.forward

    def wrapper(*args, **kwargs):
        calls.append(1)
        return own(*args, **kwargs)

    att.forward = wrapper                                # e.g. an accelerate-style hook
    unpatch = patch_blip2(hf)
    x, e, _ = make_inputs(torch.float64, s=Q)
    with torch.no_grad():
        hf(x, encoder_hidden_states=e)
    assert calls == []                                   # the patch replaces the attention
    unpatch()
    assert att.__dict__["forward"] is wrapper
    with torch.no_grad():
        hf(x, encoder_hidden_states=e)
    assert calls == [1]


def test_gradient_checkpointing():
    hf = make_blip2(torch.float64, num_hidden_layers=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if hasattr(hf, "activation_checkpointing_enable"):          # transformers >= 5.2x
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in hf.encoder.layer)
    hf.train()
    x, e, up = make_inputs(torch.float64)
    ref = run_grads(hf, x, e, up, query_length=Q)
    patch_blip2(hf)
    got = run_grads(hf, x, e, up, query_length=Q)
    assert_same(got, ref, torch.float64)


def test_training_dropout_is_seeded():
    hf = make_blip2(torch.float64, num_hidden_layers=2, attention_probs_dropout_prob=0.2, hidden_dropout_prob=0.1)
    patch_blip2(hf)
    hf.train()
    x, e, _ = make_inputs(torch.float64)
    assert_seeded_dropout(lambda xx: hf(xx, encoder_hidden_states=e, query_length=Q).last_hidden_state, x)


def _tiny_blip2(cls):
    from transformers import Blip2Config, Blip2VisionConfig, OPTConfig

    vc = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8)
    qc = Blip2QFormerConfig(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_hidden_layers=2,
                            cross_attention_frequency=1, encoder_hidden_size=32)
    tc = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                   max_position_embeddings=64, word_embed_proj_dim=32)
    torch.manual_seed(0)
    model = cls(Blip2Config(vision_config=vc.to_dict(), qformer_config=qc.to_dict(), text_config=tc.to_dict(),
                            num_query_tokens=8)).eval()
    with torch.no_grad():
        model.query_tokens.normal_()        # HF initialises them to zeros
    return model


def test_patch_blip2_model_wrapper():
    from transformers import Blip2ForConditionalGeneration, Blip2Model

    model = _tiny_blip2(Blip2Model)
    px = torch.randn(2, 3, 16, 16)

    def features():
        model.zero_grad(set_to_none=True)
        p = px.clone().requires_grad_()
        out = model.get_qformer_features(p)
        out.square().sum().backward()
        return out.detach(), p.grad, model.query_tokens.grad.clone()

    ref = features()
    unpatch = patch_blip2(model)
    assert is_patched(model) and is_patched(model.qformer)
    got = features()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)
    unpatch()
    assert no_patch_left(model)

    gen = _tiny_blip2(Blip2ForConditionalGeneration)
    unpatch = patch_blip2(gen)
    assert is_patched(gen.qformer)
    unpatch_blip2(gen)
    assert no_patch_left(gen)


def test_patch_rejects_other_models():
    with pytest.raises(TypeError, match="Q-Former"):
        patch_blip2(nn.Linear(2, 2))

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.qformer = nn.Linear(2, 2)

    with pytest.raises(TypeError, match="Holder"):
        patch_blip2(Holder())
    with pytest.raises(TypeError):
        patch_blip2("blip2")
    with pytest.raises(TypeError):
        unpatch_blip2(nn.Linear(2, 2))


def test_key_padding_from_hf_mask_forms():
    keep = torch.tensor([[True, True, False], [True, False, False]])
    assert key_padding_from_hf_mask(None, 2, 3) is None
    for m in (keep[:, None, None, :], keep[:, None, None, :].expand(2, 1, 4, 3), keep, keep.long(),
              keep[:, None, None, :].long()):
        assert torch.equal(key_padding_from_hf_mask(m, 2, 3), keep)
    for fill in (torch.finfo(torch.float32).min, -10000.0, float("-inf")):
        add = torch.zeros(2, 1, 5, 3).masked_fill(~keep[:, None, None, :], fill)
        assert torch.equal(key_padding_from_hf_mask(add, 2, 3), keep)
    one = key_padding_from_hf_mask(keep[:1, None, None, :], 2, 3)     # batch broadcast
    assert torch.equal(one, keep[:1].expand(2, 3))
    with pytest.raises(ValueError, match="4D"):
        key_padding_from_hf_mask(keep[None], 2, 3)
    with pytest.raises(ValueError, match="does not fit"):
        key_padding_from_hf_mask(keep[:, None, None, :], 2, 4)
    with pytest.raises(TypeError, match="BlockMask"):
        key_padding_from_hf_mask(object(), 2, 3)


def test_triton_backend_small():
    dtype = torch.float32
    hf = make_blip2(dtype, "sdpa", num_hidden_layers=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 12, 128, generator=g)
    e = torch.randn(1, 6, 96, generator=g)
    up = torch.randn(1, 12, 128, generator=g)
    am = torch.ones(1, 12, dtype=torch.long)
    am[0, -1] = 0
    ref = run_grads(hf, x, e, up, query_length=8, attention_mask=am)
    patch_blip2(hf)
    with mmkernels.backend("triton"):
        got = run_grads(hf, x, e, up, query_length=8, attention_mask=am)
    assert_same(got, ref, dtype)


def test_patched_instructblip_qformer_matches_hf():
    """InstructBLIP's Q-Former (its own word embeddings; instruction tokens after the queries,
    padded) gives the same output and gradients before and after patch_blip2."""
    hf = make_instructblip(torch.float64)
    ids, am = instruction()
    x, e, up = make_inputs(torch.float64)

    def fn(queries, image):
        return hf(input_ids=ids, attention_mask=am, query_embeds=queries, encoder_hidden_states=image).last_hidden_state

    want = run_fn_grads(fn, hf, x[:, :Q], e, up)
    unpatch = patch_blip2(hf)
    assert is_patched(hf)
    got = run_fn_grads(fn, hf, x[:, :Q], e, up)
    unpatch()
    assert_same(got, want, torch.float64)


def test_patched_matches_hf_under_autocast():
    """Mixed-precision BLIP-2 training: an fp32 Q-Former under ``torch.autocast`` (bf16) reading
    bf16 features of a half-precision vision tower (HF casts them to the Q-Former's dtype; direct
    callers of the fused projection with mixed dtypes are tested in tests/package/test_autocast.py). The
    patched model returns the dtypes HF returns under the same autocast and stays within bf16
    error of the float64 model, with fp32 parameter gradients."""
    hf = make_blip2(torch.float32, "eager")
    x, e, up = make_inputs(torch.float32, Q)
    e = e.to(torch.bfloat16)

    def step(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return run_grads(model, x, e, up)

    ref = step(hf)
    exact = run_grads(copy.deepcopy(hf).double(), x.double(), e.double(), up.double())
    unpatch = patch_blip2(hf)
    got = step(hf)
    unpatch()
    assert [t.dtype for t in got[:3]] == [t.dtype for t in ref[:3]]  # out: fp32 after the final LayerNorm
    assert got[2].dtype == torch.bfloat16
    for name, g, r, t in (("out", got[0], ref[0], exact[0]), ("dx", got[1], ref[1], exact[1]),
                          ("d image", got[2], ref[2], exact[2])):
        assert_close(g, t, torch.bfloat16, eager=r, scale=4.0, name=name)
    for n, t in exact[3].items():
        if t is None:  # parts the queries do not reach (the text FFN)
            assert got[3][n] is None, n
            continue
        assert got[3][n] is not None and got[3][n].dtype == torch.float32, n
        assert_close(got[3][n], t, torch.bfloat16, eager=ref[3][n], scale=4.0, name=n)
