"""One GEMM for the keys and values of every cross-attention layer: :func:`fused_kv_projection`
(``[B, Lk, C]`` features -> one ``(k, v)`` pair of ``[B, H, Lk, D]`` views per layer) and
:func:`share_kv_storage`, which puts the layers' K/V weights in one storage for it.
"""
from __future__ import annotations


import torch
from torch import nn

from .. import _autocast
from .._storage import pack_, packed
from .. import _validation as check

def _flat_pairs(pairs, name: str) -> list[torch.Tensor]:
    if isinstance(pairs, torch.Tensor) or not hasattr(pairs, "__len__") or len(pairs) == 0:
        raise TypeError(f"{name} must be a non-empty sequence of (k, v) pairs, one per layer")
    flat = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, torch.Tensor) or len(pair) != 2:
            raise TypeError(f"{name}[{i}] must be a (k, v) pair of tensors")
        for part, t in zip("kv", pair):
            check.tensor(t, f"{name}[{i}].{part}")
            flat.append(t)
    return flat


class _LayerKV(torch.autograd.Function):
    """One layer's ``(k, v)``: ``[B, H, Lk, D]`` views of the all-layers GEMM output ``y``.

    ``y`` arrives inside a list (a non-differentiable argument computed once for every layer);
    the backward is this layer's part of the GEMM's backward: ``dX_l = [dK dV] [W_k; W_v]`` and
    ``[dW_k; dW_v] = [dK dV]^T X`` (one GEMM each), so each layer's gradients are used and freed
    as soon as they arrive, as with separate projections, instead of every layer's ``dK``/``dV``
    waiting for one concatenated backward (12 of them are about 1.2 GB for BLIP-2 at B = 128).
    """

    @staticmethod
    def forward(ctx, x, w_k, w_v, b_k, b_v, holder, layer, heads):
        y = holder[0]                                                    # [B, Lk, L * 2 * H * D]
        b, lk, _ = x.shape
        hd = w_k.shape[0]
        part = y[:, :, 2 * layer * hd:2 * (layer + 1) * hd].unflatten(-1, (2, heads, hd // heads))
        ctx.save_for_backward(x, w_k, w_v)
        ctx.has_bias = b_k is not None
        return part[:, :, 0].transpose(1, 2), part[:, :, 1].transpose(1, 2)

    @staticmethod
    def backward(ctx, dk, dv):
        x, w_k, w_v = ctx.saved_tensors
        b, lk, c = x.shape
        hd = w_k.shape[0]
        dy = x.new_empty(b, lk, 2, hd)
        for i, g in enumerate((dk, dv)):
            if g is None:
                dy[:, :, i].zero_()
            else:
                dy[:, :, i].copy_(g.transpose(1, 2).reshape(b, lk, hd))
        dy2 = dy.view(b * lk, 2 * hd)
        dx = dw_k = dw_v = db_k = db_v = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ packed([w_k, w_v])).view(b, lk, c)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dw_k, dw_v = (dy2.t() @ x.reshape(b * lk, c)).split(hd)
        if ctx.has_bias and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4]):
            db_k, db_v = dy2.sum(0).split(hd)
        return dx, dw_k, dw_v, db_k, db_v, None, None, None


def fused_kv_projection(image_embeds: torch.Tensor, weights, biases=None, *, num_heads: int):
    """The K and V of every cross-attention layer from one GEMM over the image features.

    Args:
        image_embeds: ``[B, Lk, C]`` float32/bfloat16/float16/float64.
        weights: one ``(W_k, W_v)`` pair per layer, each ``[H * D, C]`` (``nn.Linear`` layout),
            all of image_embeds' dtype and device.
        biases: one ``(b_k, b_v)`` pair per layer, each ``[H * D]``, or ``None``.
        num_heads: ``H``; the head dim is ``D = rows / H``.

    Returns:
        A list with one ``(k, v)`` pair per layer, each ``[B, H, Lk, D]``: strided views of one
        ``[B, Lk, L * 2 * H * D]`` GEMM output (no copies), ready for ``cross_attention``.

    Under ``torch.autocast`` the features, weights and biases are cast to the autocast dtype
    first, as for the ``nn.Linear`` projections this replaces: forward and backward GEMMs run in
    that dtype and fp32 parameters get fp32 gradients. The cast weights are separate tensors,
    so they are concatenated on each call even when the parameters share one storage.

    A BLIP-2 Q-Former projects the same image features to K and V in six layers: twelve GEMMs
    of ``[B * Lk, C] x [C, H * D]``, run here as one ``[B * Lk, C] x [C, L * 2 * H * D]`` GEMM.
    The backward runs per layer (see ``_LayerKV``), summed over layers by autograd; gradients
    reach the image features and every layer's weight and bias.

    The concatenated weight ``[L * 2 * H * D, C]`` (rows: layer 0 K, layer 0 V, layer 1 K, ...):

    * when the layers' weights already live back to back in one storage (what
      :func:`share_kv_storage` arranges, and what ``mmkernels.QFormer`` and ``patch_blip2`` do),
      it is a view of that storage: nothing is concatenated, and optimiser steps update it in
      place;
    * otherwise the weights are concatenated on each call (a copy of ``L * 2 * H * D * C``
      elements, small next to the GEMM). A cache keyed on version counters would be wrong for
      code that updates weights through ``.data``, which bumps no counter, so there is none.
    """
    check.tensor(image_embeds, "image_embeds", 3)
    check.floating(image_embeds, "image_embeds")
    w_flat = _flat_pairs(weights, "weights")
    b_flat = [] if biases is None else _flat_pairs(biases, "biases")
    image_embeds, *flat = _autocast.lower_precision(image_embeds, *w_flat, *b_flat)
    w_flat, b_flat = flat[:len(w_flat)], flat[len(w_flat):]
    layers = len(w_flat) // 2
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    rows = w_flat[0].shape[0] if w_flat[0].dim() == 2 else -1
    c = image_embeds.shape[-1]
    for i, w in enumerate(w_flat):
        name = f"weights[{i // 2}].{'kv'[i % 2]}"
        if w.dim() != 2 or w.shape != (rows, c):
            raise ValueError(f"{name} must have shape [H * D, C] = {(rows, c)} like weights[0].k "
                             f"and image_embeds' width C, got {tuple(w.shape)}")
        check.same_dtype(("image_embeds", image_embeds), (name, w))
        check.same_device(("image_embeds", image_embeds), (name, w))
    if rows % num_heads:
        raise ValueError(f"the projection width {rows} is not a multiple of num_heads {num_heads}")
    if biases is not None:
        if len(b_flat) != len(w_flat):
            raise ValueError(f"biases has {len(b_flat) // 2} layers but weights has {layers}")
        for i, t in enumerate(b_flat):
            name = f"biases[{i // 2}].{'kv'[i % 2]}"
            if tuple(t.shape) != (rows,):
                raise ValueError(f"{name} must have shape [H * D] = {(rows,)}, got {tuple(t.shape)}")
            check.same_dtype(("image_embeds", image_embeds), (name, t))
            check.same_device(("image_embeds", image_embeds), (name, t))
    with torch.no_grad():  # one GEMM for every layer; each layer's _LayerKV routes its gradients
        y = torch.nn.functional.linear(image_embeds, packed(w_flat), packed(b_flat) if b_flat else None)
    holder = [y]
    out = []
    for l in range(layers):
        bk, bv = (b_flat[2 * l], b_flat[2 * l + 1]) if b_flat else (None, None)
        out.append(_LayerKV.apply(image_embeds, w_flat[2 * l], w_flat[2 * l + 1], bk, bv, holder, l, num_heads))
    return out


@torch.no_grad()
def share_kv_storage(linears) -> None:
    """Move the K/V linears of several layers into one storage, back to back, in place.

    ``linears``: one ``(key, value)`` pair of ``nn.Linear`` per layer (same shapes, dtype and
    device). Each weight (and bias) keeps its ``nn.Parameter`` object, so optimisers and state
    dicts are unaffected; only its data moves (``param.data = view``). Afterwards
    :func:`fused_kv_projection` uses the layers' weights as one matrix without copying.
    Moving the module (``.to``, ``.half()``) allocates new storages: call this again after.
    """
    mods = [m for pair in linears for m in pair]
    if not mods:
        return
    for m in mods:
        if not isinstance(m, nn.Linear):
            raise TypeError(f"share_kv_storage takes nn.Linear modules, got {type(m).__name__}")
    for attr in ("weight", "bias"):
        params = [getattr(m, attr) for m in mods]
        if any(p is None for p in params):
            if not all(p is None for p in params):
                raise ValueError(f"share_kv_storage: some linears have a {attr} and some do not")
            continue
        pack_(params)
