"""The ALBEF reference model (mmkernels.models.albef): its plain and mmkernels forms train alike.

Parity in training on the default backend (auto: the C++ kernels and PyTorch paths on CPU) in
float64 and float32, and on the Triton kernels through the interpreter; the mmkernels form runs
the ops it claims and the plain form none; both draw the same ITM negatives; state dicts
interchange; the model builds on the meta device and runs through ``functional_call``; bad
impl, config and inputs raise clear errors.
"""
import dataclasses

import pytest
import torch

import mmkernels
from mmkernels.models import albef, common, layers
from mmkernels.testing.training import TrainRun, assert_parity, train_side_by_side

TINY = albef.Config.tiny()
BATCH = 8
# The interpreter runs each attention program in Python (tens of milliseconds each): one head,
# one fusion layer and two pairs keep 30 steps affordable. With two pairs each sample has one
# possible negative, so the draws are checked at BATCH on the other backends.
TRITON_CONFIG = dataclasses.replace(TINY, vision_heads=1, text_heads=1, fusion_layers=1)
TRITON_BATCH = 2



def _batch(config=TINY, batch=BATCH, seed=0, dtype=torch.float32):
    return albef.synthetic_batch(config, batch, seed=seed, dtype=dtype)


def _step(model, batch, seed=0):
    """The loss of one forward (after seeding torch's generator: the ITM draws) and its backward."""
    torch.manual_seed(seed)
    loss = model(**batch)
    loss.backward()
    return loss


def _step_no_grad(model, batch, seed=0):
    torch.manual_seed(seed)
    return model(**batch)


# ----------------------------------------------------------------------------- parity in training

def key_bias_entries(state: dict, *, momentum: bool = False) -> dict:
    """``{name: slice}``: the attention key biases (the middle third of each fused ``qkv`` bias,
    every cross-attention ``key`` bias), of the online encoders or (``momentum``) of their
    momentum copies."""
    out = {}
    for name, t in state.items():
        if name.split(".")[0].endswith("_m") != momentum:
            continue
        if name.endswith("attn.qkv.bias"):
            w = t.shape[0] // 3
            out[name] = slice(w, 2 * w)
        elif name.endswith("cross.key.bias"):
            out[name] = slice(None)
    return out


def assert_albef_parity(run: TrainRun) -> None:
    """``assert_parity``, which below float64 holds the entries without gradient (the attention
    key biases: adding ``q . b_k`` to a row of scores leaves its softmax unchanged) to AdamW's
    bound ``steps * lr`` instead of twice eager's error. The momentum encoders' key biases are
    EMAs of those entries, so they drift alike, but they have no gradient of their own for the
    trainer to see: they are held to the same bound here, then left out of its comparison."""
    if run.dtype != torch.float64:
        truth, bound = run.states["truth"], len(run.losses["truth"]) * run.lr
        keys = key_bias_entries(truth, momentum=True)
        assert keys, "no momentum key bias found"
        states = {form: dict(state) for form, state in run.states.items()}
        for name, part in keys.items():
            drift = (states["mmkernels"][name][part] - truth[name][part]).abs().max().item()
            assert drift <= bound, f"{name}: key bias moved {drift:.3g} > steps * lr = {bound:.3g}"
            for form in ("mmkernels", "plain"):
                states[form][name] = states[form][name].clone()
                states[form][name][part] = truth[name][part]
        run = dataclasses.replace(run, states=states)
    assert_parity(run)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_training_parity_default_backend(dtype):
    run = train_side_by_side("albef", TINY, batch_size=BATCH, steps=30, dtype=dtype)
    assert_albef_parity(run)


def test_training_parity_triton():
    run = train_side_by_side("albef", TRITON_CONFIG, batch_size=TRITON_BATCH, steps=30,
                             dtype=torch.float32, backend="triton")
    assert_albef_parity(run)


def test_one_step_gradients():
    """One float64 step: every gradient of the mmkernels form equals the plain form's, and the
    attention key biases get none (up to rounding)."""
    batch = _batch(seed=4, dtype=torch.float64)
    grads = {}
    for impl in common.IMPLS:
        model = common.build("albef", TINY, impl, seed=1, dtype=torch.float64)
        _step(model, batch, seed=3)
        grads[impl] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert list(grads["plain"]) == list(grads["mmkernels"])
    for name, ref in grads["plain"].items():
        torch.testing.assert_close(grads["mmkernels"][name], ref, rtol=1e-9, atol=1e-12, msg=name)
    keys = key_bias_entries(grads["plain"])
    assert len(keys) == TINY.vision_layers + TINY.text_layers + 2 * TINY.fusion_layers
    for impl in common.IMPLS:
        for name, part in keys.items():
            assert grads[impl][name][part].abs().max() < 1e-12, (impl, name)
        assert grads[impl]["temp"].abs() > 0


# ----------------------------------------------------------------------------- which ops run

ALBEF_OPS = ("momentum_itc_loss", "itm_hard_negatives", "fused_kv_projection", "cross_attention")


def _count_calls(monkeypatch):
    """Wrap each op entry point the model modules call; return the per-name call counts."""
    counts = {}

    def counting(module, name):
        fn = getattr(module, name)

        def wrapped(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapped)

    for name in ALBEF_OPS + ("negatives_reference",):
        counting(albef, name)
    counting(layers, "multimodal_attention")
    return counts


def test_mmkernels_form_runs_the_ops(monkeypatch):
    counts = _count_calls(monkeypatch)
    model = common.build("albef", TINY, "mmkernels")
    with mmkernels.explain() as log:
        _step(model, _batch())
    c = TINY
    assert counts == {
        "momentum_itc_loss": 1, "itm_hard_negatives": 1, "fused_kv_projection": 1,
        "cross_attention": c.fusion_layers,
        # online and momentum image and text encoders, and the fusion layers' self-attention
        "multimodal_attention": 2 * (c.vision_layers + c.text_layers) + c.fusion_layers,
    }
    ops = {d.op for d in log}
    assert {"itc_loss", "itc_negatives", "multimodal_attention", "cross_attention"} <= ops
    assert "reference" not in log.paths()


def test_plain_form_runs_no_op(monkeypatch):
    counts = _count_calls(monkeypatch)
    model = common.build("albef", TINY, "plain")
    with mmkernels.explain() as log:
        _step(model, _batch())
    assert counts == {"negatives_reference": 2}
    assert len(log) == 0, str(log)


def test_both_forms_draw_the_same_negatives(monkeypatch):
    drawn = {}

    def recording(impl, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            drawn[impl] = out
            return out
        return wrapped

    plain, ours = (common.build("albef", TINY, impl) for impl in ("plain", "mmkernels"))
    monkeypatch.setattr(plain, "_negatives_plain", recording("plain", plain._negatives_plain))
    monkeypatch.setattr(albef, "itm_hard_negatives", recording("mmkernels", albef.itm_hard_negatives))
    batch = _batch(seed=3)
    for model in (plain, ours):
        _step(model, batch, seed=7)
    ar = torch.arange(BATCH)
    for a, b in zip(drawn["plain"], drawn["mmkernels"]):
        assert torch.equal(a, b)
        assert ((a >= 0) & (a < BATCH) & (a != ar)).all()
    # another generator state draws other negatives (the draw is not fixed by the data)
    _step(plain, batch, seed=8)
    assert any(not torch.equal(a, b) for a, b in zip(drawn["plain"], drawn["mmkernels"]))


# ----------------------------------------------------------------------------- state

def test_forms_share_state_and_state_dicts_interchange():
    plain, ours = (common.build("albef", TINY, impl, seed=5) for impl in ("plain", "mmkernels"))
    sd_plain, sd_ours = plain.state_dict(), ours.state_dict()
    assert list(sd_plain) == list(sd_ours)
    for k, v in sd_plain.items():
        assert torch.equal(v, sd_ours[k]), k
    assert {n for n, p in plain.named_parameters() if not p.requires_grad} == \
        {n for n, _ in plain.named_parameters() if n.split(".")[0].endswith("_m")}
    # a trained plain model's state runs in the mmkernels form (and back) to the same loss
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    _step(plain, _batch(seed=1))
    opt.step()
    ours.load_state_dict(plain.state_dict(), strict=True)
    other = common.build("albef", TINY, "plain", seed=9)
    other.load_state_dict(ours.state_dict(), strict=True)
    batch = _batch(seed=2)
    with torch.no_grad():
        losses = [_step_no_grad(m, batch) for m in (other, ours)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)


def test_enqueue_and_momentum_update():
    """After a step: the momentum features sit at the queue's old pointer, the rest of the queue
    is unchanged, the pointer moved by B, and each momentum parameter is ``m * old + (1 - m) *
    online``; the same in both forms."""
    for impl in common.IMPLS:
        model = common.build("albef", TINY, impl, seed=2)
        with torch.no_grad():
            for p in model.visual_encoder.parameters():   # online != momentum before the step
                p.add_(0.01 * torch.randn_like(p))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        _step(model, _batch())
        k, m = TINY.queue_size, TINY.momentum
        assert int(model.queue_ptr) == BATCH % k
        for name in ("image_queue", "text_queue"):
            q, q0 = model.state_dict()[name], before[name]
            torch.testing.assert_close(q[:, BATCH:], q0[:, BATCH:], rtol=0, atol=0)
            assert not torch.allclose(q[:, :BATCH], q0[:, :BATCH])
            torch.testing.assert_close(q[:, :BATCH].norm(dim=0), torch.ones(BATCH))
        name = "visual_encoder.patch_embed.weight"
        expect = m * before["visual_encoder_m.patch_embed.weight"] + (1 - m) * before[name]
        torch.testing.assert_close(model.state_dict()["visual_encoder_m.patch_embed.weight"], expect)


# ----------------------------------------------------------------------------- meta device

@pytest.mark.parametrize("impl", common.IMPLS)
def test_builds_on_meta_and_runs_through_functional_call(impl):
    with torch.device("meta"):
        meta = albef.Model(TINY, impl=impl)
    assert all(t.device.type == "meta" for t in [*meta.parameters(), *meta.buffers()])
    real = common.build("albef", TINY, impl, seed=4)
    state = {n: t.detach().clone().requires_grad_(t.requires_grad) for n, t in real.named_parameters()}
    state.update({n: t.clone() for n, t in real.named_buffers()})
    batch = _batch(seed=6)
    torch.manual_seed(0)
    got = torch.func.functional_call(meta, state, args=(), kwargs=batch, strict=True)
    got.backward()
    want = _step(real, batch)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert state["temp"].grad is not None and state["visual_encoder_m.cls_token"].grad is None


# ----------------------------------------------------------------------------- bad input

def test_bad_impl_and_config():
    with pytest.raises(ValueError, match="impl must be one of"):
        albef.Model(TINY, impl="fast")
    with pytest.raises(TypeError, match="albef.Config"):
        albef.Model({"image_size": 8})
    bad = [dict(image_size=10, patch_size=4), dict(vision_width=30, vision_heads=4),
           dict(text_width=30, text_heads=4), dict(alpha=1.5), dict(momentum=-0.1),
           dict(queue_size=0), dict(vocab_size=2), dict(temp=0.0)]
    for fields in bad:
        with pytest.raises(ValueError, match="Config"):
            dataclasses.replace(TINY, **fields)
    with pytest.raises(TypeError, match="Config.vision_layers must be an int"):
        dataclasses.replace(TINY, vision_layers=1.5)


@pytest.mark.parametrize("impl", common.IMPLS)
def test_bad_inputs(impl):
    model = common.build("albef", TINY, impl)
    good = _batch(batch=4)
    cases = [
        (dict(images=good["images"][:, :2]), "images must be"),
        (dict(input_ids=good["input_ids"].float()), "input_ids must be an int64"),
        (dict(input_ids=torch.ones(4, TINY.text_len + 1, dtype=torch.long),
              attention_mask=torch.ones(4, TINY.text_len + 1, dtype=torch.long)), "T <="),
        (dict(attention_mask=good["attention_mask"][:, :3]), "attention_mask must be"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            model(**{**good, **change})
    with pytest.raises(ValueError, match="at least 2"):
        model(**_batch(batch=1))
    with pytest.raises(ValueError, match="multiple of the batch size"):
        model(**_batch(batch=3))
    with pytest.raises(ValueError, match="batch_size"):
        albef.synthetic_batch(TINY, 0, seed=0)
