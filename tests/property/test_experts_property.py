"""Randomized tests of the modality experts: ``modality_linear``, ``modality_ffn`` (every
activation, and the sub-LN form ``modality_ffn_subln``) and ``modality_layer_norm``.

Each case draws the token layout (``[T]`` or ``[B, S]`` tokens, zero tokens included), the number
of experts and which of them own no token, ids as a tensor or as a split position, weights as one
``[E, ...]`` tensor or one tensor per expert, biases or none, the dtype, the magnitudes of the
activations and weights (log-uniform, bounded so fp16 intermediates stay below 65504) and
non-contiguous inputs, and checks the output and every gradient against the float64 reference with
the 2x-eager rule. The modules ``MultiwayLinear`` / ``MultiwayFFN`` / ``MultiwayLayerNorm`` are
these functional ops on their parameters, so they are covered here through the ops.
"""
from __future__ import annotations

import math

import pytest
import torch

import mmkernels
from mmkernels.experts import activations
from mmkernels.testing.property_check import check_op

from tests.property.common import BACKENDS, TIERS, layouts, magnitude, run


#: The smallest contraction (hidden sizes summed over, LayerNorm's width) drawn. Below it a
#: gradient is a sum of one to three rounded terms (or a LayerNorm of two values near their
#: mean), eager's error is near zero by chance as often as not, and the twice-eager rule
#: compares two coin tosses; the ops are tested at those sizes in tests/experts/ on fixed cases.
MIN_REDUCTION = 4


def _tokens(draw, backend):
    """``(lead shape, ids: tensor | int split, num_experts)``."""
    small = backend == "triton"
    e = draw.integer("experts", 1, 4)
    split = e == 2 and draw.flag("split_position", 0.25)
    if split or draw.flag("batched_tokens"):
        lead = (draw.size("B", 3), draw.size("S", 24 if small else 64))
    else:
        lead = (draw.size("T", 48 if small else 160, lo=0 if draw.flag("maybe_empty", 0.1) else 1),)
    if split:
        return lead, draw.integer("split", 0, lead[1]), e
    present = [x for x in range(e) if draw.flag(f"expert{x}_has_tokens", 0.75)] or [draw.integer("only", 0, e - 1)]
    draw.note("experts_with_tokens", present)
    pick = draw.randint(0, len(present), lead)
    ids = torch.tensor(present, dtype=torch.int64)[pick]
    return lead, ids.to(draw.choice("ids_dtype", [torch.int32, torch.int64])), e


def _expert_params(draw, name, tensor, per_expert: bool):
    """``tensor [E, ...]`` as one value or as ``E`` values ``name0, name1, ...``."""
    if not per_expert:
        return {name: tensor}
    return {f"{name}{e}": tensor[e] for e in range(tensor.shape[0])}


def _gather(kw, name, e, per_expert):
    if name not in kw and f"{name}0" not in kw:
        return None
    return [kw[f"{name}{i}"] for i in range(e)] if per_expert else kw[name]


def _check_linear(draw, backend):
    dtype = draw.dtype()
    lead, ids, e = _tokens(draw, backend)
    # contractions of at least MIN_REDUCTION terms (see its note)
    h_in, h_out = draw.size("H_in", 96, lo=MIN_REDUCTION), draw.size("H_out", 96)
    x_mag = magnitude(draw, "x_magnitude", dtype, 1e-2, 1e2)
    out_mag = magnitude(draw, "out_magnitude", dtype)
    w = draw.randn(e, h_out, h_in, scale=out_mag / (x_mag * math.sqrt(h_in)), dtype=dtype)
    values = {"x": draw.randn(*lead, h_in, scale=x_mag, dtype=dtype)}
    per_expert = draw.flag("per_expert_tensors", 0.3)
    values.update(_expert_params(draw, "w", w, per_expert))
    if draw.flag("bias"):
        values.update(_expert_params(draw, "b", draw.randn(e, h_out, scale=out_mag, dtype=dtype), per_expert))

    def fn(x, **kw):
        return mmkernels.modality_linear(x, ids, _gather(kw, "w", e, per_expert), _gather(kw, "b", e, per_expert))

    grads = list(values)
    check_op(fn, values, dtype=dtype, backend=backend, grads=grads,
             layouts=layouts(draw, ["x", "w"], {"x": len(lead) + 1, "w": 3 if not per_expert else 2}),
             cotangent=draw.randn(*lead, h_out, dtype=dtype))


def _check_ffn(draw, backend, subln: bool):
    dtype = draw.dtype()
    lead, ids, e = _tokens(draw, backend)
    act = draw.choice("activation", activations.ACTIVATIONS)
    h_in, f, h_out = (draw.size("H_in", 80, lo=MIN_REDUCTION), draw.size("F", 96, lo=MIN_REDUCTION),
                      draw.size("H_out", 80))
    fi = 2 * f if act == "swiglu" else f
    x_mag = magnitude(draw, "x_magnitude", dtype, 1e-2, 1e2)
    # the first layer's pre-activation and the output are drawn to reach the same magnitude, so
    # swiglu's product of two pre-activations stays below the drawn bound as well
    h_mag = magnitude(draw, "hidden_magnitude", dtype, 1e-2, 1e2)
    per_expert = draw.flag("per_expert_tensors", 0.3)
    values = {"x": draw.randn(*lead, h_in, scale=x_mag, dtype=dtype)}
    values.update(_expert_params(draw, "w_in", draw.randn(e, fi, h_in, scale=h_mag / (x_mag * math.sqrt(h_in)),
                                                          dtype=dtype), per_expert))
    bias = draw.flag("bias")
    if bias:
        values.update(_expert_params(draw, "b_in", draw.randn(e, fi, scale=h_mag, dtype=dtype), per_expert))
    act_mag = h_mag * h_mag if act == "swiglu" else h_mag
    if subln:
        values.update(_expert_params(draw, "norm_w", draw.randn(e, f, dtype=dtype), per_expert))
        if draw.flag("norm_bias"):
            values.update(_expert_params(draw, "norm_b", draw.randn(e, f, dtype=dtype), per_expert))
        act_mag = 1.0
    out_mag = magnitude(draw, "out_magnitude", dtype, 1e-3, 1e3)
    values.update(_expert_params(draw, "w_out", draw.randn(e, h_out, f, scale=out_mag / (act_mag * math.sqrt(f)),
                                                           dtype=dtype), per_expert))
    if bias:
        values.update(_expert_params(draw, "b_out", draw.randn(e, h_out, scale=out_mag, dtype=dtype), per_expert))

    def fn(x, **kw):
        g = {n: _gather(kw, n, e, per_expert) for n in ("w_in", "b_in", "w_out", "b_out", "norm_w", "norm_b")}
        if subln:
            return mmkernels.modality_ffn_subln(x, ids, g["w_in"], g["b_in"], g["norm_w"], g["norm_b"],
                                                g["w_out"], g["b_out"], activation=act)
        return mmkernels.modality_ffn(x, ids, g["w_in"], g["b_in"], g["w_out"], g["b_out"], activation=act)

    check_op(fn, values, dtype=dtype, backend=backend, grads=list(values),
             layouts=layouts(draw, ["x", "w_in", "w_out"], {"x": len(lead) + 1, "w_in": 3 - per_expert,
                                                             "w_out": 3 - per_expert}),
             cotangent=draw.randn(*lead, h_out, dtype=dtype))


def _check_layer_norm(draw, backend):
    dtype = draw.dtype()
    lead, ids, e = _tokens(draw, backend)
    h = draw.size("H", 160 if backend != "triton" else 96, lo=MIN_REDUCTION)
    # weight and bias in x's dtype, or float32 beside a 16-bit x (mixed precision)
    w_dtype = torch.float32 if dtype != torch.float32 and draw.flag("float32_weights") else dtype
    x_mag = draw.log_uniform("x_magnitude", 1e-3, min(1e4, 2.0 ** 7 if dtype == torch.float16 else 1e4))
    shift = draw.choice("mean_offset", [0.0, 0.0, 1.0, 10.0]) * x_mag
    per_expert = draw.flag("per_expert_tensors", 0.3)
    values = {"x": draw.randn(*lead, h, scale=x_mag, dtype=dtype) + shift}
    values["x"] = values["x"].to(dtype).double()
    values.update(_expert_params(draw, "w", draw.randn(e, h, dtype=w_dtype), per_expert))
    if draw.flag("bias"):
        values.update(_expert_params(draw, "b", draw.randn(e, h, dtype=w_dtype), per_expert))
    eps = draw.choice("eps", [1e-5, 1e-6, 1e-12])

    def fn(x, **kw):
        return mmkernels.modality_layer_norm(x, ids, _gather(kw, "w", e, per_expert), _gather(kw, "b", e, per_expert),
                                             eps=eps)

    dtypes = {n: (dtype if n == "x" else w_dtype) for n in values}
    check_op(fn, values, dtype=dtype, backend=backend, grads=list(values), dtypes=dtypes,
             op="modality_layer_norm", layouts=layouts(draw, ["x"], {"x": len(lead) + 1}),
             cotangent=draw.randn(*lead, h, dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tier", TIERS)
def test_modality_linear(tier, backend, request):
    run(request, tier, lambda draw: _check_linear(draw, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tier", TIERS)
def test_modality_ffn(tier, backend, request):
    run(request, tier, lambda draw: _check_ffn(draw, backend, subln=draw.flag("subln", 0.25)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tier", TIERS)
def test_modality_layer_norm(tier, backend, request):
    run(request, tier, lambda draw: _check_layer_norm(draw, backend))
