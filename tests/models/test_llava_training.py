"""The LLaVA reference model (mmkernels.models.llava) on packed rows: its mmkernels form trains like
its plain form (float64, float32 on the C++ kernels, float32 on the Triton kernels through the
interpreter), runs the packed attention while the plain form runs no op, no prediction crosses a
sample boundary, and both forms share their parameters, build on the meta device and reject bad
input."""
import dataclasses

import pytest
import torch

import mmkernels
from mmkernels.models import common, llava
from mmkernels.testing.training import assert_parity, train_side_by_side

CONFIG = llava.Config.tiny()
BATCH = 2



def batch64(seed: int = 0, batch: int = BATCH) -> dict:
    return llava.synthetic_batch(CONFIG, batch, seed=seed, dtype=torch.float64)


# ----------------------------------------------------------------------------- parity in training

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_parity_in_training(dtype):
    run = train_side_by_side("llava", CONFIG, batch_size=BATCH, dtype=dtype)
    assert_parity(run)


@pytest.mark.slow
def test_parity_in_training_triton():
    run = train_side_by_side("llava", CONFIG, batch_size=BATCH, dtype=torch.float32, backend="triton")
    assert_parity(run)


# ----------------------------------------------------------------------------- the ops that run

@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_mmkernels_form_runs_packed_attention(backend):
    model = common.build("llava", CONFIG, "mmkernels", dtype=torch.float32)
    batch = llava.synthetic_batch(CONFIG, BATCH, seed=0)
    with mmkernels.backend(backend), mmkernels.explain() as log:
        model(**batch).backward()
    assert [d.op for d in log] == ["multimodal_attention"] * CONFIG.layers, str(log)
    assert "reference" not in log.paths(), str(log)
    assert all(d.case[2].startswith("packed:") for d in log), str(log)
    if backend == "triton":
        assert {d.backend for d in log} == {"triton"}, str(log)


def test_plain_form_runs_no_op():
    model = common.build("llava", CONFIG, "plain", dtype=torch.float64)
    with mmkernels.explain() as log:
        model(**batch64()).backward()
    assert len(log) == 0, str(log)


# ----------------------------------------------------------------------------- packing

def test_synthetic_rows_are_packed():
    batch = llava.synthetic_batch(CONFIG, 6, seed=1)
    pos, cu = batch["position_ids"], batch["cu_seqlens"].long()
    starts = torch.nonzero(pos.reshape(-1) == 0).reshape(-1)
    assert torch.equal(starts, cu[:-1]) and int(cu[-1]) == pos.numel()
    assert bool(((pos == 0).sum(1) >= 2).all())                   # several samples in every row
    lengths = (cu[1:] - cu[:-1]).tolist()
    assert len(set(lengths)) > 2
    n_images = int((batch["input_ids"] == llava.IMAGE_TOKEN).sum()) // CONFIG.image_tokens
    assert batch["image_features"].shape == (n_images, CONFIG.image_tokens, CONFIG.image_feature_dim)
    assert bool((batch["labels"][pos == 0] == -100).all())
    again = llava.synthetic_batch(CONFIG, 6, seed=1)
    assert all(torch.equal(batch[k], again[k]) for k in batch)


def test_dense_mask_is_the_packed_mask():
    batch = llava.synthetic_batch(CONFIG, 3, seed=2)
    b, s = batch["input_ids"].shape
    packed = mmkernels.MultimodalMask.packed(batch["cu_seqlens"], seq_len=b * s).to_dense()[0, 0]
    dense = llava.dense_mask(batch["position_ids"])
    expected = torch.block_diag(*[d[0] for d in dense])          # rows never see each other
    assert torch.equal(packed, expected)


@pytest.mark.parametrize("impl", common.IMPLS)
def test_no_prediction_crosses_a_sample_boundary(impl):
    """The loss on a row's second sample ignores the first sample: its tokens (attention stays in
    the sample) and a label on the second sample's first token (only the first sample's last
    token could predict it)."""
    model = common.build("llava", CONFIG, impl, dtype=torch.float64)
    batch = batch64(seed=4)
    second = int(torch.nonzero(batch["position_ids"][0, 1:] == 0)[0]) + 1   # row 0's second sample
    end = second + int(torch.nonzero(batch["position_ids"][0, second + 1:] == 0)[0]) + 1
    second_only = torch.full_like(batch["labels"], -100)
    second_only[0, second:end] = batch["labels"][0, second:end]
    loss = model(**(batch | {"labels": second_only}))
    changed = batch["input_ids"].clone()
    first_text = changed[0, :second] >= llava.FIRST_TEXT_TOKEN
    changed[0, :second][first_text] = changed[0, :second][first_text] % 7 + llava.FIRST_TEXT_TOKEN + 1
    assert not torch.equal(changed, batch["input_ids"])
    second_only[0, second] = 5
    loss2 = model(**(batch | {"labels": second_only, "input_ids": changed}))
    torch.testing.assert_close(loss2, loss, rtol=1e-12, atol=1e-12)
    # the same change reaches the loss when the labels include the first sample's text
    loss3 = model(**(batch | {"input_ids": changed}))
    assert abs(loss3.item() - model(**batch).item()) > 1e-6


# ----------------------------------------------------------------------------- parameters

def test_state_dicts_interchange():
    plain = common.build("llava", CONFIG, "plain", seed=1, dtype=torch.float64)
    ours = common.build("llava", CONFIG, "mmkernels", seed=2, dtype=torch.float64)
    sd_plain, sd_ours = plain.state_dict(), ours.state_dict()
    assert list(sd_plain) == list(sd_ours)
    assert all(sd_plain[k].shape == sd_ours[k].shape for k in sd_plain)
    assert not torch.equal(sd_plain["layers.0.self_attn.q_proj.weight"], sd_ours["layers.0.self_attn.q_proj.weight"])
    ours.load_state_dict(sd_plain, strict=True)
    batch = batch64(seed=5)
    torch.testing.assert_close(ours(**batch), plain(**batch), rtol=1e-12, atol=1e-12)
    twin = common.build("llava", CONFIG, "mmkernels", seed=1, dtype=torch.float64)
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in sd_plain.items())


@pytest.mark.parametrize("impl", common.IMPLS)
def test_meta_build_runs_on_given_tensors(impl):
    """As the bench runs a form: built on the meta device, called with real parameters."""
    with torch.device("meta"):
        meta = llava.Model(CONFIG, impl=impl)
    assert all(t.device.type == "meta" for t in meta.state_dict().values())
    real = common.build("llava", CONFIG, "plain", seed=0, dtype=torch.float64)
    state = dict(real.named_parameters()) | dict(real.named_buffers())
    batch = batch64()
    loss = torch.func.functional_call(meta, state, args=(), kwargs=batch, strict=True)
    torch.testing.assert_close(loss, real(**batch), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- bad input

def test_bad_impl():
    with pytest.raises(ValueError, match="impl must be one of"):
        llava.Model(CONFIG, impl="eager")
    with pytest.raises(TypeError, match="llava.Config"):
        llava.Model(dataclasses.asdict(CONFIG))


@pytest.mark.parametrize("fields, error, match", [
    (dict(width=33), ValueError, "not a multiple of heads"),
    (dict(heads=2, kv_heads=4), ValueError, "not a multiple of kv_heads"),
    (dict(width=6, heads=2, kv_heads=1), ValueError, "must be even"),
    (dict(mlp_hidden=0), ValueError, "mlp_hidden must be at least 1"),
    (dict(image_tokens="3"), TypeError, "image_tokens must be an int"),
    (dict(min_text=1), ValueError, "min_text must be at least 2"),
    (dict(min_text=6, max_text=5), ValueError, "max_text"),
    (dict(seq_len=4), ValueError, "cannot hold one sample"),
    (dict(rope_base=-1.0), ValueError, "rope_base must be positive"),
])
def test_bad_config(fields, error, match):
    with pytest.raises(error, match=match):
        dataclasses.replace(CONFIG, **fields)


def test_bad_batch():
    model = common.build("llava", CONFIG, "mmkernels", dtype=torch.float64)
    batch = batch64()
    with pytest.raises(ValueError, match="image tokens but image_features holds"):
        model(**(batch | {"image_features": batch["image_features"][1:]}))
    with pytest.raises(ValueError, match="image_features must have shape"):
        model(**(batch | {"image_features": batch["image_features"][:, :, 1:]}))
    with pytest.raises(ValueError, match="cu_seqlens must end at"):
        model(**(batch | {"cu_seqlens": batch["cu_seqlens"][:-1]}))
    with pytest.raises(TypeError, match="cu_seqlens must be int32 or int64"):
        model(**(batch | {"cu_seqlens": batch["cu_seqlens"].float()}))
    with pytest.raises(ValueError, match="position_ids must have shape"):
        model(**(batch | {"position_ids": batch["position_ids"][:1]}))
    with pytest.raises(ValueError, match="batch_size"):
        llava.synthetic_batch(CONFIG, -1, seed=0)
