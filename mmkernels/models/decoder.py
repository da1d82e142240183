"""LLaMA-style decoder pieces the CogVLM and LLaVA reference models share.

* :class:`RMSNorm`, :class:`SwiGLU` (LLaMA's ``gate_proj``/``up_proj``/``down_proj`` MLP);
* :func:`rotary` / :func:`apply_rotary`: rotary embeddings computed in ``forward`` from position
  ids (no tables in buffers, so a model builds on the meta device);
* :func:`attention`: causal decoder attention with optional grouped-query heads, in both forms
  (``impl`` in :data:`mmkernels.models.common.IMPLS`): ``plain`` repeats the K/V heads and runs
  eager attention under a dense boolean mask (HF's eager path); ``mmkernels`` calls
  :func:`mmkernels.multimodal_attention` (grouped-query heads natively) under a
  :class:`mmkernels.MultimodalMask`;
* :func:`place_image_tokens` (image embeddings into the token stream) and
  :func:`next_token_loss` (HF's shifted cross-entropy);
* config checks the models' ``Config`` classes share.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import MultimodalMask, multimodal_attention
from .layers import attend_plain

#: label of a position that is not a target of the loss (HF's ``ignore_index``)
IGNORE = -100


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: where LLaMA code upcasts (norms, rotary tables, the loss), float64 stays."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim, computed in at least float32.
    ``forward(x [..., W]) -> [..., W]`` in x's dtype."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(compute_dtype(x.dtype))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class SwiGLU(nn.Module):
    """LLaMA's MLP ``down_proj(silu(gate_proj(x)) * up_proj(x))``, no biases:
    ``[..., W]`` -> ``[..., W]`` through ``hidden`` features."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def init_normal_(module: nn.Module, std: float = 0.02) -> None:
    """LLaMA's initialisation: every parameter of rank >= 2 (linear weights, embeddings, stacked
    expert weights) from ``N(0, std)``, biases zero; norm weights keep their ones."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


# ----------------------------------------------------------------------------- rotary

def rotary(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``[B, S, 1, head_dim]`` in ``dtype``, for integer ``positions [B, S]``:
    LLaMA's rotary tables (frequencies ``base ** (-2i / head_dim)``, the two halves repeated),
    computed in at least float32."""
    ct = compute_dtype(dtype)
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=ct) / head_dim)
    angles = positions.to(ct)[..., None] * inv_freq                      # [B, S, D/2]
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]          # [B, S, 1, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, S, H, D]`` by the tables of :func:`rotary` (``rotate_half`` convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ----------------------------------------------------------------------------- attention

def repeat_kv(x: torch.Tensor, times: int) -> torch.Tensor:
    """``[B, Hkv, S, D]`` -> ``[B, Hkv * times, S, D]``, each K/V head repeated for its query heads."""
    if times == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, times, s, d).reshape(b, h * times, s, d)


def attention(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor, mask, *, heads: int, kv_heads: int) -> torch.Tensor:
    """Rotary self-attention of a decoder layer.

    Args:
        impl: ``"plain"`` or ``"mmkernels"``.
        q: ``[B, S, heads * D]``; k, v: ``[B, S, kv_heads * D]`` (views of a fused projection are
            fine), floating.
        cos, sin: ``[B, S, 1, D]`` from :func:`rotary`.
        mask: ``plain``: bool ``[B, 1, S, S]`` (True = attend). ``mmkernels``: a
            :class:`MultimodalMask` of shape ``(B, S, S)``, or of batch 1 over the ``B * S`` tokens
            taken row after row (packed sequences, the varlen layout).

    Returns ``[B, S, heads * D]`` in q's dtype.
    """
    b, s, _ = q.shape
    d = q.shape[-1] // heads
    q = apply_rotary(q.view(b, s, heads, d), cos, sin)
    k = apply_rotary(k.view(b, s, kv_heads, d), cos, sin)
    v = v.view(b, s, kv_heads, d)
    if impl == "plain":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        rep = heads // kv_heads
        out = attend_plain(q, repeat_kv(k, rep), repeat_kv(v, rep), mask)
        return out.transpose(1, 2).reshape(b, s, heads * d)
    if not isinstance(mask, MultimodalMask):
        raise TypeError(f"the mmkernels form takes a MultimodalMask, got {type(mask).__name__}")
    lead = (1, b * s) if mask.shape[0] == 1 and mask.shape[1] == b * s else (b, s)
    q, k, v = (t.reshape(*lead, t.shape[2], d).transpose(1, 2) for t in (q, k, v))
    out = multimodal_attention(q, k, v, mask)                            # [B', heads, S', D]
    return out.transpose(1, 2).reshape(b, s, heads * d)


# ----------------------------------------------------------------------------- tokens and loss

def place_image_tokens(embeds: torch.Tensor, is_image: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """The token stream with its image positions filled: the ``n``-th image position (row after
    row) takes ``image_embeds[n]``; text positions keep ``embeds``.

    ``embeds [B, S, W]``, ``is_image`` bool ``[B, S]``, ``image_embeds [N, W]`` (``N`` = the number
    of image positions). A gather and a select: no host synchronisation, unlike boolean indexing.
    """
    rank = (is_image.reshape(-1).cumsum(0) - 1).clamp(0, image_embeds.shape[0] - 1)
    placed = image_embeds.index_select(0, rank).view_as(embeds)
    return torch.where(is_image[..., None], placed, embeds)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [B, S, V]`` at position ``s`` against ``labels[:, s + 1]``
    (HF's shift), over labels other than :data:`IGNORE`; computed in at least float32.

    The labels move instead of the logits (the last position gets no target), so the ``[B, S, V]``
    logits are read in place rather than copied out of a slice."""
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)
    logits = logits.to(compute_dtype(logits.dtype))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


# ----------------------------------------------------------------------------- config checks

def check_config(config, positive: tuple[str, ...]) -> None:
    """The fields ``positive`` of ``config`` are positive ints; ``heads`` divides ``width`` and
    ``kv_heads`` divides ``heads``; the head dim is even (rotary); ``eps`` and ``rope_base`` are
    positive. Raises ``ValueError``/``TypeError`` naming the field."""
    name = type(config).__qualname__
    for f in positive:
        v = getattr(config, f)
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}.{f} must be an int, got {v!r}")
        if v < 1:
            raise ValueError(f"{name}.{f} must be at least 1, got {v}")
    if config.width % config.heads:
        raise ValueError(f"{name}: width {config.width} is not a multiple of heads {config.heads}")
    if config.heads % config.kv_heads:
        raise ValueError(f"{name}: heads {config.heads} is not a multiple of kv_heads {config.kv_heads}")
    if (config.width // config.heads) % 2:
        raise ValueError(f"{name}: the head dim width // heads = {config.width // config.heads} must be "
                         "even (rotary embeddings rotate pairs)")
    for f in ("eps", "rope_base"):
        if not getattr(config, f) > 0:
            raise ValueError(f"{name}.{f} must be positive, got {getattr(config, f)!r}")


def check_ids(x, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``x`` is an int32/int64 tensor (of ``shape`` when given)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {x.dtype}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return x


def class_structure(num_classes: int, image_feature_dim: int, vocab_size: int, length: int,
                    first_token: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What every synthetic batch of a decoder model shares: an image prototype per class (float64
    ``[num_classes, image_feature_dim]``) and a text template per class (int64
    ``[num_classes, length]``, ids in ``[first_token, vocab_size)``), drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(num_classes, image_feature_dim, generator=g, dtype=torch.float64)
    templates = torch.randint(first_token, vocab_size, (num_classes, length), generator=g)
    return protos, templates
