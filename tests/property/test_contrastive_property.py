"""Randomized tests of the CLIP-style losses: ``contrastive_loss`` (and its module form
``ContrastiveLoss`` on one process) and ``infonce_loss``.

Each case draws the batch and feature sizes, the dtype, normalised or raw features of a
log-uniform magnitude, the logit scale (so that the largest logit is log-uniform up to what the
dtype holds: fp16 logits stay below 65504), a float or learnable scale and bias, label
smoothing, the reduction, multiple positives by id, momentum-distillation teachers, BLIP-2 token
features (max over tokens) and non-contiguous features, and checks the loss and the gradient of
every learnable input against the float64 reference with the 2x-eager rule. The multi-process
losses (``distributed_*``, ``world_size > 1``) need several processes and are tested in
``tests/contrastive/test_distributed*.py``, not here.
"""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.testing.property_check import check_op

from tests.property.common import BACKENDS, TIERS, layouts, run
from tests.property.contrastive_draws import (feature_draws, features, logit_bias, logit_scale, max_similarity,
                                              reduction_cotangent)


def _options(draw, n: int, m: int):
    """label smoothing, reduction and (maybe) positive ids for ``n`` queries and ``m`` keys."""
    kind = draw.choice("smoothing", ["none", "none", "0.1", "uniform"])
    smoothing = {"none": 0.0, "0.1": 0.1}.get(kind)
    if smoothing is None:
        smoothing = draw.uniform("label_smoothing", 0.0, 0.9)
    return smoothing, draw.choice("reduction", ["mean", "sum", "none"])


def _ids(draw, n: int) -> torch.Tensor:
    """``[n]`` int64 ids with repeats (several captions of one image)."""
    return draw.randint(0, draw.integer("distinct_ids", 1, n), (n,))


def _check_contrastive(draw, backend):
    dtype = draw.dtype()
    n, d = draw.size("N", 64 if backend == "triton" else 130), draw.size("D", 96)
    normalize, mag = feature_draws(draw, dtype)
    tokens = draw.integer("image_tokens", 2, 5) if draw.flag("token_features", 0.15) else 0
    img = features(draw, "image", (n, tokens, d) if tokens else (n, d), dtype, normalize=normalize, scale=mag)
    txt = features(draw, "text", (n, d), dtype, normalize=normalize, scale=mag)
    values = {"image_features": img, "text_features": txt}
    grads, dtypes = ["image_features", "text_features"], {}
    scale = logit_scale(draw, dtype, max_similarity(img, txt), values, grads, dtypes)
    # the logit bias cancels inside each softmax: its gradient must be 0 on every path
    bias = logit_bias(draw, dtype, values, grads, dtypes) if not tokens else None
    smoothing, reduction = _options(draw, n, n)
    kwargs = {"label_smoothing": smoothing, "reduction": reduction}
    if draw.flag("positive_ids", 0.2):
        kwargs["positive_ids"] = _ids(draw, n)
    if draw.flag("distillation", 0.2):
        values["teacher_image_features"] = features(draw, "teacher_image", img.shape, dtype, normalize=normalize,
                                                    scale=mag)
        values["teacher_text_features"] = features(draw, "teacher_text", txt.shape, dtype, normalize=normalize,
                                                   scale=mag)
        kwargs["alpha"] = draw.uniform("alpha", 0.0, 1.0)
    module = not tokens and draw.flag("module_form", 0.3)

    def fn(image_features, text_features, logit_scale=scale, logit_bias=bias, **kw):
        if module:
            loss = mmkernels.ContrastiveLoss(label_smoothing=smoothing, reduction=reduction)
            other = {k: v for k, v in kw.items() if k not in ("label_smoothing", "reduction")}
            return loss(image_features, text_features, logit_scale, logit_bias, output_dict=True,
                        **other)["contrastive_loss"]
        return mmkernels.contrastive_loss(image_features, text_features, logit_scale, logit_bias, **kw)

    check_op(fn, values, dtype=dtype, backend=backend, grads=grads, dtypes=dtypes, kwargs=kwargs,
             layouts=layouts(draw, ["image_features", "text_features"], {"image_features": img.dim()}),
             cotangent=reduction_cotangent(draw, reduction, n, dtype))


def _check_infonce(draw, backend):
    dtype = draw.dtype()
    small = backend == "triton"
    n, d = draw.size("N", 48 if small else 130), draw.size("D", 96)
    by = draw.choice("positives_by", ["default", "targets", "ids"])
    m = draw.size("M", 64 if small else 160, lo=n if by == "default" else 1)
    normalize, mag = feature_draws(draw, dtype)
    q_tokens = draw.integer("query_tokens", 2, 4) if draw.flag("query_token_features", 0.15) else 0
    k_tokens = draw.integer("key_tokens", 2, 4) if draw.flag("key_token_features", 0.15) else 0
    q = features(draw, "queries", (n, q_tokens, d) if q_tokens else (n, d), dtype, normalize=normalize, scale=mag)
    k = features(draw, "keys", (m, k_tokens, d) if k_tokens else (m, d), dtype, normalize=normalize, scale=mag)
    values = {"queries": q, "keys": k}
    grads, dtypes = ["queries", "keys"], {}
    scale = logit_scale(draw, dtype, max_similarity(q, k), values, grads, dtypes)
    smoothing, reduction = _options(draw, n, m)
    kwargs = {"label_smoothing": smoothing, "reduction": reduction}
    if by == "targets":
        kwargs["targets"] = draw.randint(0, m, (n,))
    elif by == "ids":
        # every query gets a positive: its id is one of the keys'
        key_ids = _ids(draw, m)
        kwargs["key_ids"] = key_ids
        kwargs["positive_ids"] = key_ids[draw.randint(0, m, (n,))]
    if draw.flag("distillation", 0.2):
        values["teacher_queries"] = features(draw, "teacher_queries", q.shape, dtype, normalize=normalize, scale=mag)
        if draw.flag("teacher_keys"):
            values["teacher_keys"] = features(draw, "teacher_keys", k.shape, dtype, normalize=normalize, scale=mag)
        kwargs["alpha"] = draw.uniform("alpha", 0.0, 1.0)

    def fn(queries, keys, logit_scale=scale, **kw):
        return mmkernels.infonce_loss(queries, keys, logit_scale, **kw)

    check_op(fn, values, dtype=dtype, backend=backend, grads=grads, dtypes=dtypes, kwargs=kwargs,
             layouts=layouts(draw, ["queries", "keys"], {"queries": q.dim(), "keys": k.dim()}),
             cotangent=reduction_cotangent(draw, reduction, n, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tier", TIERS)
def test_contrastive_loss(tier, backend, request):
    run(request, tier, lambda draw: _check_contrastive(draw, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tier", TIERS)
def test_infonce_loss(tier, backend, request):
    run(request, tier, lambda draw: _check_infonce(draw, backend))
