"""Plain-PyTorch multimodal attention: the definition of "correct" for the attention family.

It materialises the ``[B, Hq, Sq, Sk]`` scores and the dense ``[B, 1, Sq, Sk]`` mask
(:meth:`MultimodalMask.to_dense`), exactly what a model author would write with SDPA and a
boolean mask, except that a query row that sees no key gives output 0, ``lse = -inf`` and zero
gradient instead of NaN. Tests evaluate it in float64 and compare every backend with it.
"""
from __future__ import annotations


import torch

from .. import _validation as check
from .mask import MultimodalMask


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax and ``lse`` run in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(q, k, v, mask, scale) -> float:
    """Validate ``q [B, Hq, Sq, D]``, ``k``/``v [B, Hkv, Sk, D]`` and the mask; return the scale.

    Raises ``TypeError``/``ValueError`` naming the argument (shared by every backend).
    """
    check.attention_qkv(q, k, v)
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if hq % hkv != 0:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the number of key/value "
                         f"heads ({hkv}) for grouped-query attention")
    if mask is not None:
        if not isinstance(mask, MultimodalMask):
            raise TypeError(f"mask must be a MultimodalMask or None, got {type(mask).__name__}")
        if mask.shape != (b, sq, sk):
            raise ValueError(f"mask has shape (B, Sq, Sk) = {mask.shape} but q/k give {(b, sq, sk)}")
        if mask.device != q.device:
            raise ValueError(f"mask is on {mask.device} but q is on {q.device}; use mask.to(q.device)")
    return check.softmax_scale(scale, d)


def multimodal_attention_reference(q, k, v, mask=None, *, scale=None, return_lse=False):
    """Masked softmax attention with grouped-query heads, materialising everything.

    Args:
        q: ``[B, Hq, Sq, D]`` float32/bfloat16/float16/float64 (any strides).
        k, v: ``[B, Hkv, Sk, D]``, same dtype and device; ``Hq % Hkv == 0`` and query head ``h``
            uses key/value head ``h // (Hq // Hkv)``.
        mask: a :class:`MultimodalMask` of shape ``(B, Sq, Sk)`` on q's device, or ``None`` (full
            attention).
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return ``lse [B, Hq, Sq]`` (float32; float64 for float64 inputs), the
            log-sum-exp of the scaled, masked scores of each row.

    Returns:
        ``out [B, Hq, Sq, D]`` in q's dtype (and ``lse``). A row whose query sees no key gets
        ``out = 0`` and ``lse = -inf``, and passes zero gradient to q, k and v (never NaN).
    """
    scale = check_inputs(q, k, v, mask, scale)
    hq, hkv = q.shape[1], k.shape[1]
    cdt = compute_dtype(q.dtype)
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    if hq != hkv:
        kc = kc.repeat_interleave(hq // hkv, dim=1)
        vc = vc.repeat_interleave(hq // hkv, dim=1)
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale             # [B, Hq, Sq, Sk]
    if mask is None:
        visible = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=q.device)
    else:
        visible = mask.to_dense()                                        # [B, 1, Sq, Sk]
    neg_inf = torch.full((), float("-inf"), dtype=cdt, device=q.device)
    masked = torch.where(visible, scores, neg_inf)
    # The shift is a constant for autograd (softmax does not depend on it); rows that see nothing
    # use shift 0 so exp(-inf - 0) = 0 and no inf - inf appears, forward or backward.
    row_max = masked.amax(dim=-1, keepdim=True).detach()
    sees = torch.isfinite(row_max)
    shift = torch.where(sees, row_max, torch.zeros_like(row_max))
    p = torch.exp(masked - shift)
    denom = p.sum(dim=-1, keepdim=True)
    safe_denom = torch.where(sees, denom, torch.ones_like(denom))
    out = torch.matmul(p / safe_denom, vc).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(sees, shift + torch.log(safe_denom), neg_inf)[..., 0]
    return out, lse
