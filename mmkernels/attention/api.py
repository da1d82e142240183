"""Multimodal masked attention users call: ``multimodal_attention`` and ``MultimodalSelfAttention``."""
from __future__ import annotations

import torch
from torch import nn

from .. import _autocast, _dispatch
from . import paths
from .mask import MultimodalMask
from .ops import attention_fwd
from .reference import check_inputs, multimodal_attention_reference


def multimodal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MultimodalMask | None = None,
                         *, scale: float | None = None, return_lse: bool = False):
    """Flash-style attention under a mask built from O(S) token metadata.

    Args:
        q: ``[B, Hq, Sq, D]`` float32/bfloat16/float16 (SDPA layout; strided views accepted).
        k, v: ``[B, Hkv, Sk, D]``, same dtype and device; ``Hq % Hkv == 0`` (grouped-query
            attention: query head ``h`` uses key/value head ``h // (Hq // Hkv)``). ``Sq`` may
            differ from ``Sk`` (queries are then the last ``Sq`` key positions by default).
        mask: a :class:`MultimodalMask` (see its builders: ``causal``, ``key_padding``,
            ``prefix_lm``, ``blip2``, ``instructblip``, ``beit3_captioning``, ``packed``,
            ``image_spans_in_causal``), or ``None`` for full attention.
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return ``lse [B, Hq, Sq]`` (float32), the log-sum-exp of each row's
            scaled, masked scores (for inspection; it carries no gradient).

    Returns:
        ``out [B, Hq, Sq, D]`` in q's dtype (and ``lse``). A query row that sees no key gets
        ``out = 0`` (``lse = -inf``) and zero gradient, never NaN.

    Under backend ``auto`` the call runs the path the attention dispatch table names for its
    case (:mod:`mmkernels.attention.paths`: ``sdpa``, ``varlen``, ``flex``, or the kernels);
    ``mmkernels.explain()`` shows which. On every path but ``reference`` no ``Sq x Sk`` tensor
    is allocated beyond the memory budget; the kernels skip tiles the mask hides entirely. Under
    ``torch.autocast`` q, k and v are cast to the autocast dtype first, as for
    ``scaled_dot_product_attention``.
    """
    q, k, v = _autocast.lower_precision(q, k, v)
    scale = check_inputs(q, k, v, mask, scale)
    cls = paths.shape_class(paths.mask_kind(mask), q.shape[2], k.shape[2], q.shape[3])
    path, backend = paths.choose("attention", "multimodal_attention", q, cls,
                                 paths.eligibility(q, k, v, mask, scale, return_lse))
    if path == _dispatch.REFERENCE:
        return multimodal_attention_reference(q, k, v, mask, scale=scale, return_lse=return_lse)
    if path == _dispatch.KERNEL:
        meta = [] if mask is None else mask.metadata()
        out, lse, _, _ = attention_fwd(q, k, v, meta, scale, backend)
        return (out, lse) if return_lse else out
    return paths.run(path, q, k, v, mask, scale, return_lse)


class MultimodalSelfAttention(nn.Module):
    """Self-attention block with a fused QKV projection, a multimodal mask and an output projection.

    Args:
        hidden_size: model width ``H``.
        num_heads: query heads; ``H % num_heads == 0``, head dim ``H // num_heads``.
        num_kv_heads: key/value heads for grouped-query attention (default ``num_heads``).
        bias: biases on the projections.

    ``forward(x [B, S, H], mask: MultimodalMask | None = None) -> [B, S, H]``.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None, *,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        qkv_out = (num_heads + 2 * num_kv_heads) * self.head_dim
        self.qkv = nn.Linear(hidden_size, qkv_out, bias=bias, device=device, dtype=dtype)
        self.proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, mask: MultimodalMask | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        hd, hq, hkv = self.head_dim, self.num_heads, self.num_kv_heads
        qkv = self.qkv(x)
        q, k, v = qkv.split([hq * hd, hkv * hd, hkv * hd], dim=-1)
        # [B, S, H*D] -> [B, H, S, D] views: the kernels take strided inputs, no copies
        q = q.view(b, s, hq, hd).transpose(1, 2)
        k = k.view(b, s, hkv, hd).transpose(1, 2)
        v = v.view(b, s, hkv, hd).transpose(1, 2)
        out = multimodal_attention(q, k, v, mask)
        return self.proj(out.transpose(1, 2).reshape(b, s, hq * hd))
