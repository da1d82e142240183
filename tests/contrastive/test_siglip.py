"""The SigLIP sigmoid loss through its public API on every CPU path (the C++ kernels, the Triton
kernels under the interpreter, ``blockwise``, ``materialized``), against the float64 reference:
loss and the gradients of both features, ``logit_scale`` and ``logit_bias``; gradcheck, opcheck,
``torch.compile(fullgraph=True)``, bad inputs, the memory bound, and the drop-in against
OpenCLIP's ``SigLipLoss``."""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.contrastive.siglip import ops
from mmkernels.contrastive.siglip.reference import siglip_loss_reference, siglip_rows_reference
from mmkernels.testing.numerics import assert_close
from mmkernels.testing.peers import open_clip_loss

from ..helpers.rss import peak_extra
from .cases import features, have_backend, leaf

PATHS = ["cpu", "triton", "blockwise", "materialized"]


def _run(path, img, txt, scale, bias, **kw):
    """Loss and the gradients (img, txt, scale, bias) on ``path``."""
    a, b = leaf(img), leaf(txt)
    s = torch.tensor(scale, dtype=torch.float32, requires_grad=True)
    c = torch.tensor(bias, dtype=torch.float32, requires_grad=True)
    if path in ("cpu", "triton"):
        if not have_backend(path):
            pytest.skip(f"backend {path} unavailable")
        ctx = mmkernels.backend(path)
    else:
        ctx = mmkernels.use_path(path)
    with ctx:
        loss = mmkernels.siglip_loss(a, b, s, c, **kw)
    weight = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape) if loss.dim() else 1.0
    (loss.float() * weight).sum().backward()
    return loss, (a.grad, b.grad, s.grad, c.grad), weight


def _expected(img, txt, scale, bias, weight, **kw):
    a, b = leaf(img.double()), leaf(txt.double())
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    loss = siglip_loss_reference(a, b, s, c, **kw)
    w = weight.double() if torch.is_tensor(weight) else weight
    (loss * w).sum().backward()
    return loss, (a.grad, b.grad, s.grad, c.grad)


def _check(path, img, txt, scale, bias, dtype, **kw):
    loss, grads, weight = _run(path, img, txt, scale, bias, **kw)
    ref, ref_grads = _expected(img, txt, scale, bias, weight, **kw)
    n = max(1, img.shape[0] * txt.shape[0])
    assert loss.dtype == dtype
    assert_close(loss, ref, dtype, scale=n ** 0.5, name=f"{path} loss")
    for name, g, r in zip(("img", "txt", "scale", "bias"), grads, ref_grads):
        assert_close(g, r, dtype, scale=n ** 0.5, name=f"{path} d{name}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n,m,d", [(1, 1, 8), (7, 7, 1), (33, 65, 88), (97, 97, 16)])
def test_matches_reference_fp32(path, n, m, d):
    img, txt = features(n, d, seed=1), features(m, d, seed=2)
    _check(path, img, txt, 10.0, -5.0, torch.float32)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_16bit(path, dtype):
    img, txt = features(29, 24, dtype, seed=3), features(29, 24, dtype, seed=4)
    _check(path, img, txt, 10.0, -5.0, dtype)


@pytest.mark.parametrize("path", PATHS)
def test_targets_reductions_and_views(path):
    """Rows without a positive (-1), positives anywhere, ``"sum"`` and ``"none"``, non-contiguous
    features (a transposed and a strided view), a large scale and a negative bias."""
    base = features(40, 21, seed=5)
    img = base.t().contiguous().t()[:19]          # column-major rows
    txt = features(60, 21, seed=6)[::2]           # every other row
    targets = torch.tensor([3, -1, 29, 0, -1] * 3 + [7, 7, -1, 12])
    for reduction in ("sum", "none"):
        _check(path, img, txt, 60.0, -12.0, torch.float32, targets=targets, reduction=reduction)


def test_logit_bias_none_and_float_scale():
    img, txt = features(9, 8, seed=7), features(9, 8, seed=8)
    with mmkernels.use_path("blockwise"):
        got = mmkernels.siglip_loss(img, txt, 4.0)
    assert_close(got, siglip_loss_reference(img.double(), txt.double(), 4.0, None))


def test_gradcheck_float64():
    img = leaf(features(5, 3, torch.float64, seed=9, normalize=False))
    txt = leaf(features(6, 3, torch.float64, seed=10, normalize=False))
    s = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([5, -1, 0, 2, 2])
    for path in ("cpu", "blockwise"):
        ctx = mmkernels.backend("cpu") if path == "cpu" else mmkernels.use_path(path)
        with ctx:
            assert torch.autograd.gradcheck(
                lambda x, y, sc, bi: mmkernels.siglip_loss(x, y, sc, bi, targets=t, reduction="none"),
                (img, txt, s, b))


def test_gradcheck_float64_fused_scalar_loss():
    """A mean or sum loss takes its gradients from the forward (``siglip_fused``): gradcheck
    through it, including a second use of the loss (the saved gradients scale)."""
    img = leaf(features(5, 3, torch.float64, seed=21, normalize=False))
    txt = leaf(features(7, 3, torch.float64, seed=22, normalize=False))
    s = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-0.7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([6, -1, 0, 2, 3])
    for path in ("cpu", "blockwise", "triton"):
        if path in ("cpu", "triton") and not have_backend(path):
            continue
        if path == "triton":  # float64 is not a Triton dtype: float32 against the reference
            x, y = img.detach().float().requires_grad_(), txt.detach().float().requires_grad_()
            with mmkernels.backend("triton"):
                loss = mmkernels.siglip_loss(x, y, 1.3, -0.7, targets=t, reduction="sum") * 3.0
            loss.backward()
            ref_x, ref_y = leaf(img.detach()), leaf(txt.detach())
            (siglip_loss_reference(ref_x, ref_y, 1.3, -0.7, targets=t, reduction="sum") * 3.0).backward()
            assert_close(x.grad, ref_x.grad, torch.float32)
            assert_close(y.grad, ref_y.grad, torch.float32)
            continue
        ctx = mmkernels.backend("cpu") if path == "cpu" else mmkernels.use_path(path)
        with ctx:
            for reduction in ("mean", "sum"):
                assert torch.autograd.gradcheck(
                    lambda x, y, sc, bi: 2.0 * mmkernels.siglip_loss(x, y, sc, bi, targets=t,
                                                                     reduction=reduction) ** 2,
                    (img, txt, s, b))


@pytest.mark.parametrize("backend", ["cpu", "blockwise"])
def test_opcheck(backend):
    q, k = features(6, 5, seed=11), features(9, 5, seed=12)
    args = (q.requires_grad_(), k.requires_grad_(), torch.tensor(3.0, requires_grad=True),
            torch.tensor(-1.0, requires_grad=True), torch.tensor([1, -1, 4, 0, 8, 2]), backend)
    torch.library.opcheck(ops.siglip_rows, args)
    torch.library.opcheck(ops.siglip_fused, args)
    g = torch.linspace(0.1, 1.0, 6)
    torch.library.opcheck(ops.siglip_grads, (*[a.detach() if torch.is_tensor(a) else a for a in args[:5]],
                                             g, backend))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    assert have_backend("cpu")  # loads the C++ kernels before tracing
    img, txt = features(33, 16, seed=13), features(33, 16, seed=14)

    def step(a, b, s, c):
        return mmkernels.siglip_loss(a, b, s.exp(), c)

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    with mmkernels.backend("cpu"):
        ins1 = [leaf(img), leaf(txt), torch.tensor(2.3, requires_grad=True), torch.tensor(-3.0, requires_grad=True)]
        out = compiled(*ins1)
        out.backward()
        ins2 = [leaf(img), leaf(txt), torch.tensor(2.3, requires_grad=True), torch.tensor(-3.0, requires_grad=True)]
        ref = step(*ins2)
        ref.backward()
    assert_close(out, ref.double())
    for a, b in zip(ins1, ins2):
        assert_close(a.grad, b.grad.double())


@pytest.mark.parametrize("call,error,match", [
    (lambda x, y: mmkernels.siglip_loss(x[0], y, 1.0), ValueError, "2 dimensions"),
    (lambda x, y: mmkernels.siglip_loss(x, y[:, :3], 1.0), ValueError, "feature size"),
    (lambda x, y: mmkernels.siglip_loss(x, y.double(), 1.0), TypeError, "dtype"),
    (lambda x, y: mmkernels.siglip_loss(x, y[:3], 1.0), ValueError, "targets"),
    (lambda x, y: mmkernels.siglip_loss(x, y, 1.0, targets=torch.full((8,), 8)), ValueError, r"\[-1, 8\)"),
    (lambda x, y: mmkernels.siglip_loss(x, y, 1.0, targets=torch.zeros(8, dtype=torch.int32)), TypeError, "int64"),
    (lambda x, y: mmkernels.siglip_loss(x, y, torch.ones(2)), ValueError, "logit_scale"),
    (lambda x, y: mmkernels.siglip_loss(x, y, 1.0, reduction="avg"), ValueError, "reduction"),
    (lambda x, y: mmkernels.SigLipLoss(dist_impl="ring"), ValueError, "dist_impl"),
    (lambda x, y: mmkernels.SigLipLoss(rank=2, world_size=2), ValueError, "rank"),
    (lambda x, y: mmkernels.SigLipLoss(rank=0, world_size=2)(x, y, 1.0, 0.0), RuntimeError, "init_process_group"),
])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call(features(8, 6, seed=15), features(8, 6, seed=16))


_MEMORY_BODY = """
import torch, mmkernels
from mmkernels.contrastive.siglip.reference import siglip_loss_reference

def setup(which, n, d):
    torch.manual_seed(0)
    n, d = int(n), int(d)
    img = torch.nn.functional.normalize(torch.randn(n, d), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(n, d), dim=-1).requires_grad_()
    img.grad, txt.grad = torch.zeros_like(img), torch.zeros_like(txt)  # gradients are not "extra"
    return which, img, txt, torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)

def run(state):
    which, img, txt, scale, bias = state
    if which == "reference":
        loss = siglip_loss_reference(img, txt, scale, bias)
    else:
        with mmkernels.backend(which):
            loss = mmkernels.siglip_loss(img, txt, scale, bias)
    loss.backward()
    return float(loss)
"""


@pytest.mark.slow
def test_cpu_memory_bound_no_n_by_n():
    """N = 8192, D = 512 fp32: the C++ kernels' extra memory is a small multiple of N * D * 4
    bytes (16 MiB), while the reference's grows with N * N * 4 (256 MiB per logits matrix)."""
    n, d = 8192, 512
    ours = peak_extra(_MEMORY_BODY, "cpu", n, d)
    ref = peak_extra(_MEMORY_BODY, "reference", n, d)
    assert ours["result"] == pytest.approx(ref["result"], rel=1e-4)
    assert ours["extra"] <= 8 * n * d * 4, f"cpu used {ours['extra'] / 2**20:.0f} MiB extra"
    assert ref["extra"] >= n * n * 4
    assert ours["extra"] <= 0.1 * ref["extra"]


# ----------------------------------------------------------------------------- the drop-in

def _peer():
    mod = open_clip_loss()
    if mod is None:
        pytest.skip("open_clip is not installed")
    return mod


@pytest.mark.parametrize("path", ["cpu", "blockwise"])
@pytest.mark.parametrize("by_keyword", [False, True])
def test_siglip_loss_module_equals_open_clip(path, by_keyword):
    peer = _peer()
    img, txt = features(23, 12, seed=17), features(23, 12, seed=18)
    ins_theirs = [leaf(img), leaf(txt), torch.tensor(8.0, requires_grad=True), torch.tensor(-6.0, requires_grad=True)]
    ins_ours = [leaf(t) for t in ins_theirs]
    theirs = peer.SigLipLoss(cache_labels=True, rank=0, world_size=1, dist_impl="bidir")
    ours = mmkernels.SigLipLoss(cache_labels=True, rank=0, world_size=1, dist_impl="bidir")
    names = ("image_features", "text_features", "logit_scale", "logit_bias")
    ctx = mmkernels.backend("cpu") if path == "cpu" else mmkernels.use_path(path)
    with ctx:
        if by_keyword:
            a = ours(**dict(zip(names, ins_ours)), output_dict=True)
        else:
            a = ours(*ins_ours, True)
    b = theirs(*ins_theirs, output_dict=True)
    assert set(a) == set(b) == {"contrastive_loss"}
    a["contrastive_loss"].backward()
    b["contrastive_loss"].backward()
    assert_close(a["contrastive_loss"], b["contrastive_loss"].double(), torch.float32)
    for x, y in zip(ins_ours, ins_theirs):
        assert_close(x.grad, y.grad.double(), torch.float32)


def test_contrastive_loss_takes_every_clip_loss_argument():
    peer = _peer()
    img, txt = features(11, 8, seed=19), features(11, 8, seed=20)
    kwargs = dict(local_loss=True, gather_with_grad=True, cache_labels=True, rank=0, world_size=1,
                  use_horovod=False)
    ours = mmkernels.ContrastiveLoss(**kwargs)
    theirs = peer.ClipLoss(**kwargs)
    positional = mmkernels.ContrastiveLoss(True, True, True, 0, 1, False)
    want = theirs(img, txt, torch.tensor(5.0))
    for module in (ours, positional):
        assert_close(module(img, txt, torch.tensor(5.0)), want.double(), torch.float32)
    with pytest.raises(ValueError, match="horovod"):
        mmkernels.ContrastiveLoss(use_horovod=True)
    with pytest.raises(ValueError, match="ring"):
        mmkernels.ContrastiveLoss(world_size=2, rank=1, ring=True)
