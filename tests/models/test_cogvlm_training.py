"""The CogVLM reference model (mmkernels.models.cogvlm): its mmkernels form trains like its plain
form (float64, float32 on the C++ kernels, float32 on the Triton kernels through the
interpreter), runs the ops it claims while the plain form runs none, and both forms share their
parameters, build on the meta device and reject bad input."""
import dataclasses

import pytest
import torch

import mmkernels
from mmkernels.models import cogvlm, common
from mmkernels.testing.training import assert_parity, train_side_by_side

CONFIG = cogvlm.Config.tiny()
BATCH = 2



def batch64(seed: int = 0, batch: int = BATCH) -> dict:
    return cogvlm.synthetic_batch(CONFIG, batch, seed=seed, dtype=torch.float64)


# ----------------------------------------------------------------------------- parity in training

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_parity_in_training(dtype):
    run = train_side_by_side("cogvlm", CONFIG, batch_size=BATCH, dtype=dtype)
    assert_parity(run)


@pytest.mark.slow
def test_parity_in_training_triton():
    run = train_side_by_side("cogvlm", CONFIG, batch_size=BATCH, dtype=torch.float32, backend="triton")
    assert_parity(run)


# ----------------------------------------------------------------------------- the ops that run

LAYER_OPS = ["modality_linear", "multimodal_attention", "modality_linear", "modality_ffn"]


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_mmkernels_form_runs_the_ops(backend):
    model = common.build("cogvlm", CONFIG, "mmkernels", dtype=torch.float32)
    batch = cogvlm.synthetic_batch(CONFIG, BATCH, seed=0)
    with mmkernels.backend(backend), mmkernels.explain() as log:
        model(**batch).backward()
    assert [d.op for d in log] == LAYER_OPS * CONFIG.layers, str(log)
    assert "reference" not in log.paths(), str(log)
    attn = [d for d in log if d.op == "multimodal_attention"]
    assert all(d.case[2].startswith("multimodal:") for d in attn), str(log)   # the image-spans mask
    if backend == "triton":
        assert {d.backend for d in log} == {"triton"}, str(log)


def test_plain_form_runs_no_op():
    model = common.build("cogvlm", CONFIG, "plain", dtype=torch.float64)
    with mmkernels.explain() as log:
        model(**batch64()).backward()
    assert len(log) == 0, str(log)


# ----------------------------------------------------------------------------- pieces of the forms

def test_dense_mask_is_the_image_spans_mask():
    ids = torch.tensor([[0, 1, 1, 1, 0, 0, 1, 1, 0],      # two images: each bidirectional in itself
                        [0, 1, 0, 0, 0, 0, 0, 0, 0],
                        [0, 0, 0, 0, 0, 0, 0, 0, 0]])
    dense = cogvlm.dense_mask(ids == cogvlm.VISION)
    assert torch.equal(dense, mmkernels.MultimodalMask.image_spans_in_causal(ids).to_dense())
    assert bool(dense[0, 0, 1, 3]) and not bool(dense[0, 0, 3, 6]) and bool(dense[0, 0, 6, 7])
    assert not bool(dense[0, 0, 3, 4])            # an image token does not see the text after it


def test_position_ids_share_inner_image_positions():
    ids = torch.tensor([[0, 1, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]])
    pos = cogvlm.position_ids(ids == cogvlm.VISION)
    assert pos.tolist() == [[0, 1, 2, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6]]


def test_synthetic_batch_varies_the_routing():
    batch = cogvlm.synthetic_batch(CONFIG, 8, seed=3)
    vision = batch["token_type_ids"] == cogvlm.VISION
    counts = vision.sum(1)
    assert len(set(counts.tolist())) > 1                          # not a fixed split
    assert int(counts.min()) >= CONFIG.min_image_tokens and int(counts.max()) <= CONFIG.max_image_tokens
    assert batch["image_features"].shape == (int(counts.sum()), CONFIG.image_feature_dim)
    assert bool((batch["input_ids"][:, 0] == cogvlm.BOS).all())
    assert bool((batch["labels"][vision] == -100).all()) and bool((batch["labels"][:, 0] == -100).all())
    text = ~vision & (torch.arange(CONFIG.seq_len) > 0)
    assert torch.equal(batch["labels"][text], batch["input_ids"][text])
    again = cogvlm.synthetic_batch(CONFIG, 8, seed=3)
    assert all(torch.equal(batch[k], again[k]) for k in batch)


# ----------------------------------------------------------------------------- parameters

def test_state_dicts_interchange():
    plain = common.build("cogvlm", CONFIG, "plain", seed=1, dtype=torch.float64)
    ours = common.build("cogvlm", CONFIG, "mmkernels", seed=2, dtype=torch.float64)
    sd_plain, sd_ours = plain.state_dict(), ours.state_dict()
    assert list(sd_plain) == list(sd_ours)
    assert all(sd_plain[k].shape == sd_ours[k].shape for k in sd_plain)
    assert not torch.equal(sd_plain["layers.0.mlp.w_in"], sd_ours["layers.0.mlp.w_in"])
    ours.load_state_dict(sd_plain, strict=True)
    batch = batch64(seed=5)
    torch.testing.assert_close(ours(**batch), plain(**batch), rtol=1e-12, atol=1e-12)
    # the same seed gives both forms the same initial parameters
    twin = common.build("cogvlm", CONFIG, "mmkernels", seed=1, dtype=torch.float64)
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in sd_plain.items())


@pytest.mark.parametrize("impl", common.IMPLS)
def test_meta_build_runs_on_given_tensors(impl):
    """As the bench runs a form: built on the meta device, called with real parameters."""
    with torch.device("meta"):
        meta = cogvlm.Model(CONFIG, impl=impl)
    assert all(t.device.type == "meta" for t in meta.state_dict().values())
    real = common.build("cogvlm", CONFIG, "plain", seed=0, dtype=torch.float64)
    state = dict(real.named_parameters()) | dict(real.named_buffers())
    batch = batch64()
    loss = torch.func.functional_call(meta, state, args=(), kwargs=batch, strict=True)
    torch.testing.assert_close(loss, real(**batch), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- bad input

def test_bad_impl():
    with pytest.raises(ValueError, match="impl must be one of"):
        cogvlm.Model(CONFIG, impl="fast")
    with pytest.raises(TypeError, match="cogvlm.Config"):
        cogvlm.Model(dataclasses.asdict(CONFIG))


@pytest.mark.parametrize("fields, error, match", [
    (dict(width=33), ValueError, "not a multiple of heads"),
    (dict(heads=4, kv_heads=3), ValueError, "not a multiple of kv_heads"),
    (dict(width=24, heads=8, kv_heads=8), ValueError, "must be even"),
    (dict(layers=0), ValueError, "layers must be at least 1"),
    (dict(layers=1.5), TypeError, "layers must be an int"),
    (dict(min_image_tokens=9, max_image_tokens=8), ValueError, "max_image_tokens"),
    (dict(seq_len=8, max_image_tokens=7), ValueError, "seq_len"),
    (dict(vocab_size=5), ValueError, "vocab_size"),
    (dict(eps=0.0), ValueError, "eps must be positive"),
])
def test_bad_config(fields, error, match):
    with pytest.raises(error, match=match):
        dataclasses.replace(CONFIG, **fields)


def test_bad_batch():
    model = common.build("cogvlm", CONFIG, "mmkernels", dtype=torch.float64)
    batch = batch64()
    with pytest.raises(ValueError, match="0 \\(language\\) or 1 \\(vision\\)"):
        model(**(batch | {"token_type_ids": batch["token_type_ids"] * 2}))
    with pytest.raises(ValueError, match="vision tokens but image_features has"):
        model(**(batch | {"image_features": batch["image_features"][1:]}))
    with pytest.raises(ValueError, match="features"):
        model(**(batch | {"image_features": batch["image_features"][:, 1:]}))
    with pytest.raises(TypeError, match="input_ids must be int32 or int64"):
        model(**(batch | {"input_ids": batch["input_ids"].double()}))
    with pytest.raises(ValueError, match="labels must have shape"):
        model(**(batch | {"labels": batch["labels"][:, 1:]}))
    with pytest.raises(ValueError, match="batch_size"):
        cogvlm.synthetic_batch(CONFIG, 0, seed=0)
