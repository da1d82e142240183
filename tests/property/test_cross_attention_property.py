"""Randomized tests of ``cross_attention`` and ``fused_kv_projection``.

``cross_attention``: each case draws the batch, heads, query and key lengths, head dim (odd, 1,
non-multiples of the tiles, at most 128), the dtype, the score and value magnitudes
(log-uniform), the softmax scale, a key padding mask (samples with every key padded included),
attention dropout (the same generator state gives the same mask on every backend, so the float64
reference drops the same entries) and non-contiguous inputs. ``fused_kv_projection``: the number
of layers and heads, image tokens and width, biases, the magnitudes and non-contiguous features;
its K/V views are checked together. Outputs and every gradient are compared with the float64
reference under the 2x-eager rule.
"""
from __future__ import annotations

import math

import pytest
import torch

import mmkernels
from mmkernels.testing.property_check import check_op

from tests.property.common import attention_allowance, BACKENDS, TIERS, layouts, magnitude, run


def _check_cross_attention(draw, backend):
    dtype = draw.dtype()
    small = backend == "triton"
    b, h = draw.integer("B", 1, 3), draw.integer("H", 1, 3 if small else 4)
    lq, lk = draw.size("Lq", 40 if small else 96), draw.size("Lk", 64 if small else 160)
    d = draw.size("D", 96 if small else 128, tiles=(32, 64, 88))
    scale = None if draw.flag("default_scale") else draw.log_uniform("scale", 0.01, 1.0)
    score = magnitude(draw, "max_score_magnitude", dtype, 1e-2, 1e3)
    qk = math.sqrt(score / ((scale if scale is not None else d ** -0.5) * math.sqrt(d)))
    values = {"q": draw.randn(b, h, lq, d, scale=qk, dtype=dtype), "k": draw.randn(b, h, lk, d, scale=qk, dtype=dtype),
              "v": draw.randn(b, h, lk, d, scale=magnitude(draw, "v_magnitude", dtype, 1e-3, 1e3), dtype=dtype)}
    padding = None
    if draw.flag("key_padding"):
        lengths = draw.randint(0, lk + 1, (b,))
        padding = torch.arange(lk)[None] < lengths[:, None]
        draw.note("key_lengths", lengths.tolist())
    dropout = draw.choice("dropout", [0.0, 0.0, 0.1, 0.5])
    state = draw.randint(0, 2 ** 62, ()).item()

    def fn(q, k, v):
        # a fresh generator in the same state for every run: the same dropout mask everywhere
        return mmkernels.cross_attention(q, k, v, key_padding_mask=padding, scale=scale, dropout_p=dropout,
                                         generator=torch.Generator().manual_seed(state))

    cotangent = draw.randn(b, h, lq, d, dtype=dtype)
    check_op(fn, values, dtype=dtype, backend=backend, grads=["q", "k", "v"],
             layouts=layouts(draw, ["q", "k", "v"], {}), cotangent=cotangent,
             allowances=attention_allowance(fn, values, cotangent, dtype, scale))


def _check_fused_kv(draw, backend):
    dtype = draw.dtype()
    small = backend == "triton"
    b, lk, c = draw.integer("B", 1, 3), draw.size("Lk", 40 if small else 96), draw.size("C", 96)
    layers, heads = draw.integer("layers", 1, 3), draw.integer("heads", 1, 4)
    hd = heads * draw.size("head_dim", 32, tiles=(8, 16))
    x_mag = magnitude(draw, "x_magnitude", dtype, 1e-2, 1e2)
    out_mag = magnitude(draw, "out_magnitude", dtype, 1e-3, 1e3)
    if dtype == torch.float16:  # weights up to 1e3: beyond, an open bug (README, "Numerics")
        out_mag = min(out_mag, 1e3 * x_mag * math.sqrt(c))
    values = {"image_embeds": draw.randn(b, lk, c, scale=x_mag, dtype=dtype)}
    bias = draw.flag("bias")
    for i in range(layers):
        for kv in ("k", "v"):
            values[f"w{kv}{i}"] = draw.randn(hd, c, scale=out_mag / (x_mag * math.sqrt(c)), dtype=dtype)
            if bias:
                values[f"b{kv}{i}"] = draw.randn(hd, scale=out_mag, dtype=dtype)

    def fn(image_embeds, **w):
        weights = [(w[f"wk{i}"], w[f"wv{i}"]) for i in range(layers)]
        biases = [(w[f"bk{i}"], w[f"bv{i}"]) for i in range(layers)] if bias else None
        kv = mmkernels.fused_kv_projection(image_embeds, weights, biases, num_heads=heads)
        return torch.cat([t.reshape(-1) for pair in kv for t in pair])

    check_op(fn, values, dtype=dtype, backend=backend, grads=list(values),
             layouts=layouts(draw, ["image_embeds"], {"image_embeds": 3}),
             cotangent=draw.randn(layers * 2 * b * lk * hd, dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tier", TIERS)
def test_cross_attention(tier, backend, request):
    run(request, tier, lambda draw: _check_cross_attention(draw, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tier", TIERS)
def test_fused_kv_projection(tier, backend, request):
    run(request, tier, lambda draw: _check_fused_kv(draw, backend))
