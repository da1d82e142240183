"""Randomized tests of the ALBEF / BLIP / BLIP-2 contrastive objectives: ``itc_rows_loss``,
``momentum_itc_loss`` and ``blip2_itc_loss`` (on one process: BLIP-2's gather across ranks needs
several processes and is tested in ``tests/contrastive/test_itc_distributed.py``).

Each case draws the sizes, the dtype, normalised or raw features of a log-uniform magnitude, token
features (the max over tokens), the logit scale (the largest logit log-uniform up to what the dtype
holds), positives by targets or by ids, momentum teachers and ``alpha``, feature queues, label
smoothing, the reduction and non-contiguous features, and checks the loss and every gradient
against the float64 reference with the 2x-eager rule.
"""
from __future__ import annotations

import pytest

import mmkernels
from mmkernels.testing.property_check import check_op

from tests.property.common import BACKENDS, TIERS, layouts, run
from tests.property.contrastive_draws import (feature_draws, features, logit_scale, max_similarity,
                                              reduction_cotangent)


def _smoothing(draw) -> float:
    return draw.uniform("label_smoothing", 0.0, 0.5) if draw.flag("smoothed", 0.3) else 0.0


def _check_itc_rows(draw, backend):
    dtype = draw.dtype()
    small = backend == "triton"
    n, d = draw.size("N", 40 if small else 100), draw.size("D", 80)
    q_tokens = draw.integer("query_tokens", 2, 4) if draw.flag("query_token_features", 0.3) else 0
    k_tokens = draw.integer("key_tokens", 2, 3) if draw.flag("key_token_features", 0.15) else 0
    by = draw.choice("positives_by", ["default", "targets", "ids"])
    m = draw.size("M", 48 if small else 120, lo=n if by == "default" else 1)
    queue = draw.size("queue", 48 if small else 96) if not k_tokens and draw.flag("key_queue", 0.25) else 0
    normalize, mag = feature_draws(draw, dtype)
    q = features(draw, "queries", (n, q_tokens, d) if q_tokens else (n, d), dtype, normalize=normalize, scale=mag)
    k = features(draw, "keys", (m, k_tokens, d) if k_tokens else (m, d), dtype, normalize=normalize, scale=mag)
    values = {"queries": q, "keys": k}
    grads, dtypes = ["queries", "keys"], {}
    kwargs = {"label_smoothing": _smoothing(draw), "reduction": draw.choice("reduction", ["mean", "sum", "none"])}
    everything = k
    if queue:
        values["key_queue"] = features(draw, "key_queue", (queue, d), dtype, normalize=normalize, scale=mag)
        everything = values["key_queue"]
    scale = logit_scale(draw, dtype, max(max_similarity(q, k), max_similarity(q, everything)), values, grads,
                        dtypes)
    total = m + queue
    if by == "targets":
        kwargs["targets"] = draw.randint(0, total, (n,))
    elif by == "ids":
        key_ids = draw.randint(0, draw.integer("distinct_ids", 1, total), (total,))
        kwargs["key_ids"] = key_ids
        kwargs["positive_ids"] = key_ids[draw.randint(0, total, (n,))]
    if draw.flag("distillation", 0.3):
        values["teacher_queries"] = features(draw, "teacher_queries", q.shape, dtype, normalize=normalize, scale=mag)
        if not queue and draw.flag("teacher_keys"):
            values["teacher_keys"] = features(draw, "teacher_keys", k.shape, dtype, normalize=normalize, scale=mag)
        kwargs["alpha"] = draw.uniform("alpha", 0.0, 1.0)
        if draw.flag("teacher_scale", 0.3):
            kwargs["teacher_scale"] = (scale if scale is not None else float(values["logit_scale"])) \
                * draw.log_uniform("teacher_scale_ratio", 0.5, 2.0)

    def fn(queries, keys, logit_scale=scale, **kw):
        return mmkernels.itc_rows_loss(queries, keys, logit_scale, **kw)

    check_op(fn, values, dtype=dtype, backend=backend, grads=grads, dtypes=dtypes, kwargs=kwargs,
             layouts=layouts(draw, ["queries", "keys"], {"queries": q.dim(), "keys": k.dim()}),
             cotangent=reduction_cotangent(draw, kwargs["reduction"], n, dtype))


def _check_momentum(draw, backend):
    dtype = draw.dtype()
    b, d = draw.size("B", 40 if backend == "triton" else 96), draw.size("D", 80)
    k = draw.size("queue", 48 if backend == "triton" else 96, lo=0)
    normalize, mag = feature_draws(draw, dtype)
    values = {name: features(draw, name, (b, d), dtype, normalize=normalize, scale=mag)
              for name in ("image_feat", "text_feat", "image_feat_m", "text_feat_m")}
    if k:
        values["image_queue"] = features(draw, "image_queue", (k, d), dtype, normalize=normalize, scale=mag)
        values["text_queue"] = features(draw, "text_queue", (k, d), dtype, normalize=normalize, scale=mag)
    grads, dtypes = ["image_feat", "text_feat"], {}
    sim = max(max_similarity(values[a], values[c]) for a in ("image_feat", "image_feat_m")
              for c in ("text_feat", "text_feat_m") + (("text_queue",) if k else ()))
    scale = logit_scale(draw, dtype, sim, values, grads, dtypes)
    kwargs = {"alpha": draw.choice("alpha", [0.0, 0.4, 1.0, draw.rng.random()]), "label_smoothing": _smoothing(draw),
              "reduction": draw.choice("reduction", ["mean", "sum", "none"])}
    if draw.flag("ids", 0.3):
        ids = draw.randint(0, draw.integer("distinct_ids", 1, b + k), (b + k,))
        kwargs["idx"], kwargs["idx_queue"] = ids[:b], ids[b:]

    def fn(image_feat, text_feat, image_feat_m, text_feat_m, logit_scale=scale, **kw):
        return mmkernels.momentum_itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, logit_scale, **kw)

    check_op(fn, values, dtype=dtype, backend=backend, grads=grads, dtypes=dtypes, kwargs=kwargs,
             layouts=layouts(draw, ["image_feat", "text_feat"], {}),
             cotangent=reduction_cotangent(draw, kwargs["reduction"], b, dtype))


def _check_blip2(draw, backend):
    dtype = draw.dtype()
    b, d = draw.size("B", 40 if backend == "triton" else 96), draw.size("D", 80)
    queries = draw.integer("num_query_tokens", 1, 8 if backend == "triton" else 32)
    normalize, mag = feature_draws(draw, dtype)
    img = features(draw, "image_feats", (b, queries, d), dtype, normalize=normalize, scale=mag)
    txt = features(draw, "text_feat", (b, d), dtype, normalize=normalize, scale=mag)
    values = {"image_feats": img, "text_feat": txt}
    grads, dtypes = ["image_feats", "text_feat"], {}
    scale = logit_scale(draw, dtype, max_similarity(img, txt), values, grads, dtypes)
    kwargs = {"reduction": draw.choice("reduction", ["mean", "sum", "none"])}
    kwargs["label_smoothing"] = draw.choice("label_smoothing", [0.0, 0.1, 0.3])

    def fn(image_feats, text_feat, logit_scale=scale, **kw):
        return mmkernels.blip2_itc_loss(image_feats, text_feat, logit_scale, **kw)

    check_op(fn, values, dtype=dtype, backend=backend, grads=grads, dtypes=dtypes, kwargs=kwargs,
             layouts=layouts(draw, ["image_feats", "text_feat"], {"image_feats": 3}),
             cotangent=reduction_cotangent(draw, kwargs["reduction"], b, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tier", TIERS)
def test_itc_rows_loss(tier, backend, request):
    run(request, tier, lambda draw: _check_itc_rows(draw, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tier", TIERS)
def test_momentum_itc_loss(tier, backend, request):
    run(request, tier, lambda draw: _check_momentum(draw, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tier", TIERS)
def test_blip2_itc_loss(tier, backend, request):
    run(request, tier, lambda draw: _check_blip2(draw, backend))
