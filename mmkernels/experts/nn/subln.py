"""The expert FFN with a LayerNorm between its two layers (torchscale's ``subln``, BEiT-3's default):
:func:`modality_ffn_subln`, ``fc2(LN_e(act(fc1(x))))`` per expert.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import activations
from ..grouped_mm.api import modality_linear
from ..layer_norm.api import modality_layer_norm


def _stacked_shape(t, name: str) -> tuple[int, ...]:
    """The ``[E, ...]`` shape of ``t``: a tensor, or a sequence of ``E`` per-expert tensors."""
    if isinstance(t, torch.Tensor):
        return tuple(t.shape)
    if isinstance(t, (list, tuple, nn.ParameterList)) and len(t) and isinstance(t[0], torch.Tensor):
        return (len(t), *t[0].shape)
    raise TypeError(f"{name} must be a tensor or a sequence of per-expert tensors, got {type(t).__name__}")


def modality_ffn_subln(x: torch.Tensor, modality_ids, w_in, b_in, norm_weight, norm_bias, w_out, b_out,
                       activation: str = "gelu", eps: float = 1e-5) -> torch.Tensor:
    """``y[t] = LN_e(act(x[t] @ w_in[e].T + b_in[e])) @ w_out[e].T + b_out[e]`` with ``e = ids[t]``,
    ``LN_e`` a LayerNorm over the ``F`` intermediate features with expert ``e``'s scale and shift.

    Args:
        x, modality_ids, w_in, b_in, w_out, b_out, activation: as in :func:`modality_ffn`
            (``w_in [E, Fi, H_in]``, ``Fi = 2F`` for ``swiglu``; ``w_out [E, H_out, F]``).
        norm_weight: ``[E, F]`` (or ``E`` tensors ``[F]``), the LayerNorm's scale.
        norm_bias: ``[E, F]`` or ``None``.
        eps: the LayerNorm's epsilon.

    Returns:
        ``[..., H_out]`` in x's dtype (under autocast: the second layer's autocast dtype);
        gradients flow to x and every weight, bias and LayerNorm parameter. Autograd keeps the
        first layer's output, the activation and the normalised activation (``3 T F``
        elements, ``T (Fi + 2F)`` for swiglu), as the unfused model does.

    The fused FFN kernel cannot normalise between its GEMMs (a row's statistics span every
    column tile of the first GEMM), so this is routed ops in turn: the first layer
    (:func:`modality_linear`), the activation, the per-modality LayerNorm
    (:func:`modality_layer_norm`) and the second layer, each reading and writing tokens in
    place: no split, no concatenation, no host synchronisation.
    """
    activations.check_activation(activation)
    # shapes only: the three ops check (and read) the tensors themselves, stacking per-expert
    # lists once each, with the per-expert weight-gradient masks taken from the lists
    w_in_s, w_out_s, nw_s = (_stacked_shape(t, n) for t, n in ((w_in, "w_in"), (w_out, "w_out"),
                                                               (norm_weight, "norm_weight")))
    if len(w_in_s) != 3 or len(w_out_s) != 3:
        raise ValueError(f"w_in and w_out must be [E, Fi, H_in] and [E, H_out, F], got shapes {w_in_s} and {w_out_s}")
    if activation == "swiglu" and w_in_s[1] % 2:
        raise ValueError(f"swiglu needs an even first-layer width (w_in [E, 2F, H_in]), got w_in.shape[1] = "
                         f"{w_in_s[1]}")
    f = activations.inner_width(activation, w_in_s[1])
    e = w_in_s[0]
    if nw_s != (e, f):
        raise ValueError(f"norm_weight must have shape [E, F] = [{e}, {f}] (the activation's width), got {nw_s}")
    if w_out_s[0] != e or w_out_s[2] != f:
        raise ValueError(f"w_out must have shape [E, H_out, F] with E = {e}, F = {f}, got {w_out_s}")
    h = modality_linear(x, modality_ids, w_in, b_in)
    a = activations.apply(activation, h)
    n = modality_layer_norm(a, modality_ids, norm_weight, norm_bias, eps)
    return modality_linear(n, modality_ids, w_out, b_out)
