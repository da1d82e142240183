"""The CLIP / SigLIP reference model (mmkernels.models.clip): its mmkernels form trains like its
plain form (parity of every step's loss and of the final parameters, against a float64 truth), on
the C++ kernels (backend auto) and on the Triton kernels (interpreted); it runs mmkernels' ops and
the plain form none; state dicts interchange; it builds on the meta device; bad input is refused.
"""
import dataclasses

import pytest
import torch

import mmkernels
from mmkernels.models import clip, common
from mmkernels.testing.peers import open_clip_loss
from mmkernels.testing.training import TrainRun, assert_parity, train_side_by_side

STEPS, LR = 30, 1e-3
LOSSES = ("clip", "siglip")



def assert_clip_parity(run: TrainRun) -> None:
    """:func:`assert_parity`; the key third of each attention ``qkv.bias`` has no true gradient
    (it shifts a whole softmax row), so the trainer holds it to AdamW's bound: check it is there."""
    free = [n for n in run.grad_max if n.endswith("attn.qkv.bias")]
    assert free, "the model has attention biases"
    if run.dtype != torch.float64:
        for name in free:
            k = run.grad_max[name].chunk(3)[1]
            assert k.max().item() < 1e-9 * max(t.max().item() for t in run.grad_max.values()), name
    assert_parity(run)


def _ops(log) -> list:
    """``(op, mask kind)`` of each recorded call (the attention's shape class starts with its mask
    kind; the losses have none)."""
    return [(d.op, d.case[2].split(":")[0] if d.op == "multimodal_attention" else None) for d in log]


# ----------------------------------------------------------------------------- parity in training

@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_parity_in_training(dtype, loss):
    run = train_side_by_side("clip", clip.Config.tiny(loss=loss), batch_size=8, steps=STEPS,
                             dtype=dtype, lr=LR)
    assert_clip_parity(run)


def test_parity_in_training_with_several_heads():
    config = clip.Config.tiny(vision_heads=2, text_heads=4, vision_layers=2)
    assert_clip_parity(train_side_by_side("clip", config, batch_size=6, steps=STEPS, lr=LR))


@pytest.mark.parametrize("loss", LOSSES)
def test_parity_in_training_triton(loss):
    run = train_side_by_side("clip", clip.Config.tiny(loss=loss), batch_size=4, steps=STEPS,
                             dtype=torch.float32, lr=LR, backend="triton")
    assert_clip_parity(run)


# ----------------------------------------------------------------------------- which ops run

@pytest.mark.parametrize("loss", LOSSES)
def test_mmkernels_form_runs_the_ops_and_plain_none(loss):
    config = clip.Config.tiny(loss=loss, vision_layers=2)
    batch = clip.synthetic_batch(config, 4, seed=0)
    with mmkernels.explain() as log:
        common.build("clip", config, "mmkernels")(**batch).backward()
    loss_op = "contrastive_loss" if loss == "clip" else "siglip_loss"
    assert _ops(log) == [("multimodal_attention", "none")] * 2 + [("multimodal_attention", "causal"),
                                                                  (loss_op, None)]
    with mmkernels.explain() as log:
        common.build("clip", config, "plain")(**batch).backward()
    assert list(log) == []


def test_triton_backend_runs_the_triton_kernels():
    config = clip.Config.tiny()
    batch = clip.synthetic_batch(config, 2, seed=0)
    with mmkernels.backend("triton"), mmkernels.explain() as log:
        common.build("clip", config, "mmkernels")(**batch)
    assert [(d.op, d.path, d.backend) for d in log] == (
        [("multimodal_attention", "kernel", "triton")] * 2 + [("contrastive_loss", "kernel", "triton")])


@pytest.mark.parametrize("loss", LOSSES)
def test_plain_losses_are_open_clips(loss):
    peer = open_clip_loss()
    if peer is None:
        pytest.skip("open_clip is not installed")
    g = torch.Generator().manual_seed(0)
    img, txt = (torch.nn.functional.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=-1)
                for _ in range(2))
    scale, bias = torch.tensor(11.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    if loss == "clip":
        ours, theirs = clip.clip_loss_plain(img, txt, scale), peer.ClipLoss()(img, txt, scale)
    else:
        ours, theirs = clip.siglip_loss_plain(img, txt, scale, bias), peer.SigLipLoss()(img, txt, scale, bias)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- state, meta device

@pytest.mark.parametrize("loss", LOSSES)
def test_state_dicts_interchange(loss):
    config = clip.Config.tiny(loss=loss)
    plain = common.build("clip", config, "plain", seed=3, dtype=torch.float64)
    fused = common.build("clip", config, "mmkernels", seed=3, dtype=torch.float64)
    assert ("logit_bias" in plain.state_dict()) == (loss == "siglip")
    for k, v in plain.state_dict().items():
        assert torch.equal(fused.state_dict()[k], v), k
    other = common.build("clip", config, "plain", seed=4, dtype=torch.float64)
    fused.load_state_dict(other.state_dict(), strict=True)
    batch = clip.synthetic_batch(config, 6, seed=1, dtype=torch.float64)
    torch.testing.assert_close(fused(**batch), other(**batch), rtol=1e-12, atol=1e-12)
    assert fused.logit_scale.item() == pytest.approx(torch.log(torch.tensor(1 / 0.07)).item())
    if loss == "siglip":
        assert fused.logit_bias.item() == -10.0


@pytest.mark.parametrize("impl", common.IMPLS)
def test_builds_on_meta_and_runs_on_given_tensors(impl):
    config = clip.Config.tiny(loss="siglip")
    with torch.device("meta"):
        meta = clip.Model(config, impl=impl)
    assert all(t.is_meta for t in meta.state_dict().values())
    real = common.build("clip", config, impl, seed=0)
    batch = clip.synthetic_batch(config, 3, seed=2)
    got = torch.func.functional_call(meta, dict(real.named_parameters()), args=(), kwargs=batch, strict=True)
    torch.testing.assert_close(got, real(**batch), rtol=0, atol=0)


# ----------------------------------------------------------------------------- data and bad input

def test_synthetic_batch_has_structure():
    config = clip.Config.tiny()
    a, b = (clip.synthetic_batch(config, 5, seed=7, dtype=torch.float64) for _ in range(2))
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["text"], b["text"])
    text = a["text"]
    assert a["images"].shape == (5, 3, 8, 8) and a["images"].dtype == torch.float64
    assert text.shape == (5, config.context_length) and text.dtype == torch.int64
    assert (text[:, 0] == clip.sot_id(config.vocab_size)).all()
    eot = text.argmax(dim=-1)
    assert (text[torch.arange(5), eot] == clip.eot_id(config.vocab_size)).all()
    assert ((text == clip.eot_id(config.vocab_size)).sum(dim=1) == 1).all()
    after = torch.arange(config.context_length) > eot[:, None]
    assert (text[after] == clip.PAD_ID).all()
    # pairs of one class: the same prototype under the noise, the same template under the swaps
    big = clip.synthetic_batch(config, 64, seed=0, dtype=torch.float64)
    flat = big["images"].flatten(1)
    dist = torch.cdist(flat, flat)
    same = (big["text"][:, None, 1:3] == big["text"][None, :, 1:3]).all(-1)
    assert dist[same].mean() < 0.6 * dist[~same].mean()


def test_bad_impl_and_config_raise():
    with pytest.raises(ValueError, match="impl must be one of"):
        clip.Model(clip.Config.tiny(), impl="fused")
    with pytest.raises(ValueError, match="loss must be one of"):
        clip.Config.tiny(loss="infonce")
    with pytest.raises(ValueError, match="text_width 16 is not a multiple of text_heads 3"):
        clip.Config.tiny(text_heads=3)
    with pytest.raises(ValueError, match="image_size 8 is not a multiple of patch_size 3"):
        clip.Config.tiny(patch_size=3)
    with pytest.raises(ValueError, match="embed_dim must be a positive int"):
        clip.Config.tiny(embed_dim=0)
    with pytest.raises(ValueError, match="vocab_size must be at least 4"):
        clip.Config.tiny(vocab_size=3)
    with pytest.raises(ValueError, match="context_length must be at least 3"):
        clip.Config.tiny(context_length=2)
    with pytest.raises(TypeError, match="config must be"):
        clip.Model(dataclasses.asdict(clip.Config.tiny()))
    bad = clip.Config.tiny()
    bad.loss = "bce"          # changed after construction: the model checks again
    with pytest.raises(ValueError, match="loss must be one of"):
        clip.Model(bad)


def test_bad_batch_raises():
    config = clip.Config.tiny()
    model = clip.Model(config, impl="plain")
    batch = clip.synthetic_batch(config, 3, seed=0)
    with pytest.raises(ValueError, match="same B"):
        model(batch["images"][:2], batch["text"])
    long_text = torch.cat([batch["text"], batch["text"][:, :1]], dim=1)
    with pytest.raises(ValueError, match="more than context_length"):
        model(batch["images"], long_text)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        clip.synthetic_batch(config, 0, seed=0)
