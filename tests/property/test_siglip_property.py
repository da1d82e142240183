"""Randomized tests of SigLIP's sigmoid loss: ``siglip_loss`` and its module form ``SigLipLoss``
on one process.

Each case draws N and M, the dtype, normalised or raw features of a log-uniform magnitude, the
logit scale (the largest logit log-uniform up to what the dtype holds), a float or learnable scale
and bias, the targets (default, drawn, or -1 for rows without a positive), the reduction and
non-contiguous features, and checks the loss and every gradient against the float64 reference
with the 2x-eager rule. ``distributed_siglip_loss`` needs several processes and is tested in
``tests/contrastive/``, not here.
"""
from __future__ import annotations

import pytest

import mmkernels
from mmkernels.testing.property_check import check_op

from tests.property.common import BACKENDS, TIERS, layouts, run
from tests.property.contrastive_draws import (feature_draws, features, logit_bias, logit_scale, max_similarity,
                                              reduction_cotangent)


def _check_siglip(draw, backend):
    dtype = draw.dtype()
    small = backend == "triton"
    n, d = draw.size("N", 48 if small else 130), draw.size("D", 96)
    drawn_targets = draw.flag("drawn_targets", 0.3)
    m = draw.size("M", 64 if small else 160, lo=1 if drawn_targets else n)
    normalize, mag = feature_draws(draw, dtype)
    img = features(draw, "image", (n, d), dtype, normalize=normalize, scale=mag)
    txt = features(draw, "text", (m, d), dtype, normalize=normalize, scale=mag)
    values = {"image_features": img, "text_features": txt}
    grads, dtypes = ["image_features", "text_features"], {}
    scale = logit_scale(draw, dtype, max_similarity(img, txt), values, grads, dtypes)
    bias = logit_bias(draw, dtype, values, grads, dtypes)
    reduction = draw.choice("reduction", ["mean", "sum", "none"])
    kwargs = {"reduction": reduction}
    if drawn_targets:
        kwargs["targets"] = draw.randint(-1, m, (n,))
    module = reduction == "mean" and not drawn_targets and draw.flag("module_form", 0.3)

    def fn(image_features, text_features, logit_scale=scale, logit_bias=bias, **kw):
        if module:
            return mmkernels.SigLipLoss()(image_features, text_features, logit_scale, logit_bias)
        return mmkernels.siglip_loss(image_features, text_features, logit_scale, logit_bias, **kw)

    check_op(fn, values, dtype=dtype, backend=backend, grads=grads, dtypes=dtypes, kwargs=kwargs,
             layouts=layouts(draw, ["image_features", "text_features"], {}),
             cotangent=reduction_cotangent(draw, reduction, n, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tier", TIERS)
def test_siglip_loss(tier, backend, request):
    run(request, tier, lambda draw: _check_siglip(draw, backend))
