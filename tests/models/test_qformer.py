"""mmkernels.QFormer against HF transformers' Blip2QFormerModel and InstructBlipQFormerModel (tiny random
weights, nothing downloaded).

The main comparisons run on the default backend (auto: the C++ `cpu` kernels on CPU tensors);
one small comparison runs the Triton kernels (through the interpreter without a GPU).
"""
import types
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmkernels  # noqa: E402
from mmkernels import MultimodalMask, QFormer  # noqa: E402
from mmkernels import _storage  # noqa: E402
from mmkernels.models import qformer as qformer_mod  # noqa: E402

from tests.helpers.qformer import (  # noqa: E402
    B, LK, Q, T, TOL, VOCAB, additive, assert_same, assert_seeded_dropout, blip2_config, hf_fn, instruction,
    instructblip_config, make_blip2, make_inputs, make_instructblip, run_grads,
)


def ours_fn(m, **kw):
    return lambda x, e: m(x, e, **kw)


# ----------------------------------------------------------------------------- weights

@pytest.mark.parametrize("instructblip", [False, True], ids=["blip2", "instructblip"])
def test_state_dict_round_trip_strict(instructblip):
    hf = (make_instructblip if instructblip else make_blip2)(torch.float32)
    ours = QFormer(hf.config, text_embeddings=instructblip)
    assert set(ours.state_dict()) == set(hf.state_dict())
    ours.load_state_dict(hf.state_dict(), strict=True)
    for k, v in hf.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(1.0)
    hf.load_state_dict(ours.state_dict(), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(hf.state_dict()[k], v), k


def _kv_params(model):
    pairs = model._cross_kv_linears()
    return ([m.weight for pair in pairs for m in pair], [m.bias for pair in pairs for m in pair])


def _shared(model) -> bool:
    weights, biases = _kv_params(model)
    return (_storage.contiguous_run(weights) is not None
            and _storage.contiguous_run(biases) is not None)


def test_kv_storage_shared_across_load_and_moves():
    hf = make_blip2(torch.float32)
    ours = QFormer(hf.config)
    assert _shared(ours)
    params_before = [id(p) for p in ours.parameters()]
    ours.load_state_dict(hf.state_dict())           # copies in place: sharing survives
    assert _shared(ours)
    assert [id(p) for p in ours.parameters()] == params_before
    ours.to(torch.float64)
    assert _shared(ours) and ours.layernorm.weight.dtype == torch.float64
    ours.float()
    assert _shared(ours)
    ours.load_state_dict(hf.state_dict(), assign=True)  # new tensors: the load hook re-shares
    assert _shared(ours)
    torch.testing.assert_close(ours.encoder.layer[2].crossattention.attention.value.weight,
                               hf.encoder.layer[2].crossattention.attention.value.weight, rtol=0, atol=0)
    # QFormer.from_hf: same dtype, shared storage
    m64 = QFormer.from_hf(make_blip2(torch.float64))
    assert m64.layernorm.weight.dtype == torch.float64 and _shared(m64) and not m64.training


def test_one_fused_projection_per_forward(monkeypatch):
    hf = make_blip2(torch.float64)
    ours = QFormer.from_hf(hf)
    calls = []
    real = qformer_mod.fused_kv_projection

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(qformer_mod, "fused_kv_projection", counting)
    runs = []
    real_run = _storage.contiguous_run
    monkeypatch.setattr(_storage, "contiguous_run", lambda ts: runs.append(real_run(ts)) or runs[-1])
    x, e, _ = make_inputs(torch.float64)
    ours(x, e, query_length=Q)
    assert calls == [2]               # 4 layers, cross_attention_frequency 2: one GEMM for both
    # the fused weight and bias are views of the shared storage, not concatenated copies
    assert len(runs) == 2 and all(r is not None for r in runs)


# ----------------------------------------------------------------------------- against HF

CASES = {
    "queries": dict(s=Q),
    "queries_text_padding": dict(s=Q + T, attention_mask=True),
    "queries_encoder_padding": dict(s=Q, encoder_mask=True),
    "text_both_padding": dict(s=Q + T, attention_mask=True, encoder_mask=True),
}


@pytest.mark.parametrize("case, dtype", [(c, torch.float64) for c in CASES]
                         + [(c, torch.float32) for c in ("queries", "text_both_padding")])
def test_matches_hf(case, dtype):
    spec = CASES[case]
    s = spec["s"]
    hf = make_blip2(dtype)
    ours = QFormer.from_hf(hf)
    x, e, up = make_inputs(dtype, s)
    hf_kw, our_kw = {}, {}
    if s > Q:
        hf_kw["query_length"] = our_kw["query_length"] = Q
    if spec.get("attention_mask"):
        am = torch.ones(B, s, dtype=torch.long)
        am[1, s - 3:] = 0
        hf_kw["attention_mask"] = our_kw["attention_mask"] = am
    if spec.get("encoder_mask"):
        em = torch.ones(B, LK, dtype=torch.bool)
        em[0, 6:] = False
        our_kw["encoder_attention_mask"] = em
        # HF turns a 2D encoder mask into [B, 1, S, Lk], which fails to broadcast against the Q
        # cross-attention rows when text follows the queries: give it the 4D padding mask itself.
        hf_kw["encoder_attention_mask"] = em.long() if s == Q else additive(em[:, None, None, :], dtype)
    ref = run_grads(hf_fn(hf, **hf_kw), hf, x, e, up)
    got = run_grads(ours_fn(ours, **our_kw), ours, x, e, up)
    assert_same(got, ref, dtype)
    assert got[0].dtype == dtype


def test_text_only_matches_hf():
    hf = make_blip2(torch.float64)
    ours = QFormer.from_hf(hf)
    x, e, up = make_inputs(torch.float64, s=T)
    ref = run_grads(lambda x, e: hf(x, query_length=0).last_hidden_state + 0 * e.sum(), hf, x, e, up)
    got = run_grads(lambda x, e: ours(x, query_length=0) + 0 * e.sum(), ours, x, e, up)
    assert_same(got, ref, torch.float64)


@pytest.mark.parametrize("act", ["gelu_new", "gelu_pytorch_tanh", "relu", "silu"])
def test_activations_match_hf(act):
    hf = make_blip2(torch.float64, hidden_act=act, num_hidden_layers=2)
    ours = QFormer.from_hf(hf)
    x, e, _ = make_inputs(torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, e, query_length=Q),
                                   hf(x, query_length=Q, encoder_hidden_states=e).last_hidden_state,
                                   atol=1e-10, rtol=1e-10)


def test_low_precision_inputs_are_cast_like_hf():
    hf = make_blip2(torch.float32)
    ours = QFormer.from_hf(hf)
    x, e, _ = make_inputs(torch.float32)
    x16, e16 = x.bfloat16(), e.bfloat16()
    with torch.no_grad():
        ref = hf(x16, query_length=Q, encoder_hidden_states=e16).last_hidden_state
        got = ours(x16, e16, query_length=Q)
    assert got.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(got, ref, **TOL[torch.float32])


# ----------------------------------------------------------------------------- InstructBLIP

def test_instructblip_from_hf_layout():
    """InstructBLIP's embeddings replace BLIP-2's input LayerNorm; the pad id is the HF one."""
    hf = make_instructblip(torch.float32)
    assert "embeddings.word_embeddings.weight" in hf.state_dict() and "layernorm.weight" not in hf.state_dict()
    loaded = QFormer.from_hf(hf)
    assert loaded.has_text_embeddings and _shared(loaded) and not loaded.training
    assert loaded.embeddings.word_embeddings.padding_idx == hf.embeddings.word_embeddings.padding_idx == 0
    assert loaded.embeddings.layernorm.weight.dtype == torch.float32


def _instructblip_call(model, hf: bool, **kw):
    """``(x, e) -> last_hidden_state`` with ``x`` the query tokens and ``kw`` the instruction."""
    if hf:
        kw.setdefault("input_ids", None)       # HF's forward takes input_ids positionally
        return lambda x, e: model(query_embeds=x, encoder_hidden_states=e, **kw).last_hidden_state
    return lambda x, e: model(x, e, **kw)


INSTRUCT_CASES = {
    "queries": dict(),                                   # no instruction
    "instruction": dict(ids=True),                       # a padded instruction after the queries
    "instruction_encoder_padding": dict(ids=True, encoder_mask=True),
    "instruction_positions": dict(ids=True, positions=True),
}


@pytest.mark.parametrize("case, dtype", [(c, torch.float32) for c in INSTRUCT_CASES]
                         + [("instruction", torch.float64)])
def test_instructblip_matches_hf(case, dtype):
    """Output and gradients (queries, image features, every parameter: the word and position
    embeddings included) of InstructBLIP's Q-Former loaded by from_hf against the HF module."""
    spec = INSTRUCT_CASES[case]
    hf = make_instructblip(dtype)
    ours = QFormer.from_hf(hf)
    x, e, up = make_inputs(dtype)
    x = x[:, :Q]
    kw = {}
    if spec.get("ids"):
        kw["input_ids"], kw["attention_mask"] = instruction()
    else:
        up = up[:, :Q]
    if spec.get("positions"):
        kw["position_ids"] = torch.arange(T).flip(0)[None] + 5
    if spec.get("encoder_mask"):
        em = torch.ones(B, LK, dtype=torch.long)
        em[0, 6:] = 0
        kw["encoder_attention_mask"] = em
    ref = run_grads(_instructblip_call(hf, True, **kw), hf, x, e, up)
    got = run_grads(_instructblip_call(ours, False, **kw), ours, x, e, up)
    assert_same(got, ref, dtype)
    assert got[0].shape == (B, up.shape[1], 128) and got[0].dtype == dtype
    if spec.get("ids"):       # the pad id's embedding gets no gradient, as in HF
        assert ours.embeddings.word_embeddings.weight.grad[0].abs().max() == 0


def test_instructblip_text_only_matches_hf():
    """Instruction tokens without queries (HF: query_embeds=None): the text FFN only."""
    dtype = torch.float32
    hf = make_instructblip(dtype, num_hidden_layers=2)
    ours = QFormer.from_hf(hf)
    ids, am = instruction()
    x, e, up = make_inputs(dtype, s=T)
    ref = run_grads(lambda x, e: hf(ids, attention_mask=am[:, Q:]).last_hidden_state * x, hf, x, e, up)
    got = run_grads(lambda x, e: ours(None, input_ids=ids, attention_mask=am[:, Q:]) * x, ours, x, e, up)
    assert_same(got, ref, dtype)


def test_instructblip_bad_inputs():
    hf = make_instructblip(torch.float64, num_hidden_layers=2)
    holder = torch.nn.Module()
    holder.qformer = hf
    ours = QFormer.from_hf(holder)                 # a model holding the Q-Former as .qformer
    assert ours.has_text_embeddings
    x, e, _ = make_inputs(torch.float64, s=Q)
    ids, am = instruction()
    with pytest.raises(TypeError, match="int64"):
        ours(x, e, input_ids=ids.double())
    with pytest.raises(ValueError, match="query tokens only"):
        ours(x, e, input_ids=ids, query_length=Q - 1)
    with pytest.raises(ValueError, match="batch size"):
        ours(x, e, input_ids=ids[:1])
    with pytest.raises(ValueError, match="without input_ids"):
        ours(x, e, position_ids=torch.arange(T)[None])
    with pytest.raises(ValueError, match="position_ids"):
        ours(x, e, input_ids=ids, position_ids=torch.arange(T + 1)[None])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(x, e, input_ids=torch.ones(B, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        ours(x, e, input_ids=ids, attention_mask=am[:, Q:])     # the mask covers queries and instruction
    with pytest.raises(ValueError, match="query_embeds must be given"):
        ours(None, e)
    with pytest.raises(ValueError, match="text_embeddings=True"):
        QFormer.from_hf(make_blip2(torch.float64, num_hidden_layers=2))(x, e, input_ids=ids)
    with pytest.raises(ValueError, match="use_qformer_text_input"):
        QFormer(blip2_config(use_qformer_text_input=False), text_embeddings=True)
    with pytest.raises(TypeError, match="lacks.*vocab_size"):
        QFormer(types.SimpleNamespace(**{f: getattr(hf.config, f) for f in qformer_mod._CONFIG_FIELDS[:-1]}),
                text_embeddings=True)
    with pytest.raises(ValueError, match="pad_token_id"):
        QFormer(instructblip_config(pad_token_id=VOCAB), text_embeddings=True)


# ----------------------------------------------------------------------------- multimodal mask

def test_itg_multimodal_mask_matches_dense_mask():
    """Self-attention under MultimodalMask.blip2(..., "itg") against HF run with the same mask as
    an explicit dense [B, 1, S, S] additive mask."""
    dtype = torch.float64
    hf = make_blip2(dtype)
    ours = QFormer.from_hf(hf)
    x, e, up = make_inputs(dtype)
    lengths = torch.tensor([T, T - 3])
    mask = MultimodalMask.blip2(Q, lengths, T, "itg")
    dense = mask.to_dense()                                    # [B, 1, S, S] bool
    assert not dense[0, 0, :Q, Q:].any() and dense[0, 0, Q:, :Q].all()   # queries blind to text
    # rows of padded text tokens see nothing: HF would average them over every key, mmkernels
    # gives 0. They influence no other row, so compare the real rows only.
    rows = torch.ones(B, Q + T, 1, dtype=dtype)
    rows[1, Q + T - 3:] = 0
    ref = run_grads(hf_fn(hf, query_length=Q, attention_mask=additive(dense, dtype)), hf, x, e, up, rows)
    got = run_grads(ours_fn(ours, query_length=Q, self_attention_mask=mask), ours, x, e, up, rows)
    assert_same(got, ref, dtype)


def test_multimodal_mask_without_dropout_warns_once():
    hf = make_blip2(torch.float64, attention_probs_dropout_prob=0.1, num_hidden_layers=2)
    ours = QFormer.from_hf(hf).train()
    x, e, _ = make_inputs(torch.float64)
    mask = MultimodalMask.blip2(Q, [T, T], T, "itc")
    with pytest.warns(UserWarning, match="attention dropout"):
        ours(x, e, query_length=Q, self_attention_mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(x, e, query_length=Q, self_attention_mask=mask)
        ours.eval()(x, e, query_length=Q, self_attention_mask=mask)


# ----------------------------------------------------------------------------- dropout

def test_training_dropout_is_seeded():
    hf = make_blip2(torch.float64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.2, num_hidden_layers=2)
    ours = QFormer.from_hf(hf).train()
    x, e, _ = make_inputs(torch.float64)
    am = torch.ones(B, Q + T, dtype=torch.bool)
    am[0, -2:] = False
    assert_seeded_dropout(lambda xx: ours(xx, e, query_length=Q, attention_mask=am), x)
    with torch.no_grad():
        ref = hf.eval()(x, query_length=Q, attention_mask=am, encoder_hidden_states=e).last_hidden_state
        torch.testing.assert_close(ours.eval()(x, e, query_length=Q, attention_mask=am), ref,
                                   atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------- torch.compile

@pytest.mark.slow
def test_torch_compile_fullgraph_training_step():
    """The whole module compiles without graph breaks (the registered ops, the fused K/V projection,
    dropout), and the compiled step gives the eager step's output and gradients (eval mode)."""
    hf = make_blip2(torch.float32, num_hidden_layers=2)
    ours = QFormer.from_hf(hf).eval()
    compiled = torch.compile(ours, fullgraph=True)
    x, e, up = make_inputs(torch.float32)
    am = torch.ones(B, Q + T, dtype=torch.bool)
    am[1, -3:] = False
    got = run_grads(ours_fn(compiled, query_length=Q, attention_mask=am), ours, x, e, up)
    want = run_grads(ours_fn(ours, query_length=Q, attention_mask=am), ours, x, e, up)
    assert_same(got, want, torch.float32)
    ours.train()  # dropout inside the compiled graph: runs, finite, differs from eval
    out = compiled(x, e, query_length=Q, attention_mask=am)
    out.sum().backward()
    assert torch.isfinite(out).all() and not torch.allclose(out, got[0])


# ----------------------------------------------------------------------------- triton

def test_triton_backend_small():
    dtype = torch.float32
    hf = make_blip2(dtype, num_hidden_layers=2)
    ours = QFormer.from_hf(hf)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8 + 4, 128, generator=g)
    e = torch.randn(1, 6, 96, generator=g)
    up = torch.randn(1, 12, 128, generator=g)
    am = torch.ones(1, 12, dtype=torch.long)
    am[0, -1] = 0
    ref = run_grads(hf_fn(hf, query_length=8, attention_mask=am), hf, x, e, up)
    with mmkernels.backend("triton"):
        got = run_grads(ours_fn(ours, query_length=8, attention_mask=am), ours, x, e, up)
    assert_same(got, ref, dtype)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("over, exc, match", [
    (dict(num_attention_heads=3), ValueError, "multiple of"),
    (dict(hidden_act="mish"), ValueError, "hidden_act"),
    (dict(cross_attention_frequency=0), ValueError, "cross_attention_frequency"),
    (dict(attention_probs_dropout_prob=1.5), ValueError, "attention_probs_dropout_prob"),
    (dict(num_hidden_layers=2.0), TypeError, "num_hidden_layers"),
    (dict(hidden_size=512, num_attention_heads=2), ValueError, "head dim"),
])
def test_bad_config(over, exc, match):
    hf_cfg = blip2_config()
    cfg = types.SimpleNamespace(**{f: getattr(hf_cfg, f) for f in qformer_mod._CONFIG_FIELDS})
    QFormer(cfg)                      # a plain object with the config's attributes works
    for k, v in over.items():
        setattr(cfg, k, v)
    with pytest.raises(exc, match=match):
        QFormer(cfg)


def test_config_missing_attribute():
    class Partial:
        hidden_size = 128
        num_attention_heads = 2

    with pytest.raises(TypeError, match="lacks"):
        QFormer(Partial())


def test_bad_forward_inputs():
    ours = QFormer(blip2_config(num_hidden_layers=2)).double()
    x, e, _ = make_inputs(torch.float64)
    with pytest.raises(ValueError, match="hidden_size"):
        ours(x[..., :64], e)
    with pytest.raises(ValueError, match="query_length"):
        ours(x, e, query_length=Q + T + 1)
    with pytest.raises(TypeError, match="query_length"):
        ours(x, e, query_length=3.0)
    with pytest.raises(ValueError, match="encoder_hidden_states must be given"):
        ours(x, None, query_length=Q)
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        ours(x, e[..., :64], query_length=Q)
    with pytest.raises(ValueError, match="batch size"):
        ours(x, e[:1], query_length=Q)
    with pytest.raises(ValueError, match="attention_mask"):
        ours(x, e, query_length=Q, attention_mask=torch.ones(B, Q))
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        ours(x, e, query_length=Q, encoder_attention_mask=torch.ones(B, LK + 1))
    mask = MultimodalMask.blip2(Q, [T, T], T, "itg")
    with pytest.raises(ValueError, match="not both"):
        ours(x, e, query_length=Q, self_attention_mask=mask, attention_mask=torch.ones(B, Q + T))
    with pytest.raises(ValueError, match="self_attention_mask"):
        ours(x[:, :Q + 2], e, query_length=Q, self_attention_mask=mask)
    with pytest.raises(TypeError, match="MultimodalMask"):
        ours(x, e, query_length=Q, self_attention_mask=torch.ones(B, Q + T, Q + T, dtype=torch.bool))
    no_text = QFormer(blip2_config(num_hidden_layers=2, use_qformer_text_input=False)).double()
    with pytest.raises(ValueError, match="use_qformer_text_input"):
        no_text(x, e, query_length=Q)
    with pytest.raises(TypeError, match="Blip2QFormerModel"):
        QFormer.from_hf(torch.nn.Linear(2, 2))
