"""The VLMo / BEiT-3 reference model (mmkernels/models/vlmo.py): its plain and mmkernels forms train
alike (float64, float32, and the Triton kernels through the interpreter), the mmkernels form runs
the multiway, attention and contrastive ops on both routings (split position and modality ids),
and the forms share their parameters."""
import dataclasses

import pytest
import torch

import mmkernels
from mmkernels.experts.nn import modules as multiway_modules
from mmkernels.models import common, layers, vlmo
from mmkernels.testing.training import assert_parity, train_side_by_side

TINY = vlmo.Config.tiny()



# ----------------------------------------------------------------------------- parity in training

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_training_parity(dtype):
    run = train_side_by_side("vlmo", TINY, batch_size=4, dtype=dtype)
    assert_parity(run)


def test_training_parity_triton():
    # The interpreter's cost grows with the kernel launches and the programs each runs (rows x
    # heads for the attention), so: two pairs, one head, and one block, a VL block. That block
    # and the final LayerNorm still run every Triton kernel the model reaches: the attention
    # under the segment mask, the routing by ids and by split position, the grouped GEMMs of
    # the three-expert FFN, both LayerNorm routings and the contrastive loss.
    config = dataclasses.replace(TINY, heads=1, layers=1, vl_layers=1)
    run = train_side_by_side("vlmo", config, batch_size=2, dtype=torch.float32, backend="triton")
    assert_parity(run)


# ----------------------------------------------------------------------------- the ops each form runs

def _spy(monkeypatch):
    """Count the calls of each op entry point the model can reach, recording how the multiway
    ops were routed (``"split"``: an int position, ``"ids"``: a tensor)."""
    calls = {"ffn": [], "layer_norm": [], "attention": 0, "contrastive": 0}

    def routed(name, fn):
        def wrapper(x, modality_ids, *args, **kw):
            calls[name].append("split" if isinstance(modality_ids, int) else "ids")
            return fn(x, modality_ids, *args, **kw)
        return wrapper

    def counted(name, fn):
        def wrapper(*args, **kw):
            calls[name] += 1
            return fn(*args, **kw)
        return wrapper

    monkeypatch.setattr(multiway_modules, "modality_ffn", routed("ffn", multiway_modules.modality_ffn))
    monkeypatch.setattr(multiway_modules, "modality_layer_norm",
                        routed("layer_norm", multiway_modules.modality_layer_norm))
    monkeypatch.setattr(layers, "multimodal_attention", counted("attention", layers.multimodal_attention))
    monkeypatch.setattr(vlmo, "contrastive_loss", counted("contrastive", vlmo.contrastive_loss))
    return calls


def _step(impl, dtype=torch.float32):
    model = common.build("vlmo", TINY, impl, seed=0, dtype=dtype)
    batch = vlmo.synthetic_batch(TINY, 4, seed=0, dtype=dtype)
    torch.manual_seed(0)
    loss = model(**batch)
    loss.backward()
    return model, loss


def test_mmkernels_form_runs_the_ops(monkeypatch):
    calls = _spy(monkeypatch)
    with mmkernels.explain() as log:
        _step("mmkernels")
    bottom = TINY.layers - TINY.vl_layers
    # below the VL blocks the position split, in them the ids of the mixed batch; the final
    # LayerNorm splits by position
    assert calls["ffn"] == ["split"] * bottom + ["ids"] * TINY.vl_layers
    assert calls["layer_norm"] == ["split"] * bottom + ["ids"] * TINY.vl_layers + ["split"]
    assert calls["attention"] == TINY.layers and calls["contrastive"] == 1
    ops = [d.op for d in log]
    assert ops.count("multimodal_attention") == TINY.layers and ops.count("contrastive_loss") == 1
    assert ops.count("modality_ffn") == TINY.layers


def test_plain_form_runs_no_op(monkeypatch):
    calls = _spy(monkeypatch)
    with mmkernels.explain() as log:
        _step("plain")
    assert calls == {"ffn": [], "layer_norm": [], "attention": 0, "contrastive": 0}
    assert len(log) == 0


def test_forms_agree_on_one_step_with_every_gradient():
    (plain, lp), (ours, lo) = _step("plain", torch.float64), _step("mmkernels", torch.float64)
    torch.testing.assert_close(lo, lp, rtol=1e-10, atol=1e-10)
    for (name, p), q in zip(plain.named_parameters(), ours.parameters()):
        assert p.grad is not None and q.grad is not None, name
        assert bool(p.grad.abs().sum() > 0), name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_unimodal_row_is_the_separate_passes():
    """The block-diagonal unimodal row gives the class tokens that separate image-only and
    text-only passes give (VLMo runs those), with V / L experts throughout."""
    model = common.build("vlmo", TINY, "plain", seed=0, dtype=torch.float64)
    batch = vlmo.synthetic_batch(TINY, 3, seed=1, dtype=torch.float64)
    img, txt = model._embed(batch["images"], batch["text_ids"])
    b, ni, nt = img.shape[0], img.shape[1], txt.shape[1]
    lengths = batch["text_lengths"]
    rows = torch.cat([img, txt], dim=1)
    mask, ids = model._rows(lengths.repeat_interleave(3), ni, nt)
    packed = model._encode(rows.repeat_interleave(3, dim=0), mask, ni, ids)[::3]
    image_only = model._encode(img, None, ni, torch.zeros(b, ni, dtype=torch.int64))
    text_mask = mmkernels.MultimodalMask.key_padding(lengths, nt)
    text_only = model._encode(txt, text_mask, 0, torch.ones(b, nt, dtype=torch.int64))
    torch.testing.assert_close(packed[:, 0], image_only[:, 0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(packed[:, ni], text_only[:, 0], rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- parameters and building

def test_state_dicts_interchange():
    plain = common.build("vlmo", TINY, "plain", seed=0)
    ours = common.build("vlmo", TINY, "mmkernels", seed=1)
    sp, so = plain.state_dict(), ours.state_dict()
    assert list(sp) == list(so) and all(sp[k].shape == so[k].shape for k in sp)
    assert not all(torch.equal(sp[k], so[k]) for k in sp)          # seeds 0 and 1 differ
    ours.load_state_dict(sp, strict=True)
    again = common.build("vlmo", TINY, "mmkernels", seed=0)         # the same seed, the same init
    assert all(torch.equal(again.state_dict()[k], v) for k, v in sp.items())
    plain.load_state_dict(common.build("vlmo", TINY, "mmkernels", seed=2).state_dict(), strict=True)
    assert sp["blocks.1.ffn.w_in"].shape == (3, int(TINY.width * TINY.mlp_ratio), TINY.width)  # V, L, VL
    assert sp["blocks.0.ln_2.weight"].shape == (2, TINY.width)


@pytest.mark.parametrize("impl", common.IMPLS)
def test_builds_on_meta_and_runs_by_functional_call(impl):
    with torch.device("meta"):
        big = vlmo.Model(vlmo.Config(), impl=impl)                   # VLMo-Base, no memory
        tiny = vlmo.Model(TINY, impl=impl)
    assert all(t.is_meta for t in big.state_dict().values())
    assert big.blocks[-1].ffn.w_in.shape == (3, 3072, 768)
    real = common.build("vlmo", TINY, "plain", seed=0)
    state = {k: v.detach() for k, v in real.state_dict().items()}
    batch = vlmo.synthetic_batch(TINY, 4, seed=0)
    torch.manual_seed(0)
    got = torch.func.functional_call(tiny, state, args=(), kwargs=batch, strict=True)
    torch.manual_seed(0)
    torch.testing.assert_close(got, real(**batch), rtol=1e-5, atol=1e-6)


def test_bad_impl_and_config():
    with pytest.raises(ValueError, match="impl must be one of"):
        vlmo.Model(TINY, impl="fast")
    with pytest.raises(TypeError, match="vlmo.Config"):
        vlmo.Model({"width": 32})
    bad = [dict(width=30, heads=4), dict(layers=2, vl_layers=3), dict(image_size=10, patch_size=4),
           dict(text_len=1), dict(vocab_size=2), dict(width=0), dict(mlp_ratio=0.0), dict(eps=0.0)]
    for kw in bad:
        with pytest.raises(ValueError):
            dataclasses.replace(TINY, **kw)
    with pytest.raises(TypeError, match="must be an int"):
        dataclasses.replace(TINY, layers=2.0)


def test_bad_batch():
    model = common.build("vlmo", TINY, "plain")
    batch = vlmo.synthetic_batch(TINY, 4, seed=0)
    cases = [
        (dict(images=batch["images"][:, :2]), "images must be"),
        (dict(images=batch["images"][:1], text_ids=batch["text_ids"][:1], text_lengths=batch["text_lengths"][:1]),
         "at least 2 pairs"),
        (dict(text_ids=batch["text_ids"].int()), "text_ids must be int64"),
        (dict(text_ids=batch["text_ids"][:, :-1]), "text_ids must be int64"),
        (dict(text_lengths=batch["text_lengths"][:3]), "text_lengths must be"),
        (dict(text_lengths=torch.full((4,), TINY.text_len + 1)), r"text_lengths must lie in"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            model(**{**batch, **change})
    with pytest.raises(ValueError, match="batch_size"):
        vlmo.synthetic_batch(TINY, 1, seed=0)


def test_synthetic_batch_structure():
    a = vlmo.synthetic_batch(TINY, 6, seed=3, dtype=torch.float64)
    assert torch.equal(a["text_ids"], vlmo.synthetic_batch(TINY, 6, seed=3)["text_ids"])
    assert a["images"].dtype == torch.float64 and a["images"].shape == (6, 3, 8, 8)
    ids, lengths = a["text_ids"], a["text_lengths"]
    assert bool((ids[:, 0] == vlmo.CLS).all())
    past = torch.arange(TINY.text_len)[None] >= lengths[:, None]
    assert bool((ids[past] == vlmo.PAD).all()) and bool((ids[~past] != vlmo.PAD).all())
    assert not torch.equal(a["images"], vlmo.synthetic_batch(TINY, 6, seed=4, dtype=torch.float64)["images"])
