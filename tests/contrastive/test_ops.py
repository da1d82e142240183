"""Registration (opcheck, torch.compile), float64 gradcheck, and the memory bound of the cpu backend."""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels import _ext
from mmkernels.contrastive import reference
from mmkernels.testing.numerics import assert_close

from tests.contrastive.cases import features, leaf
from tests.helpers.rss import peak_extra


def test_cpp_extension_is_built():
    assert _ext.available(), _ext.LOAD_ERROR


@pytest.mark.parametrize("with_columns", [True, False])
def test_opcheck(with_columns):
    q, k = leaf(features(9, 12, seed=1)), leaf(features(9 if with_columns else 13, 12, seed=2))
    scale = torch.tensor(7.0, requires_grad=True)
    targets = torch.arange(9) if with_columns else torch.randint(0, 13, (9,))
    torch.library.opcheck(torch.ops.mmkernels.contrastive_stats.default,
                          (q, k, scale, targets, with_columns, "cpu"))
    stats = torch.ops.mmkernels.contrastive_stats(q.detach(), k.detach(), scale.detach(), targets, with_columns, "cpu")
    g = [torch.randn_like(t) for t in (stats[0], stats[2], stats[3], stats[4], stats[6])]
    torch.library.opcheck(torch.ops.mmkernels.contrastive_grads.default,
                          (q.detach(), k.detach(), scale.detach(), targets, stats[1], stats[0], stats[5],
                           stats[4], *g, "cpu"))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    img, txt = features(33, 16, seed=3), features(33, 16, seed=4)

    def step(a, b, s):
        loss, stats = mmkernels.contrastive_loss(a, b, s.exp(), label_smoothing=0.1, return_stats=True)
        return loss + 0.0 * stats.i2t_accuracy

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    with mmkernels.backend("cpu"):
        a1, b1, s1 = leaf(img), leaf(txt), torch.tensor(2.3, requires_grad=True)
        out = compiled(a1, b1, s1)
        out.backward()
        a2, b2, s2 = leaf(img), leaf(txt), torch.tensor(2.3, requires_grad=True)
        ref = step(a2, b2, s2)
        ref.backward()
    assert_close(out, ref.double())
    assert_close(a1.grad, a2.grad.double())
    assert_close(s1.grad, s2.grad.double())


def test_torch_compile_infonce_fullgraph():
    q, k = features(17, 8, seed=5), features(40, 8, seed=6)
    t = torch.arange(17) + 3
    fn = torch.compile(lambda a, b: mmkernels.infonce_loss(a, b, 5.0, targets=t), fullgraph=True)
    with mmkernels.backend("cpu"):
        out = fn(q, k)
    assert_close(out, reference.infonce_loss_reference(q.double(), k.double(), 5.0, targets=t))


@pytest.mark.parametrize("label_smoothing,reduction", [(0.0, "mean"), (0.1, "none"), (0.3, "sum")])
def test_gradcheck_float64(label_smoothing, reduction):
    img = leaf(features(5, 3, torch.float64, seed=7, normalize=False))
    txt = leaf(features(5, 3, torch.float64, seed=8, normalize=False))
    scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    with mmkernels.backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda a, b, s: mmkernels.contrastive_loss(a, b, s, label_smoothing=label_smoothing,
                                                       reduction=reduction), (img, txt, scale))
        q = leaf(features(4, 3, torch.float64, seed=9, normalize=False))
        keys = leaf(features(6, 3, torch.float64, seed=10, normalize=False))
        t = torch.tensor([5, 0, 2, 2])
        assert torch.autograd.gradcheck(
            lambda a, b, s: mmkernels.infonce_loss(a, b, s, targets=t, label_smoothing=label_smoothing,
                                                   reduction=reduction), (q, keys, scale))


_MEMORY_BODY = """
import torch, mmkernels
from mmkernels.contrastive import reference

def setup(which, n, d):
    torch.manual_seed(0)
    n, d = int(n), int(d)
    img = torch.nn.functional.normalize(torch.randn(n, d), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(n, d), dim=-1).requires_grad_()
    img.grad, txt.grad = torch.zeros_like(img), torch.zeros_like(txt)  # gradients are not "extra"
    return which, img, txt, torch.tensor(14.3, requires_grad=True)

def run(state):
    which, img, txt, scale = state
    if which == "reference":
        loss = reference.contrastive_loss_reference(img, txt, scale)
    else:
        with mmkernels.backend(which):
            loss = mmkernels.contrastive_loss(img, txt, scale)
    loss.backward()
    return float(loss)
"""


def _peak_extra(which: str, n: int, d: int) -> dict:
    out = peak_extra(_MEMORY_BODY, which, n, d)
    return {"extra": out["extra"], "loss": out["result"]}


@pytest.mark.slow
def test_cpu_memory_bound_no_n_by_n():
    """N = 8192, D = 512 fp32: the cpu backend's extra memory is a small multiple of N*D*4 bytes
    (16 MiB), while the reference's grows with N*N*4 (256 MiB per logits matrix)."""
    n, d = 8192, 512
    ours = _peak_extra("cpu", n, d)
    ref = _peak_extra("reference", n, d)
    nd_bytes, nn_bytes = n * d * 4, n * n * 4
    assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    assert ours["extra"] <= 8 * nd_bytes, f"cpu backend used {ours['extra'] / 2**20:.0f} MiB extra"
    assert ref["extra"] >= nn_bytes, f"reference used only {ref['extra'] / 2**20:.0f} MiB extra"
    assert ours["extra"] <= 0.1 * ref["extra"]
