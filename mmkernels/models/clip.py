"""CLIP: a dual encoder trained with a contrastive loss (SigLIP's sigmoid loss as an option).

An image tower (:class:`~mmkernels.models.layers.VisionTransformer`, pooled at the class token)
and a text tower (causal pre-LN transformer pooled at the end-of-text token, the largest token id)
are projected to ``embed_dim``, L2-normalised and compared under a learnable temperature
``logit_scale`` (a log; the losses get ``exp(logit_scale)``) and, for SigLIP, a learnable
``logit_bias``.

The ``mmkernels`` form runs :func:`mmkernels.multimodal_attention` in both towers (the text tower
under :meth:`mmkernels.MultimodalMask.causal`) and :class:`mmkernels.ContrastiveLoss` or
:class:`mmkernels.SigLipLoss`, which never hold the ``[N, N]`` logits. The ``plain`` form is
eager attention with a dense causal mask and the materialised losses of OpenCLIP's ``ClipLoss``
and ``SigLipLoss``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import MultimodalMask
from ..contrastive import ContrastiveLoss, SigLipLoss
from .common import check_impl
from .layers import Block, VisionTransformer

LOSSES = ("clip", "siglip")

#: the padding token id
PAD_ID = 0


def sot_id(vocab_size: int) -> int:
    """The start-of-text id: the second largest."""
    return vocab_size - 2


def eot_id(vocab_size: int) -> int:
    """The end-of-text id: the largest, so that ``argmax`` of a row finds it, as CLIP pools."""
    return vocab_size - 1


@dataclass
class Config:
    """Sizes of the two towers and the loss. ``loss``: ``"clip"`` (symmetric InfoNCE) or
    ``"siglip"`` (sigmoid loss with a learnable bias)."""

    image_size: int = 32
    patch_size: int = 8
    channels: int = 3
    vision_width: int = 256
    vision_layers: int = 4
    vision_heads: int = 4
    vocab_size: int = 49408
    context_length: int = 32
    text_width: int = 256
    text_layers: int = 4
    text_heads: int = 4
    mlp_ratio: float = 4.0
    embed_dim: int = 256
    loss: str = "clip"

    def __post_init__(self):
        self.validate()

    @classmethod
    def tiny(cls, **overrides) -> "Config":
        """The smallest config, the one the tests train (``overrides`` set fields, e.g. ``loss``).
        One head per tower: Triton's interpreter runs one program per (sample, head)."""
        fields = dict(image_size=8, patch_size=4, vision_width=16, vision_layers=1, vision_heads=1,
                      vocab_size=48, context_length=8, text_width=16, text_layers=1, text_heads=1,
                      embed_dim=8)
        return cls(**{**fields, **overrides})

    def validate(self) -> None:
        """A ``ValueError`` naming the first field that cannot build a model."""
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name, value in asdict(self).items():
            if name in ("loss", "mlp_ratio"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for tower in ("vision", "text"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if width % heads:
                raise ValueError(f"{tower}_width {width} is not a multiple of {tower}_heads {heads}")
        if self.vocab_size < 4:
            raise ValueError(f"vocab_size must be at least 4 (padding, start, end and one word), "
                             f"got {self.vocab_size}")
        if self.context_length < 3:
            raise ValueError(f"context_length must be at least 3 (start, one word, end), "
                             f"got {self.context_length}")


def clip_loss_plain(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """OpenCLIP ``ClipLoss`` (one process): ``image, text [N, E]`` normalised, ``scale`` the
    multiplier (0-dim). Materialises both ``[N, N]`` logits. Returns a 0-dim loss."""
    logits_per_image = scale * image @ text.T
    logits_per_text = scale * text @ image.T
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss_plain(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor) -> torch.Tensor:
    """OpenCLIP ``SigLipLoss`` (one process): ``-sum log sigmoid(labels * logits) / N`` with
    ``logits = scale * image @ text.T + bias [N, N]`` and labels +1 on the diagonal, -1 elsewhere."""
    n = image.shape[0]
    logits = scale * image @ text.T + bias
    labels = 2 * torch.eye(n, device=image.device, dtype=image.dtype) - torch.ones(
        n, n, device=image.device, dtype=image.dtype)
    return -F.logsigmoid(labels * logits).sum() / n


class Model(nn.Module):
    """CLIP / SigLIP in the form ``impl`` (``"plain"`` or ``"mmkernels"``).

    ``forward(images [B, C, S, S] floating, text [B, L] int64) -> loss`` (0-dim, images' dtype):
    ``text`` rows are ``[SOT, words..., EOT, PAD...]`` with EOT the largest id.

    Parameters: ``visual`` (the image tower), ``visual_projection [Wv, E]``, ``token_embedding``
    ``[V, Wt]``, ``positional_embedding [L, Wt]``, ``text_blocks``, ``ln_final``,
    ``text_projection [Wt, E]``, ``logit_scale []`` (a log) and, for SigLIP, ``logit_bias []``.
    """

    def __init__(self, config: Config, impl: str = "mmkernels"):
        super().__init__()
        if not isinstance(config, Config):
            raise TypeError(f"config must be a mmkernels.models.clip.Config, got {type(config).__name__}")
        config.validate()
        self.config, self.impl = config, check_impl(impl)
        c = config
        self.visual = VisionTransformer(c.image_size, c.patch_size, c.vision_width, c.vision_layers,
                                        c.vision_heads, c.mlp_ratio, c.channels, impl)
        self.visual_projection = nn.Parameter(torch.randn(c.vision_width, c.embed_dim) * c.vision_width ** -0.5)
        self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.positional_embedding = nn.Parameter(torch.randn(c.context_length, c.text_width) * 0.01)
        self.text_blocks = nn.ModuleList(Block(c.text_width, c.text_heads, c.mlp_ratio, impl)
                                         for _ in range(c.text_layers))
        self.ln_final = nn.LayerNorm(c.text_width, eps=1e-6)
        self.text_projection = nn.Parameter(torch.randn(c.text_width, c.embed_dim) * c.text_width ** -0.5)
        self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))
        if c.loss == "siglip":
            self.logit_bias = nn.Parameter(torch.full((), -10.0))
            self.loss_fn = SigLipLoss() if impl == "mmkernels" else None
        else:
            self.logit_bias = None
            self.loss_fn = ContrastiveLoss() if impl == "mmkernels" else None

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, C, S, S]`` -> L2-normalised ``[B, embed_dim]`` (the class token, projected)."""
        return F.normalize(self.visual(images)[:, 0] @ self.visual_projection, dim=-1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """``text [B, L]`` int64 (``L <= context_length``) -> L2-normalised ``[B, embed_dim]``,
        the features at the end-of-text token (the row's largest id)."""
        b, length = text.shape
        if length > self.config.context_length:
            raise ValueError(f"text has {length} tokens, more than context_length {self.config.context_length}")
        x = self.token_embedding(text) + self.positional_embedding[:length]
        mask = MultimodalMask.causal(b, length, device=text.device)
        for blk in self.text_blocks:
            x = blk(x, mask)
        x = self.ln_final(x)
        pooled = x[torch.arange(b, device=text.device), text.argmax(dim=-1)]
        return F.normalize(pooled @ self.text_projection, dim=-1)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or text.dim() != 2 or images.shape[0] != text.shape[0]:
            raise ValueError(f"need images [B, C, S, S] and text [B, L] with the same B, got "
                             f"{tuple(images.shape)} and {tuple(text.shape)}")
        image, txt = self.encode_image(images), self.encode_text(text)
        scale = self.logit_scale.exp()
        if self.impl == "plain":
            if self.logit_bias is None:
                return clip_loss_plain(image, txt, scale)
            return siglip_loss_plain(image, txt, scale, self.logit_bias)
        return self.loss_fn(image, txt, scale, self.logit_bias)


#: latent classes the synthetic batches are drawn from, and the seed of their prototypes
NUM_CLASSES = 32
_WORLD_SEED = 1234


def _world(config: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The classes' image prototypes ``[K, C, S, S]`` float64, caption templates ``[K, L - 2]``
    int64 (word ids) and caption lengths ``[K]`` (1 to ``L - 2`` words)."""
    g = torch.Generator().manual_seed(_WORLD_SEED)
    c = config
    protos = torch.randn(NUM_CLASSES, c.channels, c.image_size, c.image_size, generator=g, dtype=torch.float64)
    words = torch.randint(1, sot_id(c.vocab_size), (NUM_CLASSES, c.context_length - 2), generator=g)
    lengths = torch.randint(1, c.context_length - 1, (NUM_CLASSES,), generator=g)
    return protos, words, lengths


def synthetic_batch(config: Config, batch_size: int, *, seed: int, device="cpu",
                    dtype: torch.dtype = torch.float32) -> dict:
    """Image-caption pairs of :data:`NUM_CLASSES` latent classes: ``{"images": [B, C, S, S] dtype,
    "text": [B, context_length] int64}``. An image is its class's prototype plus noise; its caption
    is ``SOT``, the class's template (each word replaced by a random one with probability 0.2),
    ``EOT``, padding. Classes are distinct within a batch while ``B <= NUM_CLASSES``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    protos, words, lengths = _world(config)
    g = torch.Generator().manual_seed(seed)
    if batch_size <= NUM_CLASSES:
        cls = torch.randperm(NUM_CLASSES, generator=g)[:batch_size]
    else:
        cls = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    images = protos[cls] + 0.5 * torch.randn(protos[cls].shape, generator=g, dtype=torch.float64)
    vocab, ctx = config.vocab_size, config.context_length
    noise = torch.randint(1, sot_id(vocab), (batch_size, ctx - 2), generator=g)
    swap = torch.rand(batch_size, ctx - 2, generator=g) < 0.2
    body = torch.where(swap, noise, words[cls])
    n = lengths[cls]
    pos = torch.arange(ctx - 2)
    body = torch.where(pos < n[:, None], body, PAD_ID)
    text = torch.cat([torch.full((batch_size, 1), sot_id(vocab)), body,
                      torch.full((batch_size, 1), PAD_ID)], dim=1)
    text[torch.arange(batch_size), n + 1] = eot_id(vocab)
    return {"images": images.to(device=device, dtype=dtype), "text": text.to(device)}
