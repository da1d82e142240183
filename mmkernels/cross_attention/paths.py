"""The cross-attention paths built from PyTorch's own fast ops, for backend ``auto`` (see ``_dispatch``).

* ``"sdpa"``: ``scaled_dot_product_attention`` with the key padding as a ``[B, 1, 1, Lk]``
  boolean mask and attention dropout through its own ``dropout_p`` (drawn from the device's
  default generator, so not when the call names a ``generator``).

:func:`eligibility` says whether it can run a call (``None``) or why not. Queries whose keys
are all padding give 0 and zero gradient, as on every path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention.paths import fp32_gradient_reason, sdpa_fallback_reason

PATHS = ("sdpa",)

#: query counts up to this are "few" (the Q-Former's 32, CoCa's 256)
FEW_QUERIES = 256
#: key counts up to this are "short" (a ViT's image tokens at 224-448 px)
SHORT_KEYS = 1024


def shape_class(lq: int, lk: int, head_dim: int, dropout: bool) -> str:
    """The shape class of a call, e.g. ``"lq<=256:lk<=1024"`` or ``"lq<=256:lk>1024:dropout"``.
    ``head_dim`` does not split the classes (it is at most 128 on every path)."""
    q = "lq<=256" if lq <= FEW_QUERIES else "lq>256"
    k = "lk<=1024" if lk <= SHORT_KEYS else "lk>1024"
    return f"{q}:{k}" + (":dropout" if dropout else "")


def _masks(q, k, key_padding_mask):
    """The keys SDPA may see (bool ``[B, 1, 1, Lk]`` or ``None``) and the samples with at least one
    key (bool ``[B]`` or ``None``). A sample whose keys are all padding lets SDPA see them all,
    so its rows stay finite; its output is zeroed afterwards."""
    if key_padding_mask is None:
        return None, None
    any_key = key_padding_mask.any(dim=-1)
    keys = key_padding_mask | ~any_key[:, None]
    return keys[:, None, None, :], any_key


def eligibility(q, k, v, key_padding_mask, scale: float, dropout_p: float,
                generator: torch.Generator | None, return_lse: bool) -> dict[str, str | None]:
    """``{"sdpa": None or the reason it cannot run this call}``."""
    if return_lse:
        why = "SDPA does not return the log-sum-exp (return_lse=True)"
    elif dropout_p > 0 and generator is not None:
        why = "SDPA draws its dropout from the default generator, not the given one"
    else:
        keys = None  # a probe for SDPA's selector (not consulted inside a compiled graph)
        if key_padding_mask is not None and not torch.compiler.is_compiling():
            keys = torch.empty((q.shape[0], 1, 1, k.shape[2]), dtype=torch.bool, device=q.device)
        # a reason it cannot run first: use_path runs past a NotForAuto reason only
        why = (sdpa_fallback_reason(q, k, v, keys, dropout_p, False, False, scale)
               or fp32_gradient_reason(q, k, v, "SDPA"))
    return {"sdpa": why}


def sdpa_cross_attention(q, k, v, key_padding_mask, scale: float, dropout_p: float) -> torch.Tensor:
    """Cross-attention through ``scaled_dot_product_attention``; rows of samples without a key are
    multiplied by 0 (zero output, and zero gradient through SDPA's backward)."""
    keys, any_key = _masks(q, k, key_padding_mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, dropout_p=dropout_p, scale=scale)
    if any_key is not None:
        out = out * any_key[:, None, None, None].to(out.dtype)
    return out
