"""Draws the contrastive-family property tests share: features, the logit scale and bias."""
from __future__ import annotations

import torch

from mmkernels.testing.property import Rejected, safe_magnitude

from tests.property.common import magnitude


def features(draw, name: str, shape, dtype, *, normalize: bool, scale: float) -> torch.Tensor:
    """``shape`` float64 values exact in ``dtype``: unit rows (``normalize``) or normal entries,
    times ``scale``."""
    x = draw.randn(*shape)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=-1)
    return (x * scale).to(dtype).to(torch.float64)


def feature_draws(draw, dtype):
    """``(normalize, feature magnitude)`` of a case."""
    return draw.flag("normalized"), draw.log_uniform("feature_magnitude", 1e-2, 1e2)


def max_similarity(q: torch.Tensor, k: torch.Tensor) -> float:
    """``max |S_ij|`` of the similarity (the max over token pairs for ``[N, Q, D]`` features)."""
    q3 = q if q.dim() == 3 else q[:, None]
    k3 = k if k.dim() == 3 else k[:, None]
    s = torch.einsum("nqd,mpd->nmqp", q3, k3).flatten(2).amax(-1)
    return max(float(s.abs().max()), 1e-30)


#: The largest ``|logit|`` and the range of logit scales (temperatures 1 to 0.01) the tier draws
#: for the contrastive family: the rule holds there for every loss; beyond, README's "Numerics"
#: lists where it does not (the ITC unit, SigLIP, token-level and distillation terms), and
#: tests/contrastive/test_large_logits.py holds the core loss to it on fixed cases up to
#: |logit| ~2000.
MAX_LOGIT = 30.0
MIN_SCALE, MAX_SCALE = 1.0, 100.0


def scale_for(draw, dtype, similarity: float, lo: float = 1e-2, hi: float = MAX_LOGIT) -> float:
    """A logit scale that makes ``max |logit|`` log-uniform in ``[lo, hi]`` (``hi`` lowered to
    what ``dtype`` holds), the scale in ``[MIN_SCALE, MAX_SCALE]`` (MAX_SCALE: CLIP's clamp) and
    representable in ``dtype`` (eager multiplies in it). Rejects features whose similarities the
    dtype cannot hold (eager computes them in it) or that exceed ``hi`` at ``MIN_SCALE``."""
    if similarity > safe_magnitude(dtype):
        raise Rejected(f"similarity {similarity:.3g} overflows {dtype}")
    if similarity * MIN_SCALE > hi:
        raise Rejected(f"similarity {similarity:.3g} gives logits beyond {hi:g} at scale {MIN_SCALE:g}")
    target = magnitude(draw, "max_logit", dtype, lo, hi)
    return draw.note("logit_scale", max(MIN_SCALE, min(target / similarity, MAX_SCALE, safe_magnitude(dtype))))


def logit_scale(draw, dtype, similarity: float, values: dict, grads: list, dtypes: dict):
    """The logit scale: drawn so that ``max |logit|`` is log-uniform up to what the dtype holds;
    a Python float or a 0-dim learnable tensor (float32, or the features' dtype). A tensor goes
    into ``values`` (and ``grads``) as ``logit_scale``; returns what to pass for it, or None
    when it is in ``values``."""
    s = scale_for(draw, dtype, similarity)
    if draw.flag("scale_is_tensor", 0.7):
        sdt = draw.choice("scale_dtype", [torch.float32, dtype])
        values["logit_scale"] = torch.tensor(s, dtype=sdt).double()
        dtypes["logit_scale"] = sdt
        grads.append("logit_scale")
        return None
    return s


def logit_bias(draw, dtype, values: dict, grads: list, dtypes: dict):
    """None, a float or a learnable tensor of shape ``[]`` or ``[1]`` (in ``values``)."""
    kind = draw.choice("logit_bias", ["none", "float", "tensor", "tensor1"])
    if kind == "none":
        return None
    b = draw.uniform("bias_value", -10.0, 10.0)
    if kind == "float":
        return b
    t = torch.tensor(b if kind == "tensor" else [b], dtype=torch.float32)
    values["logit_bias"] = t.double()
    dtypes["logit_bias"] = torch.float32
    grads.append("logit_bias")
    return None


def reduction_cotangent(draw, reduction: str, n: int, dtype):
    """The output's gradient: a drawn ``[n]`` vector for ``"none"``, else 1."""
    return draw.randn(n, dtype=dtype) if reduction == "none" else None
