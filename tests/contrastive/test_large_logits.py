"""Every contrastive loss at logits from ~1 up to the thousands, against the float64 reference,
under the twice-eager rule (DESIGN.md, "Numerics"): on each backend (the reference, the C++
kernels, the Triton kernels under the interpreter, the ``blockwise`` path) and in float32,
bfloat16 and float16, the loss and every gradient (features, ``logit_scale``, ``logit_bias``) are
within the table's tolerance or at most twice as far from the float64 truth as the family's
reference computed in the features' own dtype (materialised logits, ``F.cross_entropy``: what a
model author writes). Unnormalised features give the large logits; the positives may be far
above the negatives (a loss near zero), or the only class (a loss of exactly zero)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import mmkernels
from mmkernels.contrastive import reference
from mmkernels.contrastive.itc import reference as itc_reference
from mmkernels.contrastive.siglip import reference as siglip_reference
from mmkernels.testing.numerics import assert_close

from .cases import have_backend

BACKENDS = ["reference", "cpu", "triton", "blockwise"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@dataclass
class Case:
    """One loss on fixed inputs: ``features`` (rounded to the dtype, gradients wanted),
    ``constants`` (teacher features, queues: no gradient), ``scale`` and ``bias`` (float32
    parameters, gradients wanted; ``bias`` may be None)."""
    features: list
    constants: list
    scale: float
    bias: float | None
    ours: callable       # (features, constants, scale, bias) -> loss, mmkernels' API
    eager: callable      # the same from the family's reference


def _randn(shape, seed: int, magnitude: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return magnitude * torch.randn(*shape, generator=g, dtype=torch.float64)


def _near_zero_pair(d: int, gap: float) -> torch.Tensor:
    """``[2, d]`` features ``x`` whose logits ``x @ x.T`` have the diagonal ``gap`` above the
    off-diagonal: each pair's cross-entropy is about ``exp(-gap)``."""
    base = _randn((2, d), 7)
    base = torch.nn.functional.normalize(base - base.mean(0), dim=1)  # rows at an angle
    cos = float(base[0] @ base[1])
    return base * (gap / (1.0 - cos)) ** 0.5


def _clip(label_smoothing: float):
    def ours(f, c, s, b):
        return mmkernels.contrastive_loss(f[0], f[1], s, b, label_smoothing=label_smoothing)

    def eager(f, c, s, b):
        return reference.contrastive_loss_reference(f[0], f[1], s, b, label_smoothing=label_smoothing)
    return ours, eager


def _siglip():
    def ours(f, c, s, b):
        return mmkernels.siglip_loss(f[0], f[1], s, b)

    def eager(f, c, s, b):
        return siglip_reference.siglip_loss_reference(f[0], f[1], s, b)
    return ours, eager


def _itc_rows(eps: float):
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 6, 7, 8])

    def ours(f, c, s, b):
        return mmkernels.itc_rows_loss(f[0], f[1], s, positive_ids=ids, label_smoothing=eps)

    def eager(f, c, s, b):
        return itc_reference.itc_rows_reference(f[0], f[1], s, ids, ids, label_smoothing=eps).mean()
    return ours, eager


def _momentum(alpha: float):
    def ours(f, c, s, b):
        return mmkernels.momentum_itc_loss(f[0], f[1], c[0], c[1], s, alpha=alpha,
                                           image_queue=c[2], text_queue=c[3])

    def eager(f, c, s, b):
        return itc_reference.momentum_itc_reference(f[0], f[1], c[0], c[1], c[2], c[3], 1 / s, alpha)
    return ours, eager


def _blip2():
    def ours(f, c, s, b):
        return mmkernels.blip2_itc_loss(f[0], f[1], s, label_smoothing=0.1)

    def eager(f, c, s, b):
        return itc_reference.blip2_itc_reference(f[0], f[1], f[0].detach(), f[1].detach(), 1 / s, 0,
                                                 label_smoothing=0.1)
    return ours, eager


def build(name: str, magnitude: float) -> Case:
    """Case ``name`` with its features multiplied by ``magnitude`` (1: logits of order 1 to 10)."""
    m = magnitude
    if name == "clip_smooth":  # N = 169, D = 62, scale 14.3: max |logit| ~ 465 at m = 1
        return Case([_randn((169, 62), 1, m), _randn((169, 62), 2, m)], [], 14.3, None, *_clip(0.1))
    if name == "clip":
        return Case([_randn((37, 24), 3, m), _randn((37, 24), 4, m)], [], 9.0, 2.5, *_clip(0.0))
    if name == "one_class":  # N = 1 with label smoothing: the loss is exactly 0; logits ~2000 at m = 1
        x = _randn((1, 16), 5)
        x = x * (2000.0 / 10.0 / float(x @ x.T)) ** 0.5 * m
        return Case([x, x.clone()], [], 10.0, None, *_clip(0.1))
    if name == "two_near_zero":  # N = 2: each cross-entropy ~ exp(-16) at m = 1
        x = _near_zero_pair(8, 16.0) * m
        return Case([x, x.clone()], [], 1.0, None, *_clip(0.0))
    if name == "siglip":
        return Case([_randn((29, 20), 6, m), _randn((29, 20), 8, m)], [], 10.0, -10.0, *_siglip())
    if name == "itc_rows":
        return Case([_randn((13, 16), 9, m), _randn((13, 16), 10, m)], [], 12.0, None, *_itc_rows(0.1))
    if name == "momentum_itc":
        b, k, d = 11, 6, 16
        return Case([_randn((b, d), 11, m), _randn((b, d), 12, m)],
                    [_randn((b, d), 13, m), _randn((b, d), 14, m), _randn((k, d), 15, m),
                     _randn((k, d), 16, m)], 14.0, None, *_momentum(0.4))
    if name == "blip2_itc":
        return Case([_randn((9, 4, 16), 17, m), _randn((9, 16), 18, m)], [], 12.0, None, *_blip2())
    raise KeyError(name)


def run(case: Case, dtype, ctx=None, compute=None):
    """``(loss, [grads of features], grad of scale, grad of bias)``. ``compute``: the features'
    dtype for this run (``dtype`` unless the float64 reference); ``ctx``: the backend or path
    block for mmkernels' API, None for eager code."""
    compute = dtype if compute is None else compute
    feats = [x.to(dtype).to(compute).requires_grad_(True) for x in case.features]
    consts = [x.to(dtype).to(compute) for x in case.constants]
    sdt = torch.float64 if compute == torch.float64 else torch.float32
    s = torch.tensor(case.scale, dtype=sdt, requires_grad=True)
    b = None if case.bias is None else torch.tensor(case.bias, dtype=sdt, requires_grad=True)
    if ctx is None:
        loss = case.eager(feats, consts, s, b)
    else:
        with ctx:
            loss = case.ours(feats, consts, s, b)
    loss.backward()
    return loss.detach(), [x.grad for x in feats], s.grad, None if b is None else b.grad


def context(backend: str):
    if backend in ("cpu", "triton", "reference"):
        return mmkernels.backend(backend)
    return mmkernels.use_path(backend)


def compare(name: str, magnitude: float, backend: str, dtype, report=None):
    """Check (or, with ``report`` a list, also record) every output of case ``name``."""
    case = build(name, magnitude)
    ref = run(case, dtype, compute=torch.float64)
    eager = run(case, dtype)
    got = run(case, dtype, ctx=context(backend))
    labels = ["loss"] + [f"d_feature{i}" for i in range(len(case.features))] + ["d_scale", "d_bias"]
    outs = [(got[0], ref[0], eager[0])] + list(zip(got[1], ref[1], eager[1])) \
        + [(got[2], ref[2], eager[2]), (got[3], ref[3], eager[3])]
    for label, (g, r, e) in zip(labels, outs):
        if r is None:
            continue
        if report is not None:
            err = (g.double() - r).abs().max().item()
            eerr = (e.double() - r).abs().max().item()
            report.append((name, magnitude, backend, str(dtype).split(".")[-1], label, err, eerr))
        else:
            assert_close(g.to(dtype) if g.dtype != dtype and g.dim() else g, r, dtype, eager=e,
                         name=f"{name} x{magnitude} {backend} {label}")


# (case, magnitudes): magnitude 1 gives the logits named in ``build``; the cheapest case first
# (the quick tier runs the first case of each backend).
SETS = [
    ("two_near_zero", (1.0, 1.5)),
    ("one_class", (0.05, 1.0)),
    ("clip_smooth", (0.1, 1.0, 2.0)),
    ("clip", (1.0, 6.0)),
    ("siglip", (1.0, 6.0)),
    ("itc_rows", (1.0, 6.0)),
    ("momentum_itc", (1.0, 6.0)),
    ("blip2_itc", (1.0, 5.0)),
]
# Known shortfalls, each asserted to still fail (strict): the ITC unit's C++ kernels and
# blockwise path in bfloat16 (its products rounded to bf16 as eager code rounds them) give
# feature gradients beyond twice those of the papers' code, and so does the unit's own
# materialised form of momentum distillation.
_ITC_BF16 = "itc unit, bfloat16: feature gradients beyond twice eager's error"
KNOWN = {("reference", "momentum_itc", 1.0, torch.bfloat16): _ITC_BF16}


def _params():
    out = []
    for backend in BACKENDS:
        for name, ms in SETS:
            for m in ms:
                for dtype in DTYPES:
                    reason = KNOWN.get((backend, name, m, dtype))
                    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                    out.append(pytest.param(backend, name, m, dtype, marks=marks,
                                            id=f"{backend}-{name}-x{m:g}-{str(dtype)[6:]}"))
    return out


@pytest.mark.parametrize("backend,name,magnitude,dtype", _params())
def test_twice_eager(backend, name, magnitude, dtype):
    if backend in ("cpu", "triton") and not have_backend(backend):
        pytest.skip(f"backend {backend} unavailable")
    compare(name, magnitude, backend, dtype)
