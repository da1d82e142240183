"""The per-modality LayerNorm users call: ``modality_layer_norm``.

VLMo normalises each modality with its own LayerNorm (``norm2_text``, ``norm2_imag``,
``norm2_vl``); BEiT-3 wraps its LayerNorms in torchscale's ``MultiwayNetwork``. Routed like the
grouped GEMM (same ``modality_ids`` or split position), one kernel normalises every token with
its modality's scale and shift: no split, no concatenation. The module is
:class:`mmkernels.experts.nn.MultiwayLayerNorm`.
"""
from __future__ import annotations

import numbers

import torch

from ... import _autocast
from ... import _validation as check
from ..._validation import backend_for
from ..routing import (check_experts, check_ids, check_x, dense_ids, grad_flags, per_expert, route_tokens,
                       untouched_experts, without_untouched)
from .ops import modality_layer_norm_fwd
from .reference import modality_layer_norm_reference

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def check_norm_param(t, name: str, x: torch.Tensor, like: torch.Tensor | None = None) -> None:
    """A LayerNorm scale or shift ``[E, H]``: floating, on x's device, in x's dtype or float32
    beside bfloat16/float16 ``x``; in ``like``'s dtype when given (the bias beside the weight)."""
    check.tensor(t, name, 2)
    check.floating(t, name)
    check.same_device(("x", x), (name, t))
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but weight has {like.dtype}; they must agree")
    elif t.dtype != x.dtype and not (x.dtype in _LOW_PRECISION and t.dtype == torch.float32):
        raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; it must have x's dtype, or float32 "
                        "beside bfloat16/float16 x")


def check_eps(eps) -> float:
    """A LayerNorm's epsilon: a positive real, as a float."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    return float(eps)


def modality_layer_norm(x: torch.Tensor, modality_ids, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        eps: float = 1e-5) -> torch.Tensor:
    """A LayerNorm with one scale and shift per modality: ``y[t] = norm(x[t]) * weight[e] + bias[e]``.

    ``norm`` subtracts each token's mean over its ``H`` features and divides by the square root
    of their (biased) variance plus ``eps``, as ``nn.LayerNorm(H)``; ``e = ids[t]``.

    Args:
        x: ``[..., H]`` float32/bfloat16/float16 (float64 on the cpu/reference backends).
        modality_ids: as in :func:`mmkernels.modality_linear`: an int tensor shaped
            ``x.shape[:-1]`` with values in ``[0, E)``, or an int split position for
            ``x [B, S, H]`` with two experts.
        weight: ``[E, H]``, ``1 <= E <= 8``, or a sequence of ``E`` tensors ``[H]``; x's dtype, or
            float32 beside bfloat16/float16 ``x``.
        bias: ``[E, H]`` (or ``E`` tensors ``[H]``) in weight's dtype, or ``None``.
        eps: added to the variance.

    Returns:
        ``[..., H]`` in x's dtype; gradients flow to ``x``, ``weight`` and ``bias`` (per-expert
        tensors of an expert a split position leaves without tokens get none). The
        backward reuses the per-token mean and reciprocal standard deviation of the forward
        (``2 T`` floats).

    Under ``torch.autocast`` on CUDA, x, weight and bias are cast to float32 first and the
    result is float32, as autocast does for ``F.layer_norm`` there; CPU autocast leaves them.
    """
    skip = untouched_experts(modality_ids, x)
    sources = weight, bias = without_untouched(weight, skip), without_untouched(bias, skip)
    weight, bias = per_expert(weight, "weight"), per_expert(bias, "bias")
    x, weight, bias = _autocast.norm_precision(x, weight, bias)
    check_x(x)
    check_norm_param(weight, "weight", x)
    check.nonempty(weight, "weight")
    e, h = weight.shape
    check_experts(e, "weight")
    if h != x.shape[-1]:
        raise ValueError(f"weight has H = {h} features (shape [E, H] = {tuple(weight.shape)}) but x has "
                         f"{x.shape[-1]}")
    if bias is not None:
        check_norm_param(bias, "bias", x, like=weight)
        if tuple(bias.shape) != (e, h):
            raise ValueError(f"bias must have shape [E, H] = [{e}, {h}] to match weight, got {tuple(bias.shape)}")
    eps = check_eps(eps)
    kind, ids = check_ids(modality_ids, x, e)
    which = backend_for(x)
    if which == "reference":
        return modality_layer_norm_reference(x, dense_ids(kind, ids, x), weight, bias, eps)
    perm, offsets = route_tokens(kind, ids, x, e, which)
    y, _, _ = modality_layer_norm_fwd(x.reshape(-1, h), weight, bias, perm, offsets, eps,
                                      grad_flags(*sources, e), which)
    return y.reshape(x.shape)
