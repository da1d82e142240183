"""Randomized tests of ``multimodal_attention`` under ``MultimodalMask`` built from random metadata.

Each case draws the batch, the query and key/value heads (grouped-query included), the sequence
lengths and head dim (odd, 1, non-multiples of the tiles), the dtype, the magnitude of the scores
(log-uniform) and of the values, the softmax scale, non-contiguous inputs, and a mask: full,
causal, key padding, prefix-LM, BLIP-2 ITC/ITM/ITG, InstructBLIP, BEiT-3 captioning, packed
``cu_seqlens`` (causal or not), image spans inside a causal sequence (with packing), or a custom
rule table over up to three modalities with padding segments and fewer queries than keys. It
checks the output and the gradients of q, k and v against the float64 reference with the 2x-eager
rule; rows that see no key must give 0, never NaN.
"""
from __future__ import annotations

import math

import pytest
import torch

import mmkernels
from mmkernels import MultimodalMask
from mmkernels.testing.property_check import check_op

from tests.property.common import attention_allowance, BACKENDS, TIERS, layouts, magnitude, run

MASKS = ("full", "causal", "key_padding", "prefix_lm", "blip2", "instructblip", "beit3_captioning", "packed",
         "image_spans", "custom")


def _lengths(draw, b: int, s: int) -> torch.Tensor:
    """``[B]`` lengths in ``[0, s]``, favouring full and empty samples."""
    lengths = draw.randint(0, s + 1, (b,))
    if draw.flag("a_full_sample"):
        lengths[0] = s
    return lengths


def _runs(draw, b: int, s: int, nm: int) -> torch.Tensor:
    """``[B, S]`` modality ids in runs of random length."""
    out = torch.empty(b, s, dtype=torch.int64)
    for i in range(b):
        j = 0
        while j < s:
            n = int(draw.randint(1, max(2, s // 2), ()))
            out[i, j:j + n] = int(draw.randint(0, nm, ()))
            j += n
    return out


def _segments(draw, b: int, s: int) -> torch.Tensor:
    """``[B, S]`` non-decreasing segment ids (packed samples), -1 for trailing padding."""
    seg = torch.cumsum((draw.randint(0, 100, (b, s)) < 15).long(), 1)
    pad = _lengths(draw, b, s)
    return torch.where(torch.arange(s)[None] < pad[:, None], seg, torch.full_like(seg, -1))


def _mask(draw, kind: str, b: int, s: int):
    """``(mask, B, Sq, Sk)``; packed masks have batch 1."""
    if kind == "full":
        return None, b, s, s
    if kind == "causal":
        return MultimodalMask.causal(b, s), b, s, s
    if kind == "key_padding":
        return MultimodalMask.key_padding(_lengths(draw, b, s), s), b, s, s
    if kind == "prefix_lm":
        lengths = _lengths(draw, b, s)
        return MultimodalMask.prefix_lm(torch.minimum(draw.randint(0, s + 1, (b,)), lengths), lengths, s), b, s, s
    if kind in ("blip2", "instructblip", "beit3_captioning"):
        nq = draw.integer("first_part_tokens", 1, s - 1) if s > 1 else 1
        text = max(s - nq, 1)
        lengths = _lengths(draw, b, text)
        if kind == "blip2":
            mask = MultimodalMask.blip2(nq, lengths, text, draw.choice("objective", ["itc", "itm", "itg"]))
        else:
            mask = getattr(MultimodalMask, kind)(nq, lengths, text)
        return mask, b, nq + text, nq + text
    if kind == "packed":
        total = draw.integer("packed_tokens", 0, s)
        cuts = sorted(draw.randint(0, total + 1, (draw.integer("samples", 1, 5) - 1,)).tolist())
        cu = torch.tensor([0] + cuts + [total], dtype=torch.int32)
        return MultimodalMask.packed(cu, draw.flag("packed_causal"), seq_len=s), 1, s, s
    if kind == "image_spans":
        seg = _segments(draw, b, s) if draw.flag("image_spans_packed") else None
        return MultimodalMask.image_spans_in_causal(_runs(draw, b, s, 2), segment_ids=seg), b, s, s
    nm = draw.integer("modalities", 1, 3)
    rules = draw.randint(0, 4, (nm, nm))
    draw.note("rules", rules.tolist())
    sq = draw.integer("queries", 1, s) if draw.flag("fewer_queries", 0.4) else s
    k_mod, k_seg = _runs(draw, b, s, nm), _segments(draw, b, s)
    mask = MultimodalMask(k_mod[:, s - sq:], rules, segment_ids=k_seg[:, s - sq:], key_modality_ids=k_mod,
                          key_segment_ids=k_seg)
    return mask, b, sq, s


def _check_attention(draw, backend):
    dtype = draw.dtype()
    small = backend == "triton"
    kind = draw.choice("mask", MASKS)
    b, s = draw.integer("B", 1, 2 if small else 3), draw.size("S", 48 if small else 128, lo=2 if kind in (
        "blip2", "instructblip", "beit3_captioning") else 1)
    mask, b, sq, sk = _mask(draw, kind, b, s)
    hkv = draw.integer("kv_heads", 1, 2)
    hq = hkv * draw.integer("query_heads_per_kv_head", 1, 2 if small else 3)
    d = draw.size("D", 96 if small else 128, tiles=(32, 64, 88))
    scale = None if draw.flag("default_scale") else draw.log_uniform("scale", 0.01, 1.0)
    # scores scale * q.k of a log-uniform magnitude; values of their own magnitude
    score = magnitude(draw, "max_score_magnitude", dtype, 1e-2, 1e3)
    qk = math.sqrt(score / ((scale if scale is not None else d ** -0.5) * math.sqrt(d)))
    values = {"q": draw.randn(b, hq, sq, d, scale=qk, dtype=dtype), "k": draw.randn(b, hkv, sk, d, scale=qk, dtype=dtype),
              "v": draw.randn(b, hkv, sk, d, scale=magnitude(draw, "v_magnitude", dtype, 1e-3, 1e3), dtype=dtype)}

    def fn(q, k, v):
        return mmkernels.multimodal_attention(q, k, v, mask, scale=scale)

    cotangent = draw.randn(b, hq, sq, d, dtype=dtype)
    check_op(fn, values, dtype=dtype, backend=backend, grads=["q", "k", "v"],
             layouts=layouts(draw, ["q", "k", "v"], {}), cotangent=cotangent,
             allowances=attention_allowance(fn, values, cotangent, dtype, scale))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tier", TIERS)
def test_multimodal_attention(tier, backend, request):
    run(request, tier, lambda draw: _check_attention(draw, backend))
