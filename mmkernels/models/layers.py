"""Transformer pieces the reference models share, each in both forms (``impl`` in
:data:`mmkernels.models.common.IMPLS`): the attention is the only part that differs.

* :func:`attend_plain`: eager attention, ``softmax(q k^T * scale + additive mask) v``, with the
  mask as papers' code applies it (``finfo.min`` where a key is hidden).
* :class:`SelfAttention`: fused ``qkv`` linear, heads, output projection; ``mask`` is a
  :class:`mmkernels.MultimodalMask` (``None``: full attention). ``plain`` materialises
  ``mask.to_dense()``; ``mmkernels`` calls :func:`mmkernels.multimodal_attention`.
* :class:`MLP`, :class:`Block` (pre-LayerNorm transformer block) and :class:`VisionTransformer`
  (CLIP/ViT image tower: patch embedding, class token, positions, blocks, final LayerNorm).

A query row that sees no key is a padding token in these models: its output is never read by a
loss, so the two forms may differ there (the plain form averages, the kernels return zeros).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import MultimodalMask, multimodal_attention
from .common import check_impl


def attend_plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                 scale: float | None = None) -> torch.Tensor:
    """Eager attention. ``q [B, H, Sq, D]``, ``k, v [B, H, Sk, D]``; ``mask``: bool, broadcastable
    to ``[B, H, Sq, Sk]``, True = attend (``None``: all). Returns ``[B, H, Sq, D]`` in q's dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(scores.softmax(dim=-1), v)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, S, H * D]`` -> ``[B, H, S, D]`` (a view)."""
    b, s, w = x.shape
    return x.view(b, s, heads, w // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, D]`` -> ``[B, S, H * D]``."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def attend(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MultimodalMask | None,
           scale: float | None = None) -> torch.Tensor:
    """Attention of ``q [B, H, Sq, D]`` over ``k, v [B, H, Sk, D]`` under ``mask`` in the form ``impl``."""
    if impl == "plain":
        return attend_plain(q, k, v, None if mask is None else mask.to_dense(), scale)
    return multimodal_attention(q, k, v, mask, scale=scale)


class SelfAttention(nn.Module):
    """Multi-head self-attention: ``qkv`` linear ``[3W, W]``, ``proj`` linear ``[W, W]``.
    ``forward(x [B, S, W], mask=None) -> [B, S, W]``."""

    def __init__(self, width: int, heads: int, impl: str = "mmkernels", bias: bool = True):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.impl, self.heads = check_impl(impl), heads
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)

    def forward(self, x: torch.Tensor, mask: MultimodalMask | None = None) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(merge_heads(attend(self.impl, q, k, v, mask)))


class MLP(nn.Module):
    """``fc2(gelu(fc1(x)))``: ``[..., W]`` -> ``[..., W]`` through ``hidden`` features."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, impl: str = "mmkernels",
                 eps: float = 1e-6):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = SelfAttention(width, heads, impl)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, mask: MultimodalMask | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    """A ViT image tower (CLIP / ALBEF / BLIP-2's image encoder, small).

    ``forward(images [B, C, image_size, image_size]) -> tokens [B, 1 + P, width]`` (the class
    token first, ``P = (image_size // patch_size) ** 2``), after the final LayerNorm.
    """

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 mlp_ratio: float = 4.0, channels: int = 3, impl: str = "mmkernels"):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(channels, width, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.randn(width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1 + self.num_patches, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, impl) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width, eps=1e-6)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)           # [B, P, W]
        cls = self.cls_token.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.ln_post(x)
