"""mmkernels_loss_for / patch_create_loss: open_clip's ClipLoss and SigLipLoss swapped for mmkernels'.

open_clip's ``loss.py`` is loaded on its own (the package import needs torchvision); the losses
run on one process. The converted loss must carry every setting over and give open_clip's loss
and gradients (against open_clip in float64, within twice its own float32 error).
"""
from __future__ import annotations

import types
import warnings

import pytest
import torch

import mmkernels
from mmkernels.integrations import open_clip as helper
from mmkernels.integrations.open_clip import UnsupportedLossError, mmkernels_loss_for, patch_create_loss
from mmkernels.testing.numerics import assert_close
from mmkernels.testing.peers import open_clip_loss

oc = open_clip_loss()
pytestmark = pytest.mark.skipif(oc is None, reason="open_clip is not installed")

N, D = 12, 16


def features(seed):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1)
    return img, txt


def args(**over):
    """open_clip_train's parsed arguments, as far as ``create_loss`` reads them."""
    base = dict(model="ViT-B-32", distill=False, siglip=False, local_loss=False, gather_with_grad=False,
                rank=0, world_size=1, horovod=False, loss_dist_impl=None, coca_caption_loss_weight=2.0,
                coca_contrastive_loss_weight=1.0)
    return types.SimpleNamespace(**{**base, **over})


def loss_and_grads(loss_fn, dtype, bias, output_dict=False, seed=0):
    """Loss and the gradients of both features, the logit scale and (when given) the bias."""
    img, txt = (x.to(dtype).requires_grad_() for x in features(seed))
    scale = torch.tensor(7.5, dtype=dtype, requires_grad=True)
    leaves = [img, txt, scale]
    b = None
    if bias:
        b = torch.tensor(-4.0, dtype=dtype, requires_grad=True)
        leaves.append(b)
    out = loss_fn(img, txt, scale, b, output_dict=output_dict)
    loss = out["contrastive_loss"] if output_dict else out
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [loss.detach()] + [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


CASES = {
    "clip": (lambda: oc.ClipLoss(), False),
    "clip_bias": (lambda: oc.ClipLoss(cache_labels=True), True),
    "siglip": (lambda: oc.SigLipLoss(), True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_loss_equals_open_clip(case):
    """Loss and every gradient of the converted loss against open_clip's (float64 reference,
    float32 eager open_clip as the error yardstick), called as open_clip_train calls it."""
    make, bias = CASES[case]
    ours = mmkernels_loss_for(make())
    ref = loss_and_grads(make(), torch.float64, bias, output_dict=True)
    eager = loss_and_grads(make(), torch.float32, bias, output_dict=True)
    got = loss_and_grads(ours, torch.float32, bias, output_dict=True)
    for name, a, r, e in zip(("loss", "d image", "d text", "d logit_scale", "d logit_bias"), got, ref, eager):
        assert_close(a, r, torch.float32, eager=e, name=f"{case} {name}")
    assert torch.isfinite(got[0]) and got[0] > 0


def test_clip_settings_carried_over():
    theirs = oc.ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=2, world_size=4)
    ours = mmkernels_loss_for(theirs, ring=True, label_smoothing=0.1)
    assert type(ours) is mmkernels.ContrastiveLoss
    for name in ("local_loss", "gather_with_grad", "cache_labels", "rank", "world_size"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.ring and ours.label_smoothing == 0.1 and ours.use_horovod is False
    default = mmkernels_loss_for(oc.ClipLoss())
    assert (default.local_loss, default.gather_with_grad, default.rank, default.world_size) == (False, False, 0, 1)


@pytest.mark.parametrize("impl", [None, "bidir", "shift", "reduce", "gather"])
def test_siglip_settings_carried_over(impl):
    theirs = oc.SigLipLoss(cache_labels=True, rank=1, world_size=3, dist_impl=impl)
    ours = mmkernels_loss_for(theirs)
    assert type(ours) is mmkernels.SigLipLoss
    assert (ours.cache_labels, ours.rank, ours.world_size) == (True, 1, 3)
    assert ours.dist_impl == theirs.dist_impl == (impl or "bidir")


def test_from_args_follows_create_loss():
    """The args that select ClipLoss / SigLipLoss in open_clip's ``create_loss``."""
    clip = mmkernels_loss_for(args(local_loss=True, gather_with_grad=True, rank=1, world_size=2))
    assert type(clip) is mmkernels.ContrastiveLoss
    assert (clip.local_loss, clip.gather_with_grad, clip.cache_labels, clip.rank, clip.world_size) == (
        True, True, True, 1, 2)
    sig = mmkernels_loss_for(args(siglip=True, rank=3, world_size=4, loss_dist_impl="reduce"))
    assert type(sig) is mmkernels.SigLipLoss
    assert (sig.rank, sig.world_size, sig.dist_impl) == (3, 4, "reduce")


@pytest.mark.parametrize("bad, error, words", [
    (lambda: args(model="coca_ViT-B-32"), UnsupportedLossError, ["CoCaLoss", "coca_ViT-B-32"]),
    (lambda: args(distill=True), UnsupportedLossError, ["DistillClipLoss", "distill"]),
    (lambda: args(horovod=True), UnsupportedLossError, ["horovod", "torch.distributed"]),
    (lambda: oc.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0), UnsupportedLossError, ["CoCaLoss"]),
    (lambda: oc.DistillClipLoss(), UnsupportedLossError, ["DistillClipLoss", "teacher"]),
    (lambda: oc.ClipLoss(use_horovod=True), UnsupportedLossError, ["use_horovod", "torch.distributed"]),
    (lambda: type("MyLoss", (oc.ClipLoss,), {})(), TypeError, ["MyLoss", "ClipLoss or SigLipLoss"]),
    (lambda: torch.nn.MSELoss(), TypeError, ["MSELoss"]),
    (lambda: "ClipLoss", TypeError, ["str"]),
])
def test_unsupported_raise_clear_errors(bad, error, words):
    with pytest.raises(error) as info:
        mmkernels_loss_for(bad())
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_mmkernels_loss_passes_through():
    loss = mmkernels.SigLipLoss()
    assert mmkernels_loss_for(loss) is loss
    with pytest.raises(ValueError, match="already an mmkernels loss"):
        mmkernels_loss_for(loss, group=None)
    with pytest.raises(TypeError, match="unexpected keyword"):
        mmkernels_loss_for(oc.ClipLoss(), rings=True)


def fake_factory():
    """A module with open_clip's ``create_loss(args)`` (the branches of ``open_clip.factory``)."""
    def create_loss(a):
        if a.distill:
            return oc.DistillClipLoss(local_loss=a.local_loss, gather_with_grad=a.gather_with_grad,
                                      cache_labels=True, rank=a.rank, world_size=a.world_size)
        if "coca" in a.model.lower():
            return oc.CoCaLoss(caption_loss_weight=a.coca_caption_loss_weight,
                               clip_loss_weight=a.coca_contrastive_loss_weight, local_loss=a.local_loss,
                               gather_with_grad=a.gather_with_grad, cache_labels=True, rank=a.rank,
                               world_size=a.world_size)
        if a.siglip:
            return oc.SigLipLoss(rank=a.rank, world_size=a.world_size, dist_impl=a.loss_dist_impl)
        return oc.ClipLoss(local_loss=a.local_loss, gather_with_grad=a.gather_with_grad, cache_labels=True,
                           rank=a.rank, world_size=a.world_size)
    module = types.ModuleType("fake_open_clip_factory")
    module.create_loss = create_loss
    return module


def test_patch_create_loss_and_unpatch():
    factory = fake_factory()
    original = factory.create_loss
    unpatch = patch_create_loss(factory)
    try:
        again = patch_create_loss(factory)  # wraps once
        assert getattr(factory.create_loss, helper._PATCHED) is original
        clip = factory.create_loss(args(local_loss=True, rank=1, world_size=2))
        assert type(clip) is mmkernels.ContrastiveLoss and clip.local_loss and clip.cache_labels
        assert (clip.rank, clip.world_size) == (1, 2)
        sig = factory.create_loss(args(siglip=True, loss_dist_impl="gather"))
        assert type(sig) is mmkernels.SigLipLoss and sig.dist_impl == "gather"
        with pytest.raises(UnsupportedLossError, match="CoCaLoss"):
            factory.create_loss(args(model="coca_ViT-L-14"))
        again()
        assert factory.create_loss is not original  # the second patch did nothing, so undoes nothing
    finally:
        unpatch()
    assert factory.create_loss is original
    assert type(factory.create_loss(args())) is oc.ClipLoss


def test_patch_create_loss_lenient_keeps_unsupported_losses():
    factory = fake_factory()
    unpatch = patch_create_loss(factory, strict=False, label_smoothing=0.05)
    try:
        with pytest.warns(UserWarning, match="DistillClipLoss"):
            kept = factory.create_loss(args(distill=True))
        assert type(kept) is oc.DistillClipLoss
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            clip = factory.create_loss(args())
        assert type(clip) is mmkernels.ContrastiveLoss and clip.label_smoothing == 0.05
    finally:
        unpatch()


def test_patch_create_loss_default_modules():
    """Without modules it patches open_clip's own create_loss, or says open_clip cannot be imported
    (its package import needs torchvision)."""
    try:
        import open_clip  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="patch_create_loss needs open_clip"):
            patch_create_loss()
        return
    original = open_clip.create_loss
    unpatch = patch_create_loss()
    try:
        assert getattr(open_clip.create_loss, helper._PATCHED) is original
    finally:
        unpatch()
    assert open_clip.create_loss is original


def test_patch_create_loss_rejects_modules_without_it():
    with pytest.raises(TypeError, match="no create_loss"):
        patch_create_loss(types.ModuleType("empty"))
