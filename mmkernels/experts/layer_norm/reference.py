"""Plain-PyTorch per-modality LayerNorm: the definition of "correct".

A loop over experts, each normalising its tokens (selected with a boolean mask) with its own
scale and shift. Shapes: ``x [..., H]``, ``ids`` the matching ``[...]`` integer modality ids in
``[0, E)``, ``weight [E, H]``, ``bias [E, H]``. Tests evaluate it in float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def modality_layer_norm_reference(x: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor,
                                  bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``y[t] = layer_norm(x[t]) * weight[e] + bias[e]`` with ``e = ids[t]`` (VLMo ``norm2_text`` /
    ``norm2_imag`` / ``norm2_vl``, BEiT-3 multiway LayerNorms): ``[..., H]`` -> ``[..., H]``.

    The statistics are over the last dimension, biased variance, as ``nn.LayerNorm``."""
    lead = x.shape[:-1]
    h = x.shape[-1]
    x2 = x.reshape(-1, h)
    ids2 = ids.reshape(-1)
    out = x2.new_zeros(x2.shape)
    for e in range(weight.shape[0]):
        sel = ids2 == e
        out[sel] = F.layer_norm(x2[sel], (h,), weight[e], None if bias is None else bias[e], eps)
    return out.reshape(*lead, h)
