"""Few-query cross-attention users call: ``cross_attention``."""
from __future__ import annotations

import torch

from .. import _autocast, _dispatch
from ..attention.paths import choose
from . import paths
from .ops import cross_attention_fwd
from .reference import check_inputs, cross_attention_reference, make_seed


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                    dropout_p: float = 0.0, generator: torch.Generator | None = None,
                    return_lse: bool = False):
    """Softmax attention of a few queries over many keys (Q-Former cross-attention, CoCa pooler).

    Args:
        q: ``[B, H, Lq, D]`` float32/bfloat16/float16 (float64 on the cpu and reference
            backends); any strides. Built for ``Lq <= 256``; larger works.
        k, v: ``[B, H, Lk, D]``, same dtype and device; any strides (the per-layer views
            :func:`fused_kv_projection` returns are read in place). ``D <= 128``.
        key_padding_mask: bool ``[B, Lk]``, True = attend, or ``None``.
        scale: softmax scale, default ``1 / sqrt(D)``.
        dropout_p: attention dropout in ``[0, 1)``. On the kernel backends (``cpu``, ``triton``)
            and the reference the mask is a counter-based hash of ``(seed, b, h, i, j)``: forward
            and backward use the same mask, and the same generator state gives the same dropout
            mask on each of them. Under ``auto`` the call may run SDPA's own dropout instead (the
            ``sdpa`` path, only when ``generator`` is ``None``): a different mask, drawn from the
            device's default generator, reproducible under ``torch.manual_seed`` but not equal
            to the kernels' mask.
        generator: where the dropout seed is drawn from (the device's default generator when
            ``None``); drawn on the device, so no host synchronisation.
        return_lse: also return ``lse [B, H, Lq]`` (float32), the log-sum-exp of each row's
            scaled, masked scores (before dropout; for inspection, no gradient).

    Returns:
        ``out [B, H, Lq, D]`` in q's dtype (and ``lse``). A query whose keys are all padding gets
        ``out = 0`` and zero gradient, never NaN.

    Under backend ``auto`` the call runs the path the cross_attention dispatch table names for
    its case (:mod:`mmkernels.cross_attention.paths`: ``sdpa`` or the kernels);
    ``mmkernels.explain()`` shows which. No ``Lq x Lk`` tensor is allocated on the ``cpu`` and
    ``triton`` backends, nor on the ``sdpa`` path beyond the memory budget. Under
    ``torch.autocast`` q, k and v are cast to the autocast dtype first, as for
    ``scaled_dot_product_attention``.
    """
    q, k, v = _autocast.lower_precision(q, k, v)
    scale = check_inputs(q, k, v, key_padding_mask, scale, dropout_p)
    dropout_p = float(dropout_p)
    cls = paths.shape_class(q.shape[2], k.shape[2], q.shape[3], dropout_p > 0)
    path, backend = choose("cross_attention", "cross_attention", q, cls,
                           paths.eligibility(q, k, v, key_padding_mask, scale, dropout_p,
                                             generator, return_lse))
    if path == "sdpa":
        return paths.sdpa_cross_attention(q, k, v, key_padding_mask, scale, dropout_p)
    seed = make_seed(q.device, generator) if dropout_p > 0 else None
    if path == _dispatch.REFERENCE:
        return cross_attention_reference(q, k, v, key_padding_mask, scale=scale, dropout_p=dropout_p,
                                         seed=seed, return_lse=return_lse)
    mask = None if key_padding_mask is None else key_padding_mask.contiguous()
    out, lse, _, _ = cross_attention_fwd(q, k, v, mask, seed, scale, dropout_p, backend)
    return (out, lse) if return_lse else out
