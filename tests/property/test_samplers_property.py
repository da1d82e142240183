"""Randomized tests of the ITM hard-negative samplers: ``sample_hard_negatives`` and
``itm_hard_negatives``, on every backend.

They draw at random, so they are checked by the properties their contract states rather than
against an output: the result is an int64 index per query in ``[-1, M)``; never a positive (by
``targets`` or by ids), ``-1`` exactly for a query whose every key is a positive; the same seed
gives the same draw; the draw is the Gumbel-max argmax of ``logit + G(seed, i, j)`` over the
negatives that the float64 logits give (``random.py``), on every backend, up to keys whose noisy
logits are closer than twice eager PyTorch's logit error in the dtype; replicated queries draw
their negatives with the frequencies of the softmax over the negatives; and
``itm_hard_negatives`` is the two one-direction draws with seeds taken in turn from its generator.
"""
from __future__ import annotations

import math

import pytest
import torch

import mmkernels
from mmkernels.contrastive.itc import random as itc_random

from tests.property.common import ALL_BACKENDS, TIERS, run
from tests.property.contrastive_draws import feature_draws, features, max_similarity, scale_for


def _similarity(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``[N, M]``: dot products, the max over token pairs for ``[N, Q, D]`` / ``[M, P, D]``."""
    q3 = q if q.dim() == 3 else q[:, None]
    k3 = k if k.dim() == 3 else k[:, None]
    return torch.einsum("nqd,mpd->nmqp", q3, k3).flatten(2).amax(-1)


def _positives(draw, n: int, m: int):
    """``(kwargs, positive mask [N, M])`` with positives by targets (default or drawn) or by ids."""
    by = draw.choice("positives_by", ["default", "targets", "ids"] if m >= n else ["targets", "ids"])
    if by == "default":
        t = torch.arange(n)
        return {}, t[:, None] == torch.arange(m)[None]
    if by == "targets":
        t = draw.randint(0, m, (n,))
        return {"targets": t}, t[:, None] == torch.arange(m)[None]
    key_ids = draw.randint(0, draw.integer("distinct_ids", 1, m), (m,))
    ids = draw.randint(0, draw.integer("distinct_query_ids", 1, m + 2), (n,))
    kw = {"positive_ids": ids}
    if m != n or draw.flag("explicit_key_ids"):
        kw["key_ids"] = key_ids
    else:
        key_ids = ids
    return kw, ids[:, None] == key_ids[None]


def _check_draw(neg, noisy64, pos, slack, what):
    """``neg [N]`` never a positive, -1 exactly for rows without a negative, and the argmax of
    ``noisy64`` over the negatives up to ``slack``."""
    n, m = pos.shape
    assert neg.dtype == torch.int64 and neg.shape == (n,), f"{what}: {neg.dtype} {tuple(neg.shape)}"
    assert bool(((neg >= -1) & (neg < m)).all()), f"{what}: index out of [-1, {m})"
    none = pos.all(1)
    assert torch.equal(neg == -1, none), f"{what}: -1 for rows {torch.nonzero(neg == -1).flatten().tolist()}, " \
                                         f"rows without a negative {torch.nonzero(none).flatten().tolist()}"
    rows = torch.nonzero(~none).flatten()
    chosen = neg[rows]
    assert not bool(pos[rows, chosen].any()), f"{what}: a positive was drawn"
    keys = noisy64.masked_fill(pos, float("-inf"))[rows]
    gap = keys.amax(1) - keys.gather(1, chosen[:, None])[:, 0]
    worst = int(torch.argmax(gap)) if len(rows) else 0
    assert not len(rows) or float(gap[worst]) <= slack, \
        f"{what}: row {int(rows[worst])} drew key {int(chosen[worst])}, {float(gap[worst]):.3g} below the best " \
        f"negative's noisy logit (allowed {slack:.3g}, twice eager's logit error)"


def _check_sample(draw, backend):
    dtype = draw.dtype()
    small = backend == "triton"
    n, d = draw.size("N", 40 if small else 100), draw.size("D", 64)
    m = draw.size("M", 48 if small else 120)
    replicate = draw.flag("replicated_queries", 0.25)
    q_tokens = draw.integer("query_tokens", 2, 4) if draw.flag("query_token_features", 0.2) else 0
    normalize, mag = feature_draws(draw, dtype)
    q = features(draw, "queries", (n, q_tokens, d) if q_tokens else (n, d), dtype, normalize=normalize, scale=mag)
    k = features(draw, "keys", (m, d), dtype, normalize=normalize, scale=mag)
    if replicate:
        # one query many times: its draws are independent samples of one distribution
        n = draw.integer("replicas", 96, 128 if small else 512)
        m = draw.integer("replicated_keys", 2, 12)
        k = features(draw, "keys", (m, d), dtype, normalize=normalize, scale=mag)
        q = q[:1].expand(n, *q.shape[1:]).contiguous()
        kw, pos = ({"targets": torch.zeros(n, dtype=torch.int64)}, torch.arange(m)[None].expand(n, m) == 0)
        scale = scale_for(draw, dtype, max_similarity(q[:1], k), 0.1, 4.0)
    else:
        kw, pos = _positives(draw, n, m)
        scale = scale_for(draw, dtype, max_similarity(q, k))
    seed = torch.tensor(draw.randint(0, 2 ** 31 - 1, ()).item())
    qd, kd = q.to(dtype), k.to(dtype)
    with mmkernels.backend(backend):
        neg = mmkernels.sample_hard_negatives(qd, kd, scale, seed=seed, **kw)
        again = mmkernels.sample_hard_negatives(qd, kd, scale, seed=seed.clone(), **kw)
    assert torch.equal(neg, again), "the same seed gave different draws"
    logits64 = scale * _similarity(q, k)
    eager = (scale * _similarity(qd, kd)).to(torch.float64)
    g = itc_random.gumbel(seed, torch.arange(n)[:, None], torch.arange(m)[None]).double()
    # twice eager's logit error plus one rounding step of the dtype at the logits' scale (the
    # project's rule, mmkernels.testing.numerics), and float32 rounding of logits + noise
    slack = 2 * float((eager - logits64).abs().max()) \
        + torch.finfo(dtype).eps * float(logits64.abs().max()) \
        + 8 * torch.finfo(torch.float32).eps * float(logits64.abs().max() + g.abs().max())
    _check_draw(neg, logits64 + g, pos, slack, f"{backend} {dtype}")
    if replicate:
        p = torch.softmax(logits64[0, 1:], 0)
        counts = torch.bincount(neg - 1, minlength=m - 1).double()
        sigma = torch.sqrt(n * p * (1 - p))
        excess = (counts - n * p).abs() - (6 * sigma + 2)
        assert bool((excess <= 0).all()), f"draw frequencies {counts.tolist()} vs expected {(n * p).tolist()}"


def _check_itm(draw, backend):
    dtype = draw.dtype()
    small = backend == "triton"
    b, d = draw.size("B", 32 if small else 64), draw.size("D", 64)
    tokens = draw.integer("image_tokens", 2, 8) if draw.flag("image_token_features") else 0
    gathered = draw.integer("ranks", 1, 3)
    offset = draw.integer("rank", 0, gathered - 1) * b
    normalize, mag = feature_draws(draw, dtype)
    image_keys = features(draw, "image_keys", (b * gathered, tokens, d) if tokens else (b * gathered, d), dtype,
                          normalize=normalize, scale=mag)
    text_keys = features(draw, "text_keys", (b * gathered, d), dtype, normalize=normalize, scale=mag)
    img, txt = image_keys[offset:offset + b], text_keys[offset:offset + b]
    scale = scale_for(draw, dtype, max_similarity(image_keys, text_keys))
    kw = {"image_keys": image_keys.to(dtype), "text_keys": text_keys.to(dtype)} if gathered > 1 else {}
    if gathered > 1:
        kw["offset"] = offset
    if draw.flag("ids", 0.3):
        key_ids = draw.randint(0, draw.integer("distinct_ids", 1, b * gathered), (b * gathered,))
        kw["ids"], kw["key_ids"] = key_ids[offset:offset + b], key_ids
        pos_t = pos_i = kw["ids"][:, None] == key_ids[None]
    else:
        pos_t = pos_i = torch.arange(offset, offset + b)[:, None] == torch.arange(b * gathered)[None]
    state = draw.randint(0, 2 ** 62, ()).item()
    with mmkernels.backend(backend):
        neg_text, neg_image = mmkernels.itm_hard_negatives(img.to(dtype), txt.to(dtype), scale,
                                                           generator=torch.Generator().manual_seed(state), **kw)
        gen = torch.Generator().manual_seed(state)
        seeds = [itc_random.draw_seed(gen, torch.device("cpu")) for _ in range(2)]
        one_way = {"positive_ids": kw["ids"], "key_ids": kw["key_ids"]} if "ids" in kw else \
            {"targets": torch.arange(offset, offset + b)}
        want_text = mmkernels.sample_hard_negatives(img.to(dtype), text_keys.to(dtype), scale, seed=seeds[0],
                                                    **one_way)
        want_image = mmkernels.sample_hard_negatives(txt.to(dtype), image_keys.to(dtype), scale, seed=seeds[1],
                                                     **one_way)
    assert torch.equal(neg_text, want_text), "image->text negatives differ from sample_hard_negatives with its seed"
    assert torch.equal(neg_image, want_image), "text->image negatives differ from sample_hard_negatives with its seed"
    for neg, pos, what in ((neg_text, pos_t, "negative texts"), (neg_image, pos_i, "negative images")):
        assert neg.shape == (b,) and neg.dtype == torch.int64, what
        has = ~pos.all(1)
        assert bool((neg[has] >= 0).all()) and not bool(pos[has, neg[has]].any()), f"{what}: a positive was drawn"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("tier", TIERS)
def test_sample_hard_negatives(tier, backend, request):
    run(request, tier, lambda draw: _check_sample(draw, backend))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("tier", TIERS)
def test_itm_hard_negatives(tier, backend, request):
    run(request, tier, lambda draw: _check_itm(draw, backend))
