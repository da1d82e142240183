"""The BLIP-2 stage-1 reference model (mmkernels.models.blip2): its two forms train alike (C++
kernels, Triton kernels through the interpreter), the mmkernels form runs mmkernels' ops and the
plain form none, state dicts interchange, the model builds on the meta device and bad input
gets clear errors."""
import dataclasses

import pytest
import torch

import mmkernels
from mmkernels.models import blip2, common
from mmkernels.models import layers as model_layers
from mmkernels.testing.numerics import assert_close
from mmkernels.testing.training import assert_parity, train_side_by_side

TINY = blip2.Config.tiny()
LR, STEPS = 1e-3, 30



@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_training_parity(dtype):
    run = train_side_by_side("blip2", TINY, batch_size=8, steps=STEPS, dtype=dtype, lr=LR)
    assert_parity(run)


@pytest.mark.slow
def test_training_parity_triton():
    # Each step runs 8 self-attention and 4 cross-attention kernels forward and backward through
    # Triton's interpreter: batch 2 keeps the 30 steps within a CI-sized budget.
    run = train_side_by_side("blip2", TINY, batch_size=2, steps=30, dtype=torch.float32, lr=LR,
                             backend="triton")
    assert_parity(run)


# ----------------------------------------------------------------------------- the ops that run

ENTRY_POINTS = {  # where the model calls each op: (module, name)
    "blip2_itc_loss": (blip2, "blip2_itc_loss"),
    "itm_hard_negatives": (blip2, "itm_hard_negatives"),
    "multimodal_attention": (blip2, "multimodal_attention"),
    "cross_attention": (blip2, "cross_attention"),
    "fused_kv_projection": (blip2, "fused_kv_projection"),
    "vit_multimodal_attention": (model_layers, "multimodal_attention"),
}


def _count_calls(monkeypatch) -> dict:
    calls = {name: 0 for name in ENTRY_POINTS}
    for name, (module, attr) in ENTRY_POINTS.items():
        fn = getattr(module, attr)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(module, attr, counted)
    return calls


def _step(model, batch):
    torch.manual_seed(0)
    loss = model(**batch)
    loss.backward()
    return loss


@pytest.mark.parametrize("impl", ["mmkernels", "plain"])
def test_ops_that_run(impl, monkeypatch):
    cfg = blip2.Config.tiny(num_layers=3)          # two cross-attention layers
    calls = _count_calls(monkeypatch)
    model = common.build("blip2", cfg, impl, seed=0)
    batch = blip2.synthetic_batch(cfg, 4, seed=0)
    with mmkernels.explain() as log:
        _step(model, batch)
    if impl == "plain":
        assert all(n == 0 for n in calls.values()), calls
        assert len(log) == 0, f"the plain form ran mmkernels ops:\n{log}"
        return
    n_cross = 2
    assert calls == {"blip2_itc_loss": 1, "itm_hard_negatives": 1,
                     "multimodal_attention": 4 * cfg.num_layers,     # ITC (queries, text), ITM, ITG
                     "cross_attention": 4 * n_cross,                # ITC, ITG, ITM's two groups
                     "fused_kv_projection": 1,                      # every layer's K/V, once
                     "vit_multimodal_attention": cfg.vision_layers}, calls
    ran = [d.op for d in log]
    assert ran.count("itc_loss") == 2 and ran.count("itc_negatives") == 2, log   # both directions
    assert ran.count("cross_attention") == calls["cross_attention"], log
    assert ran.count("multimodal_attention") == 4 * cfg.num_layers + cfg.vision_layers, log


def test_frozen_vision_encoder():
    model = common.build("blip2", TINY, "mmkernels", seed=0)
    before = {k: v.clone() for k, v in model.visual_encoder.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    _step(model, blip2.synthetic_batch(TINY, 4, seed=0))
    opt.step()
    assert all(p.grad is None and not p.requires_grad for p in model.visual_encoder.parameters())
    assert model.ln_vision.weight.grad is not None and model.query_tokens.grad is not None
    for k, v in model.visual_encoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_deeper_config_agrees():
    """Three layers (cross-attention in layers 0 and 2, so the fused K/V GEMM serves two layers
    and layer 1 has none): one step's loss and gradients agree between the forms in float64."""
    cfg = blip2.Config.tiny(num_layers=3, num_heads=4)
    batch = blip2.synthetic_batch(cfg, 6, seed=1, dtype=torch.float64)
    models = {impl: common.build("blip2", cfg, impl, seed=2, dtype=torch.float64) for impl in common.IMPLS}
    losses = {impl: _step(m, batch) for impl, m in models.items()}
    assert_close(losses["mmkernels"], losses["plain"], torch.float64, name="loss")
    grads = {impl: dict(m.named_parameters()) for impl, m in models.items()}
    for name, p in grads["plain"].items():
        q = grads["mmkernels"][name]
        if p.grad is None:
            assert q.grad is None, name
            continue
        if name.endswith(".key.bias"):       # zero in exact arithmetic: only rounding differs
            assert_close(q.grad, torch.zeros_like(p.grad), torch.float64, name=name)
            continue
        assert_close(q.grad, p.grad, torch.float64, name=f"grad {name}")


# ----------------------------------------------------------------------------- state and meta

def test_state_dicts_interchange():
    plain = common.build("blip2", TINY, "plain", seed=3, dtype=torch.float64)
    mmk = common.build("blip2", TINY, "mmkernels", seed=3, dtype=torch.float64)
    sp, sm = plain.state_dict(), mmk.state_dict()
    assert list(sp) == list(sm)
    for k in sp:
        assert torch.equal(sp[k], sm[k]), k
    other = common.build("blip2", TINY, "mmkernels", seed=4, dtype=torch.float64)
    other.load_state_dict(sp, strict=True)
    # the fused K/V GEMM reads the layers' K and V weights in place: back to back in one storage
    for key, value in other.qformer.cross_kv_linears():
        w = key.weight
        assert value.weight.data_ptr() == w.data_ptr() + w.numel() * w.element_size()
    batch = blip2.synthetic_batch(TINY, 4, seed=5, dtype=torch.float64)
    torch.manual_seed(7)
    a = plain(**batch)
    torch.manual_seed(7)
    b = other(**batch)
    assert_close(b, a, torch.float64, name="loss after load_state_dict")


def test_builds_on_meta_and_runs_functionally():
    """As the bench family runs it: built on the meta device, run on given tensors."""
    real = common.build("blip2", TINY, "plain", seed=0)
    state = {k: v for k, v in real.named_parameters()}
    state.update(dict(real.named_buffers()))
    batch = blip2.synthetic_batch(TINY, 4, seed=0)
    torch.manual_seed(1)
    want = real(**batch)
    for impl in common.IMPLS:
        with torch.device("meta"):
            m = blip2.Model(TINY, impl=impl)
        assert all(p.device.type == "meta" for p in m.parameters())
        assert not any(p.requires_grad for p in m.visual_encoder.parameters())
        torch.manual_seed(1)
        got = torch.func.functional_call(m, state, args=(), kwargs=batch, strict=True)
        assert_close(got, want, torch.float32, name=f"{impl} loss")


# ----------------------------------------------------------------------------- bad input

def test_bad_impl_and_config():
    with pytest.raises(ValueError, match="impl must be one of"):
        blip2.Model(TINY, impl="fast")
    with pytest.raises(TypeError, match="Config"):
        blip2.Model(dataclasses.asdict(TINY))
    bad = {"hidden_size": 15, "num_heads": 0, "vocab_size": 4, "text_len": 2, "patch_size": 3,
           "vision_width": 15, "initializer_range": 0.0, "num_query_tokens": True}
    for field, value in bad.items():
        with pytest.raises(ValueError, match=field if field != "num_heads" else "num_heads"):
            blip2.Config.tiny(**{field: value})
    with pytest.raises(ValueError, match="head dim"):
        blip2.Config.tiny(hidden_size=512, num_heads=2)


def test_bad_batch():
    model = common.build("blip2", TINY, "mmkernels", seed=0)
    batch = blip2.synthetic_batch(TINY, 4, seed=0)
    cases = [
        (dict(images=batch["images"][:1], text_ids=batch["text_ids"][:1], text_lengths=batch["text_lengths"][:1]),
         "at least 2 samples"),
        (dict(batch, images=batch["images"][:, :2]), "images must be"),
        (dict(batch, text_ids=batch["text_ids"].float()), "text_ids must be int64"),
        (dict(batch, text_ids=torch.ones(4, TINY.text_len + 1, dtype=torch.int64)), "text_len"),
        (dict(batch, text_lengths=batch["text_lengths"][:3]), "text_lengths must be"),
        (dict(batch, text_lengths=batch["text_lengths"].tolist()), "must be a torch.Tensor"),
    ]
    for kwargs, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            model(**kwargs)
    with pytest.raises(ValueError, match="batch_size"):
        blip2.synthetic_batch(TINY, 1, seed=0)
