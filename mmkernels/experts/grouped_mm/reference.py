"""Plain-PyTorch grouped GEMM of the modality experts: the definition of "correct".

Written the way a model author would: a loop over experts, each selecting its tokens with a
boolean mask and writing its output rows back. Tests evaluate it in float64.

Shapes: ``x [T, H_in]`` (or ``[..., H_in]``), ``ids`` the matching ``[T]`` (``[...]``) integer
modality ids in ``[0, E)``; ``weight [E, H_out, H_in]`` (``nn.Linear`` layout per expert),
``bias [E, H_out]``; the FFN's ``w_in [E, Fi, H_in]`` (``Fi = 2F`` for swiglu), ``b_in [E, Fi]``,
``w_out [E, H_out, F]``, ``b_out [E, H_out]``. Outputs have ``x``'s dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import activations


def modality_linear_reference(x: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y[t] = x[t] @ weight[ids[t]].T + bias[ids[t]]``: ``[..., H_in]`` -> ``[..., H_out]``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    ids2 = ids.reshape(-1)
    out = x2.new_zeros(x2.shape[0], weight.shape[1])
    for e in range(weight.shape[0]):
        sel = ids2 == e
        out[sel] = F.linear(x2[sel], weight[e], None if bias is None else bias[e])
    return out.reshape(*lead, weight.shape[1])


def modality_ffn_reference(x: torch.Tensor, ids: torch.Tensor, w_in: torch.Tensor,
                           b_in: torch.Tensor | None, w_out: torch.Tensor, b_out: torch.Tensor | None,
                           activation: str = "gelu") -> torch.Tensor:
    """``y[t] = act(x[t] @ w_in[e].T + b_in[e]) @ w_out[e].T + b_out[e]`` with ``e = ids[t]``."""
    activations.check_activation(activation)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    ids2 = ids.reshape(-1)
    out = x2.new_zeros(x2.shape[0], w_out.shape[1])
    for e in range(w_in.shape[0]):
        sel = ids2 == e
        h = F.linear(x2[sel], w_in[e], None if b_in is None else b_in[e])
        out[sel] = F.linear(activations.apply(activation, h), w_out[e], None if b_out is None else b_out[e])
    return out.reshape(*lead, w_out.shape[1])
