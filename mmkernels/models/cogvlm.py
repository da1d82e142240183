"""CogVLM: a LLaMA-style decoder whose layers carry a visual expert.

Sequences are ``[BOS, image tokens, text tokens]`` with a per-token type (0 language, 1 vision,
CogVLM's ``token_type_ids``); the image tokens are projected from given image features (the
ViT is not the point here). Every layer has two sets of QKV, attention-output (``dense``) and
SwiGLU MLP weights, stacked ``[2, out, in]`` (index 0 language, 1 vision), and each token goes
through its type's weights. Image tokens attend bidirectionally among their image, text is
causal; the rotary positions follow CogVLM (the inner tokens of an image share one position).
The loss is next-token cross-entropy on the text tokens.

* ``plain``: CogVLM's code: boolean-index routing (``out[vision_mask] = vision_expert(x[vision_mask])``,
  the same for the language tokens) and eager attention under the dense mask;
* ``mmkernels``: :func:`mmkernels.modality_linear` (QKV, dense), :func:`mmkernels.modality_ffn`
  with ``activation="swiglu"`` (MLP) and :func:`mmkernels.multimodal_attention` under
  :meth:`mmkernels.MultimodalMask.image_spans_in_causal`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validation as check
from ..attention import MultimodalMask
from ..experts import modality_ffn, modality_linear
from . import decoder
from .common import check_impl

LANGUAGE, VISION = 0, 1
#: token ids with a fixed meaning in the synthetic data (text tokens are the ids above)
BOS, IMAGE_TOKEN = 1, 2
FIRST_TEXT_TOKEN = 3


@dataclass
class Config:
    """Sizes of the model and of its sequences.

    ``seq_len`` tokens per sequence: BOS, between ``min_image_tokens`` and ``max_image_tokens``
    image tokens (varying across the batch), then text. ``kv_heads < heads`` gives grouped-query
    attention. No dropout (a LLaMA-style decoder).
    """

    vocab_size: int = 256
    width: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    mlp_hidden: int = 256
    image_feature_dim: int = 64
    seq_len: int = 64
    min_image_tokens: int = 8
    max_image_tokens: int = 24
    rope_base: float = 10000.0
    eps: float = 1e-6

    def __post_init__(self):
        decoder.check_config(self, ("vocab_size", "width", "layers", "heads", "kv_heads", "mlp_hidden",
                                    "image_feature_dim", "seq_len", "min_image_tokens", "max_image_tokens"))
        if self.max_image_tokens < self.min_image_tokens:
            raise ValueError(f"Config: max_image_tokens {self.max_image_tokens} < min_image_tokens "
                             f"{self.min_image_tokens}")
        if self.seq_len < self.max_image_tokens + 3:
            raise ValueError(f"Config: seq_len {self.seq_len} must hold BOS, max_image_tokens "
                             f"{self.max_image_tokens} and at least 2 text tokens")
        if self.vocab_size <= FIRST_TEXT_TOKEN + NUM_CLASSES:
            raise ValueError(f"Config: vocab_size {self.vocab_size} must exceed {FIRST_TEXT_TOKEN + NUM_CLASSES} "
                             "(the special tokens and some text tokens)")

    @classmethod
    def tiny(cls) -> "Config":
        """The smallest config: the one the tests train (all three backends)."""
        return cls(vocab_size=24, width=32, layers=1, heads=2, kv_heads=2, mlp_hidden=48,
                   image_feature_dim=16, seq_len=16, min_image_tokens=3, max_image_tokens=7)


# ----------------------------------------------------------------------------- the visual expert

class Route:
    """The per-token expert choice, made once per forward: ``ids`` (int64 ``[B, S]``, the type of
    each token) for the kernels, ``vision`` / ``language`` (bool ``[B, S]``) for boolean indexing."""

    def __init__(self, token_type_ids: torch.Tensor):
        self.ids = token_type_ids
        self.vision = token_type_ids == VISION
        self.language = ~self.vision


class ExpertLinear(nn.Module):
    """``y[t] = x[t] @ weight[type(t)].T`` with ``weight [2, out, in]`` (no bias, as CogVLM's
    language expert). ``forward(x [B, S, in], route) -> [B, S, out]``."""

    def __init__(self, in_features: int, out_features: int, impl: str):
        super().__init__()
        self.impl = impl
        self.weight = nn.Parameter(torch.empty(2, out_features, in_features))

    def forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        if self.impl == "mmkernels":
            return modality_linear(x, route.ids, self.weight)
        out = x.new_empty(*x.shape[:-1], self.weight.shape[1])
        out[route.vision] = F.linear(x[route.vision], self.weight[VISION])
        out[route.language] = F.linear(x[route.language], self.weight[LANGUAGE])
        return out


class ExpertMLP(nn.Module):
    """Two SwiGLU MLPs (CogVLM's ``language_mlp`` / ``vision_mlp``): ``w_in [2, 2F, W]`` (rows
    ``0..F-1`` the gate projection, ``F..2F-1`` the up projection), ``w_out [2, W, F]``.
    ``forward(x [B, S, W], route) -> [B, S, W]``."""

    def __init__(self, width: int, hidden: int, impl: str):
        super().__init__()
        self.impl, self.hidden = impl, hidden
        self.w_in = nn.Parameter(torch.empty(2, 2 * hidden, width))
        self.w_out = nn.Parameter(torch.empty(2, width, hidden))

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        gate, up = self.w_in[e, :self.hidden], self.w_in[e, self.hidden:]
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), self.w_out[e])

    def forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        if self.impl == "mmkernels":
            return modality_ffn(x, route.ids, self.w_in, None, self.w_out, None, activation="swiglu")
        out = x.new_empty(x.shape)
        out[route.vision] = self._expert(x[route.vision], VISION)
        out[route.language] = self._expert(x[route.language], LANGUAGE)
        return out


class ExpertAttention(nn.Module):
    """Self-attention with per-type ``qkv`` (``[2, (H + 2 Hkv) D, W]``) and ``dense``
    (``[2, W, H D]``) weights. ``forward(x [B, S, W], route, cos, sin, mask) -> [B, S, W]``."""

    def __init__(self, config: Config, impl: str):
        super().__init__()
        self.impl, self.heads, self.kv_heads = impl, config.heads, config.kv_heads
        d = config.width // config.heads
        self.q_width, self.kv_width = config.heads * d, config.kv_heads * d
        self.qkv = ExpertLinear(config.width, self.q_width + 2 * self.kv_width, impl)
        self.dense = ExpertLinear(self.q_width, config.width, impl)

    def forward(self, x, route, cos, sin, mask):
        q, k, v = self.qkv(x, route).split([self.q_width, self.kv_width, self.kv_width], dim=-1)
        out = decoder.attention(self.impl, q, k, v, cos, sin, mask, heads=self.heads, kv_heads=self.kv_heads)
        return self.dense(out, route)


class Layer(nn.Module):
    """Pre-RMSNorm decoder layer with the visual expert in attention and MLP."""

    def __init__(self, config: Config, impl: str):
        super().__init__()
        self.input_layernorm = decoder.RMSNorm(config.width, config.eps)
        self.self_attn = ExpertAttention(config, impl)
        self.post_attention_layernorm = decoder.RMSNorm(config.width, config.eps)
        self.mlp = ExpertMLP(config.width, config.mlp_hidden, impl)

    def forward(self, x, route, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), route, cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x), route)


# ----------------------------------------------------------------------------- masks, positions

def _shift(x: torch.Tensor, by: int) -> torch.Tensor:
    """``x [B, S]`` bool moved ``by`` places right (left if negative), False shifted in."""
    pad = torch.zeros_like(x[:, :abs(by)])
    return torch.cat([pad, x[:, :-by]], 1) if by > 0 else torch.cat([x[:, -by:], pad], 1)


def position_ids(vision: torch.Tensor) -> torch.Tensor:
    """CogVLM's rotary positions for ``vision`` (bool ``[B, S]``): every token advances the position
    but an inner image token (an image token between two image tokens) that follows another inner
    one, so the first and last token of an image keep their own positions and its inner tokens
    share one. int64 ``[B, S]``."""
    inner = vision & _shift(vision, 1) & _shift(vision, -1)
    step = ~(inner & _shift(inner, 1))
    return step.long().cumsum(1) - 1


def dense_mask(vision: torch.Tensor) -> torch.Tensor:
    """The plain form's mask, bool ``[B, 1, S, S]``: key ``j`` is visible to query ``i`` when
    ``j <= i``, or when both are image tokens of the same image (run of image tokens)."""
    s = vision.shape[1]
    idx = torch.arange(s, device=vision.device)
    causal = idx[None, :] <= idx[:, None]
    run = torch.cat([torch.zeros_like(vision[:, :1], dtype=torch.long),
                     (vision[:, 1:] != vision[:, :-1]).long().cumsum(1)], 1)
    same_image = vision[:, :, None] & vision[:, None, :] & (run[:, :, None] == run[:, None, :])
    return (causal[None] | same_image)[:, None]


# ----------------------------------------------------------------------------- the model

class Model(nn.Module):
    """CogVLM decoder stack in the form ``impl`` (``"plain"`` or ``"mmkernels"``).

    ``forward(input_ids, token_type_ids, image_features, labels) -> loss`` (0-dim, float32, or
    float64 for float64 parameters):

    * ``input_ids``: int64 ``[B, S]``; image positions hold a placeholder id (their embedding is
      replaced by the projected image features);
    * ``token_type_ids``: int64 ``[B, S]``, 0 language, 1 vision;
    * ``image_features``: floating ``[N, image_feature_dim]``, one row per image position, in
      order (row after row): a ViT's output tokens;
    * ``labels``: int64 ``[B, S]``, the token to predict at each position (the text), -100 where
      none; position ``s`` predicts ``labels[:, s + 1]``.
    """

    def __init__(self, config: Config, impl: str = "mmkernels"):
        super().__init__()
        if not isinstance(config, Config):
            raise TypeError(f"config must be a cogvlm.Config, got {type(config).__name__}")
        self.config, self.impl = config, check_impl(impl)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.width)
        self.vision_proj = nn.Linear(config.image_feature_dim, config.width)
        self.layers = nn.ModuleList(Layer(config, impl) for _ in range(config.layers))
        self.norm = decoder.RMSNorm(config.width, config.eps)
        self.lm_head = nn.Linear(config.width, config.vocab_size, bias=False)
        decoder.init_normal_(self)

    def _check(self, input_ids, token_type_ids, image_features, labels) -> None:
        decoder.check_ids(input_ids, "input_ids")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [B, S], got {tuple(input_ids.shape)}")
        decoder.check_ids(token_type_ids, "token_type_ids", input_ids.shape)
        decoder.check_ids(labels, "labels", input_ids.shape)
        check.tensor(image_features, "image_features", 2)
        check.floating(image_features, "image_features")
        if image_features.shape[1] != self.config.image_feature_dim:
            raise ValueError(f"image_features must have {self.config.image_feature_dim} features, "
                             f"got shape {tuple(image_features.shape)}")
        if token_type_ids.device.type == "cpu" and not torch.compiler.is_compiling():
            if bool(((token_type_ids != LANGUAGE) & (token_type_ids != VISION)).any()):
                raise ValueError("token_type_ids must be 0 (language) or 1 (vision)")
            n = int((token_type_ids == VISION).sum())
            if n != image_features.shape[0]:
                raise ValueError(f"token_type_ids has {n} vision tokens but image_features has "
                                 f"{image_features.shape[0]} rows")

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, image_features: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        self._check(input_ids, token_type_ids, image_features, labels)
        route = Route(token_type_ids.long())
        x = decoder.place_image_tokens(self.embed_tokens(input_ids), route.vision, self.vision_proj(image_features))
        cos, sin = decoder.rotary(position_ids(route.vision), self.config.width // self.config.heads,
                                  self.config.rope_base, x.dtype)
        if self.impl == "plain":
            mask = dense_mask(route.vision)
        else:
            mask = MultimodalMask.image_spans_in_causal(route.ids, image_modality=VISION)
        for layer in self.layers:
            x = layer(x, route, cos, sin, mask)
        return decoder.next_token_loss(self.lm_head(self.norm(x)), labels)


# ----------------------------------------------------------------------------- synthetic data

NUM_CLASSES = 4
_STRUCTURE_SEED = 20240917
_TOKEN_NOISE = 0.1


def structure(config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """What every synthetic batch shares: an image prototype per class (float64
    ``[NUM_CLASSES, image_feature_dim]``) and a text template per class (int64
    ``[NUM_CLASSES, seq_len]``, ids at least ``FIRST_TEXT_TOKEN``)."""
    return decoder.class_structure(NUM_CLASSES, config.image_feature_dim, config.vocab_size, config.seq_len,
                                   FIRST_TEXT_TOKEN, _STRUCTURE_SEED)


def synthetic_batch(config: Config, batch_size: int, *, seed: int, device="cpu",
                    dtype: torch.dtype = torch.float32) -> dict:
    """``batch_size`` sequences of ``config.seq_len`` tokens, each from a latent class: its image
    tokens are the class prototype plus noise, its text the class template with a few tokens
    replaced at random, so the text is predictable from the image. The number of image tokens
    varies across the batch. Returns the keyword arguments of :meth:`Model.forward`
    (``image_features`` in ``dtype``) on ``device``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    g = torch.Generator().manual_seed(seed)
    protos, templates = structure(config)
    b, s = batch_size, config.seq_len
    classes = torch.randint(NUM_CLASSES, (b,), generator=g)
    n_img = torch.randint(config.min_image_tokens, config.max_image_tokens + 1, (b,), generator=g)
    text = templates[classes]
    noise = torch.rand(b, s, generator=g) < _TOKEN_NOISE
    text = torch.where(noise, torch.randint(FIRST_TEXT_TOKEN, config.vocab_size, (b, s), generator=g), text)
    idx = torch.arange(s)[None]
    vision = (idx >= 1) & (idx <= n_img[:, None])
    is_text = idx > n_img[:, None]
    # text token t of a sequence sits at position 1 + n_img + t
    text_pos = (idx - 1 - n_img[:, None]).clamp(min=0)
    input_ids = torch.where(vision, IMAGE_TOKEN, torch.gather(text, 1, text_pos))
    input_ids[:, 0] = BOS
    labels = torch.where(is_text, input_ids, decoder.IGNORE)
    image_class = classes[:, None].expand(b, s)[vision]                      # class of each image token
    image_features = protos[image_class] + 0.5 * torch.randn(image_class.shape[0], config.image_feature_dim,
                                                             generator=g, dtype=torch.float64)
    return {"input_ids": input_ids.to(device), "token_type_ids": vision.long().to(device),
            "image_features": image_features.to(device=device, dtype=dtype), "labels": labels.to(device)}
