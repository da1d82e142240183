"""Every contrastive backend against the float64 reference: forward, every gradient, stats."""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.contrastive import reference
from mmkernels.testing.numerics import assert_close

from tests.contrastive.cases import BACKENDS, features, have_backend, leaf, run_loss

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, D): every N in {1, 7, 97, 129} and every D in {1, 33, 88, 256} appears
SHAPES = [(1, 33), (7, 1), (7, 88), (97, 33), (129, 256), (97, 88), (129, 1)]


def _require(backend):
    if not have_backend(backend):
        pytest.fail(f"backend {backend} is not available in this test environment")


def _compare_symmetric(backend, n, d, dtype, *, scale=14.3, label_smoothing=0.0, reduction="mean",
                       normalize=True, magnitude=1.0, transform=lambda x: x, tol_scale=1.0, eager_rule=True):
    img = features(n, d, dtype, seed=1, normalize=normalize, magnitude=magnitude)
    txt = features(n, d, dtype, seed=2, normalize=normalize, magnitude=magnitude)
    s = torch.tensor(scale, dtype=torch.float32)
    weight = n if reduction == "mean" else 1.0
    kw = dict(label_smoothing=label_smoothing, reduction=reduction)
    out, (gi, gt), gs = run_loss(lambda a, b, c, **k: mmkernels.contrastive_loss(transform(a), transform(b), c, **k),
                                 backend, [img, txt], s, weight, **kw)
    ref, (ri, rt), rs = run_loss(reference.contrastive_loss_reference,
                                 "reference", [img.double(), txt.double()], s.double(), weight, **kw)
    eager, (ei, et), es = run_loss(reference.contrastive_loss_reference,
                                   "reference", [img, txt], s.to(dtype), weight, **kw)
    assert out.dtype == dtype and gi.dtype == dtype and gt.dtype == dtype
    assert out.shape == ref.shape
    kw = dict(scale=tol_scale)
    assert_close(out, ref, eager=eager if eager_rule else None, name="loss", **kw)
    assert_close(gi, ri, eager=ei if eager_rule else None, name="d image_features", **kw)
    assert_close(gt, rt, eager=et if eager_rule else None, name="d text_features", **kw)
    assert gs.dtype == torch.float32
    assert_close(gs, rs, dtype, scale=4.0 * tol_scale, name="d logit_scale")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", SHAPES)
def test_symmetric_matches_reference(backend, dtype, n, d):
    _require(backend)
    _compare_symmetric(backend, n, d, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_reductions_and_label_smoothing(backend, reduction, label_smoothing):
    _require(backend)
    _compare_symmetric(backend, 97, 33, torch.float32, reduction=reduction, label_smoothing=label_smoothing)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_scale_unnormalised_is_overflow_safe(backend, dtype):
    """logit_scale 100 on features of norm ~6: logits in the thousands, exp would overflow naively.

    In float32 a log-sum-exp near 3e3 resolves only 2.4e-4, so exp(L - lse) in the backward
    carries ~1e-4 relative error that eager's log_softmax (which keeps L - lse relative) does
    not, and G = P - 1 at a dominant positive amplifies it to ~1e-3 relative on a few
    gradient elements: fp32 gets rtol 1e-3 here and no eager rule. (Passing max and
    log-sum separately to the backward would remove this; CLIP's own logits stay below 100.) In bf16/fp16 the input
    rounding dominates and the kernels beat eager by far, so the full rule applies.
    """
    _require(backend)
    fp32 = dtype == torch.float32
    _compare_symmetric(backend, 97, 33, dtype, scale=100.0, normalize=False, magnitude=1.0,
                       tol_scale=100.0 if fp32 else 1.0, eager_rule=not fp32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    _require(backend)
    # a transposed copy viewed back (column-major) and a strided slice of a wider buffer
    _compare_symmetric(backend, 97, 33, torch.float32, transform=lambda x: x.T.contiguous().T)
    _compare_symmetric(backend, 97, 33, torch.float32,
                       transform=lambda x: torch.cat([x, x], dim=1)[:, ::2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_logit_scale_and_no_grad_scale(backend):
    _require(backend)
    img, txt = features(33, 16, seed=3), features(33, 16, seed=4)
    with mmkernels.backend(backend):
        a = mmkernels.contrastive_loss(img, txt, 20.0)
        b = mmkernels.contrastive_loss(img, txt, torch.tensor(20.0))
    ref = reference.contrastive_loss_reference(img.double(), txt.double(), 20.0)
    assert_close(a, ref)
    assert_close(b, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_match_reference_accuracy(backend):
    _require(backend)
    n, d = 129, 8  # small D: many near-ties, so accuracy is neither 0 nor 1
    img = features(n, d, seed=5)
    txt = (img.double() + 0.8 * features(n, d, seed=6).double()).float()
    with mmkernels.backend(backend):
        loss, stats = mmkernels.contrastive_loss(img, txt, 10.0, return_stats=True)
    _, (i2t, t2i) = reference.contrastive_loss_reference(img, txt, 10.0, return_stats=True)
    assert 0.0 < float(i2t) < 1.0
    assert stats.i2t_accuracy.item() == pytest.approx(i2t.item(), abs=1.5 / n)
    assert stats.t2i_accuracy.item() == pytest.approx(t2i.item(), abs=1.5 / n)
    # exact ties: identical features give identical logits in a row; the positive ties the max
    same = features(1, d, seed=7).expand(5, d).contiguous()
    with mmkernels.backend(backend):
        _, tie = mmkernels.contrastive_loss(same, same, 3.0, return_stats=True)
    assert tie.i2t_accuracy.item() == 1.0 and tie.t2i_accuracy.item() == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_features_give_nan_loss(backend):
    _require(backend)
    img, txt = features(7, 16, seed=8), features(7, 16, seed=9)
    img[3, 5] = float("nan")
    with mmkernels.backend(backend):
        assert torch.isnan(mmkernels.contrastive_loss(img, txt, 10.0))
        assert torch.isnan(mmkernels.infonce_loss(img, txt, 10.0))


def _compare_infonce(backend, q, k, targets, dtype=torch.float32, label_smoothing=0.0, reduction="mean"):
    s = torch.tensor(12.0)
    kw = dict(targets=targets, label_smoothing=label_smoothing, reduction=reduction)
    weight = q.shape[0] if reduction == "mean" else 1.0
    out, (gq, gk), gs = run_loss(mmkernels.infonce_loss, backend, [q.to(dtype), k.to(dtype)], s, weight, **kw)
    ref, (rq, rk), rs = run_loss(reference.infonce_loss_reference, "reference",
                                 [q.double(), k.double()], s.double(), weight, **kw)
    assert_close(out, ref, dtype, name="loss")
    assert_close(gq, rq, dtype, name="d queries")
    assert_close(gk, rk, dtype, name="d keys")
    assert_close(gs, rs, dtype, scale=4.0, name="d logit_scale")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_infonce_with_queue(backend, dtype):
    """ALBEF/BLIP/MoCo style: keys are [in-batch texts; queue], default targets arange(N)."""
    _require(backend)
    q = features(37, 40, seed=10)
    keys = torch.cat([features(37, 40, seed=11), features(160, 40, seed=12)])
    _compare_infonce(backend, q, keys, None, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_smoothing,reduction", [(0.0, "mean"), (0.1, "none"), (0.2, "sum")])
def test_infonce_with_offset_targets(backend, label_smoothing, reduction):
    """OpenCLIP local loss: keys gathered from 3 ranks, targets offset by this rank (1)."""
    _require(backend)
    n = 29
    q = features(n, 24, seed=13)
    keys = features(3 * n, 24, seed=14)
    targets = torch.arange(n) + n
    _compare_infonce(backend, q, keys, targets, label_smoothing=label_smoothing, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_infonce_random_targets_fewer_keys_than_queries(backend):
    _require(backend)
    g = torch.Generator().manual_seed(15)
    q, k = features(97, 33, seed=16), features(7, 33, seed=17)
    _compare_infonce(backend, q, k, torch.randint(0, 7, (97,), generator=g))


def test_module_matches_function():
    img, txt = features(33, 16, seed=18), features(33, 16, seed=19)
    mod = mmkernels.ContrastiveLoss(label_smoothing=0.1)
    assert_close(mod(img, txt, torch.tensor(9.0)),
                 reference.contrastive_loss_reference(img.double(), txt.double(), 9.0, label_smoothing=0.1))
    assert "label_smoothing=0.1" in repr(mod)
    out = mmkernels.ContrastiveLoss(False, False, True, 0, 1)(img, txt, 9.0, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    assert_close(out["contrastive_loss"], reference.contrastive_loss_reference(img.double(), txt.double(), 9.0))
    # several processes need torch.distributed: a clear error when it is not initialised
    with pytest.raises(RuntimeError, match="init_process_group"):
        mmkernels.ContrastiveLoss(world_size=2, rank=1)(img, txt, 9.0)
    with pytest.raises(ValueError, match="rank"):
        mmkernels.ContrastiveLoss(world_size=2, rank=2)


# ---------------------------------------------------------------------------
# logit_bias: ContrastiveLoss.forward has open_clip ClipLoss.forward's signature
# ---------------------------------------------------------------------------

ALL_BACKENDS = ["reference", *BACKENDS]


def _bias_case(shape=()):
    img, txt = features(29, 24, seed=31), features(29, 24, seed=32)
    return img, txt, torch.tensor(12.0), torch.full(shape, -3.5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_module_takes_logit_bias_positionally_and_by_keyword(backend):
    if backend != "reference":
        _require(backend)
    img, txt, scale, bias = _bias_case()
    mod = mmkernels.ContrastiveLoss()
    ref = reference.contrastive_loss_reference(img.double(), txt.double(), 12.0, -3.5)
    with mmkernels.backend(backend):
        positional = mod(img, txt, scale, bias)
        keyword = mod(img, txt, scale, logit_bias=bias)
        as_dict = mod(img, txt, scale, bias, True)
        no_bias = mod(img, txt, scale)
    assert isinstance(positional, torch.Tensor) and positional.dim() == 0
    assert_close(positional, ref, name="positional")
    assert_close(keyword, ref, name="keyword")
    assert set(as_dict) == {"contrastive_loss"}
    assert_close(as_dict["contrastive_loss"], ref, name="output_dict")
    # the bias cancels in each softmax
    assert_close(no_bias, ref, name="no bias")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-dim", "[1]"])
def test_module_called_with_model_output_dict(backend, shape):
    """open_clip's training step: ``loss(**model_out, output_dict=True)``."""
    if backend != "reference":
        _require(backend)
    img, txt, scale, bias = _bias_case(shape)
    model_out = {"image_features": img, "text_features": txt, "logit_scale": scale, "logit_bias": bias}
    with mmkernels.backend(backend):
        out = mmkernels.ContrastiveLoss()(**model_out, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    assert_close(out["contrastive_loss"],
                 reference.contrastive_loss_reference(img.double(), txt.double(), 12.0, -3.5))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-dim", "[1]"])
def test_logit_bias_gradients_match_reference(backend, dtype, shape):
    """Every gradient, the bias's included, against autograd of the float64 reference."""
    if backend != "reference":
        _require(backend)
    elif dtype != torch.float32:
        pytest.skip("the reference backend in bf16 is eager PyTorch: its rounded logits give the "
                    "bias a gradient of the size of bf16's rounding, not 0")
    n = 33
    img, txt = features(n, 16, dtype, seed=33), features(n, 16, dtype, seed=34)
    scale, bias = torch.tensor(9.0), torch.full(shape, 2.25)
    kw = dict(label_smoothing=0.1)

    def run(backend, tensors, s, b):
        xs = [leaf(t) for t in (*tensors, s, b)]
        with mmkernels.backend(backend):
            loss = mmkernels.ContrastiveLoss(**kw)(*xs)
        (loss * n).backward()
        return loss, [x.grad for x in xs]

    out, (gi, gt, gs, gb) = run(backend, (img, txt), scale, bias)
    ref, (ri, rt, rs, rb) = run("reference", (img.double(), txt.double()), scale.double(), bias.double())
    assert gb is not None and gb.shape == bias.shape and gb.dtype == bias.dtype
    tol = dict(dtype=torch.float32) if dtype == torch.float32 else dict(dtype=dtype, scale=2.0)
    assert_close(out, ref, name="loss", **tol)
    assert_close(gi, ri, name="d image_features", **tol)
    assert_close(gt, rt, name="d text_features", **tol)
    assert_close(gs, rs, name="d logit_scale", **tol)
    assert_close(gb, rb, torch.float32, name="d logit_bias")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_finite_logit_bias_gives_nan(backend):
    if backend != "reference":
        _require(backend)
    img, txt, scale, _ = _bias_case()
    with mmkernels.backend(backend):
        for b in (float("inf"), float("nan")):
            assert torch.isnan(mmkernels.contrastive_loss(img, txt, scale, torch.tensor(b)))


def test_logit_bias_must_be_one_element():
    img, txt, scale, _ = _bias_case()
    with pytest.raises(ValueError, match="logit_bias"):
        mmkernels.ContrastiveLoss()(img, txt, scale, torch.zeros(2))
    with pytest.raises(ValueError, match="logit_bias"):
        mmkernels.ContrastiveLoss()(img, txt, scale, torch.zeros(1, 1))
    with pytest.raises(TypeError, match="logit_bias"):
        mmkernels.ContrastiveLoss()(img, txt, scale, "0.5")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_equals_open_clip_clip_loss(backend):
    """Loss and every gradient equal open_clip's ``ClipLoss`` (skipped where it is not installed)."""
    open_clip_loss = pytest.importorskip("open_clip.loss")
    if backend != "reference":
        _require(backend)
    img, txt, scale, bias = _bias_case()
    theirs_in = [leaf(t) for t in (img, txt, scale, bias)]
    ours_in = [leaf(t) for t in (img, txt, scale, bias)]
    theirs = open_clip_loss.ClipLoss()(*theirs_in, output_dict=True)
    with mmkernels.backend(backend):
        ours = mmkernels.ContrastiveLoss()(*ours_in, output_dict=True)
    assert set(ours) == set(theirs)
    theirs["contrastive_loss"].backward()
    ours["contrastive_loss"].backward()
    assert_close(ours["contrastive_loss"], theirs["contrastive_loss"].double(), name="loss")
    for name, a, b in zip(("image", "text", "scale", "bias"), ours_in, theirs_in):
        assert_close(a.grad, b.grad.double(), torch.float32, name=f"d {name}")
