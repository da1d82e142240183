"""LLaVA: image features through an MLP projector into the token stream of a LLaMA-style decoder,
trained on packed sequences.

Each row of a batch packs several samples (``[BOS, image tokens, text tokens]``, text of varying
length) back to back; the position ids restart at 0 with every sample, and a sample attends
causally to itself only. The loss is next-token cross-entropy on each sample's text tokens,
never across a sample boundary.

* ``plain``: HF's eager attention under the dense block-diagonal causal mask built from the
  position ids;
* ``mmkernels``: :func:`mmkernels.multimodal_attention` under :meth:`mmkernels.MultimodalMask.packed`,
  every row's samples taken as one varlen sequence (``cu_seqlens``, as a flattening data
  collator gives them). The MLP is LLaMA's SwiGLU in both forms: mmkernels has no op for a
  single-expert MLP.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validation as check
from ..attention import MultimodalMask
from . import decoder
from .common import check_impl

#: token ids with a fixed meaning (text tokens are the ids above)
PAD, BOS, IMAGE_TOKEN = 0, 1, 2
FIRST_TEXT_TOKEN = 3


@dataclass
class Config:
    """Sizes of the model and of its packed rows.

    Every sample has ``image_tokens`` image tokens (LLaVA-1.5: 576) and between ``min_text`` and
    ``max_text`` text tokens; rows of ``seq_len`` tokens are filled with samples (the last one
    cut to fit) and padded when no further sample fits. ``kv_heads < heads`` gives grouped-query
    attention. No dropout (a LLaMA-style decoder).
    """

    vocab_size: int = 256
    width: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    mlp_hidden: int = 256
    image_feature_dim: int = 64
    image_tokens: int = 16
    seq_len: int = 128
    min_text: int = 8
    max_text: int = 32
    rope_base: float = 10000.0
    eps: float = 1e-6

    def __post_init__(self):
        decoder.check_config(self, ("vocab_size", "width", "layers", "heads", "kv_heads", "mlp_hidden",
                                    "image_feature_dim", "image_tokens", "seq_len", "min_text", "max_text"))
        if self.min_text < 2:
            raise ValueError(f"Config: min_text must be at least 2, got {self.min_text}")
        if self.max_text < self.min_text:
            raise ValueError(f"Config: max_text {self.max_text} < min_text {self.min_text}")
        if self.seq_len < 1 + self.image_tokens + self.min_text:
            raise ValueError(f"Config: seq_len {self.seq_len} cannot hold one sample (BOS, image_tokens "
                             f"{self.image_tokens}, min_text {self.min_text})")
        if self.vocab_size <= FIRST_TEXT_TOKEN + NUM_CLASSES:
            raise ValueError(f"Config: vocab_size {self.vocab_size} must exceed {FIRST_TEXT_TOKEN + NUM_CLASSES} "
                             "(the special tokens and some text tokens)")

    @classmethod
    def tiny(cls) -> "Config":
        """The smallest config: the one the tests train (all three backends)."""
        return cls(vocab_size=24, width=32, layers=1, heads=2, kv_heads=1, mlp_hidden=48,
                   image_feature_dim=16, image_tokens=2, seq_len=20, min_text=2, max_text=6)


class Projector(nn.Module):
    """LLaVA-1.5's ``mlp2x_gelu`` projector: ``linear_2(gelu(linear_1(x)))``, ``[..., Fv] -> [..., W]``."""

    def __init__(self, in_features: int, width: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, width)
        self.linear_2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class Attention(nn.Module):
    """LLaMA attention: ``q_proj [H D, W]``, ``k_proj``/``v_proj [Hkv D, W]``, ``o_proj [W, H D]``, no
    biases. ``forward(x [B, S, W], cos, sin, mask) -> [B, S, W]``."""

    def __init__(self, config: Config, impl: str):
        super().__init__()
        self.impl, self.heads, self.kv_heads = impl, config.heads, config.kv_heads
        d = config.width // config.heads
        self.q_proj = nn.Linear(config.width, config.heads * d, bias=False)
        self.k_proj = nn.Linear(config.width, config.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(config.width, config.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(config.heads * d, config.width, bias=False)

    def forward(self, x, cos, sin, mask):
        out = decoder.attention(self.impl, self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, mask,
                                heads=self.heads, kv_heads=self.kv_heads)
        return self.o_proj(out)


class Layer(nn.Module):
    """LLaMA decoder layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))`` (RMSNorm, SwiGLU)."""

    def __init__(self, config: Config, impl: str):
        super().__init__()
        self.input_layernorm = decoder.RMSNorm(config.width, config.eps)
        self.self_attn = Attention(config, impl)
        self.post_attention_layernorm = decoder.RMSNorm(config.width, config.eps)
        self.mlp = decoder.SwiGLU(config.width, config.mlp_hidden)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def dense_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """The plain form's mask, bool ``[B, 1, S, S]``: a new sample starts wherever the position id
    is 0; key ``j`` is visible to query ``i`` when ``j <= i`` in the same sample."""
    s = position_ids.shape[1]
    sample = (position_ids == 0).long().cumsum(1)
    idx = torch.arange(s, device=position_ids.device)
    causal = idx[None, :] <= idx[:, None]
    return (causal[None] & (sample[:, :, None] == sample[:, None, :]))[:, None]


class Model(nn.Module):
    """LLaVA on packed rows in the form ``impl`` (``"plain"`` or ``"mmkernels"``).

    ``forward(input_ids, position_ids, cu_seqlens, image_features, labels) -> loss`` (0-dim, float32, or
    float64 for float64 parameters):

    * ``input_ids``: int64 ``[B, S]``; image positions hold ``IMAGE_TOKEN`` (their embedding is
      replaced by the projected image features);
    * ``position_ids``: int64 ``[B, S]``, restarting at 0 with every sample (padding at the end of
      a row counts as one more sample);
    * ``cu_seqlens``: int32 ``[N + 1]``, the sample boundaries in the ``B * S`` tokens taken row
      after row (the same samples as ``position_ids``): the mmkernels form's varlen mask;
    * ``image_features``: floating ``[M, image_tokens, image_feature_dim]``, one image per sample,
      in order;
    * ``labels``: int64 ``[B, S]``, the token to predict (the text), -100 where none; position
      ``s`` predicts ``labels[:, s + 1]`` unless a sample starts at ``s + 1``.
    """

    def __init__(self, config: Config, impl: str = "mmkernels"):
        super().__init__()
        if not isinstance(config, Config):
            raise TypeError(f"config must be a llava.Config, got {type(config).__name__}")
        self.config, self.impl = config, check_impl(impl)
        self.mm_projector = Projector(config.image_feature_dim, config.width)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.width)
        self.layers = nn.ModuleList(Layer(config, impl) for _ in range(config.layers))
        self.norm = decoder.RMSNorm(config.width, config.eps)
        self.lm_head = nn.Linear(config.width, config.vocab_size, bias=False)
        decoder.init_normal_(self)

    def _check(self, input_ids, position_ids, cu_seqlens, image_features, labels) -> None:
        c = self.config
        decoder.check_ids(input_ids, "input_ids")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [B, S], got {tuple(input_ids.shape)}")
        decoder.check_ids(position_ids, "position_ids", input_ids.shape)
        decoder.check_ids(labels, "labels", input_ids.shape)
        decoder.check_ids(cu_seqlens, "cu_seqlens")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens must have shape [N + 1] with N >= 1, got {tuple(cu_seqlens.shape)}")
        check.tensor(image_features, "image_features", 3)
        check.floating(image_features, "image_features")
        if tuple(image_features.shape[1:]) != (c.image_tokens, c.image_feature_dim):
            raise ValueError(f"image_features must have shape [M, {c.image_tokens}, {c.image_feature_dim}], "
                             f"got {tuple(image_features.shape)}")
        if input_ids.device.type == "cpu" and not torch.compiler.is_compiling():
            n = int((input_ids == IMAGE_TOKEN).sum())
            if n != image_features.shape[0] * c.image_tokens:
                raise ValueError(f"input_ids has {n} image tokens but image_features holds "
                                 f"{image_features.shape[0]} x {c.image_tokens}")
            if int(cu_seqlens[-1]) != input_ids.numel():
                raise ValueError(f"cu_seqlens must end at B * S = {input_ids.numel()}, got {int(cu_seqlens[-1])}")

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                image_features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check(input_ids, position_ids, cu_seqlens, image_features, labels)
        c = self.config
        image = self.mm_projector(image_features).reshape(-1, c.width)
        x = decoder.place_image_tokens(self.embed_tokens(input_ids), input_ids == IMAGE_TOKEN, image)
        cos, sin = decoder.rotary(position_ids, c.width // c.heads, c.rope_base, x.dtype)
        if self.impl == "plain":
            mask = dense_mask(position_ids)
        else:
            mask = MultimodalMask.packed(cu_seqlens, causal=True, seq_len=input_ids.numel())
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        # the first token of a sample is never a target: no prediction crosses a sample boundary
        labels = labels.masked_fill(position_ids == 0, decoder.IGNORE)
        return decoder.next_token_loss(self.lm_head(self.norm(x)), labels)


# ----------------------------------------------------------------------------- synthetic data

NUM_CLASSES = 4
_STRUCTURE_SEED = 20231005
_TOKEN_NOISE = 0.1


def structure(config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """What every synthetic batch shares: an image prototype per class (float64
    ``[NUM_CLASSES, image_feature_dim]``) and a text template per class (int64
    ``[NUM_CLASSES, max_text]``, ids at least ``FIRST_TEXT_TOKEN``)."""
    return decoder.class_structure(NUM_CLASSES, config.image_feature_dim, config.vocab_size, config.max_text,
                                   FIRST_TEXT_TOKEN, _STRUCTURE_SEED)


def _row(config: Config, g: torch.Generator, templates: torch.Tensor) -> tuple[list, list, list, list, list]:
    """One packed row, as lists of ints: its token ids, position ids and labels (``seq_len`` each),
    its sample lengths (padding included) and the class of each sample's image."""
    c, ids, pos, labels, lengths, classes = config, [], [], [], [], []
    one = 1 + c.image_tokens
    while c.seq_len - len(ids) >= one + c.min_text:
        room = c.seq_len - len(ids) - one
        n_text = min(int(torch.randint(c.min_text, c.max_text + 1, (), generator=g)), room)
        cls = int(torch.randint(NUM_CLASSES, (), generator=g))
        text = templates[cls, :n_text].clone()
        noise = torch.rand(n_text, generator=g) < _TOKEN_NOISE
        text[noise] = torch.randint(FIRST_TEXT_TOKEN, c.vocab_size, (int(noise.sum()),), generator=g)
        ids += [BOS] + [IMAGE_TOKEN] * c.image_tokens + text.tolist()
        labels += [decoder.IGNORE] * one + text.tolist()
        pos += list(range(one + n_text))
        lengths.append(one + n_text)
        classes.append(cls)
    pad = c.seq_len - len(ids)
    if pad:                                 # padding: one more sample that no loss reads
        ids += [PAD] * pad
        labels += [decoder.IGNORE] * pad
        pos += list(range(pad))
        lengths.append(pad)
    return ids, pos, labels, lengths, classes


def synthetic_batch(config: Config, batch_size: int, *, seed: int, device="cpu",
                    dtype: torch.dtype = torch.float32) -> dict:
    """``batch_size`` packed rows of ``config.seq_len`` tokens. Each sample comes from a latent
    class: its image features are the class prototype plus noise, its text a prefix (of random
    length) of the class template with a few tokens replaced at random, so the text is
    predictable from the image. Returns the keyword arguments of :meth:`Model.forward`
    (``image_features`` in ``dtype``) on ``device``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    g = torch.Generator().manual_seed(seed)
    protos, templates = structure(config)
    ids, pos, labels, lengths, classes = [], [], [], [], []
    for _ in range(batch_size):
        row_ids, row_pos, row_labels, row_lengths, row_classes = _row(config, g, templates)
        ids.append(row_ids)
        pos.append(row_pos)
        labels.append(row_labels)
        lengths += row_lengths
        classes += row_classes
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    cls = torch.tensor(classes, dtype=torch.int64)
    features = protos[cls][:, None, :] + 0.5 * torch.randn(len(classes), config.image_tokens,
                                                           config.image_feature_dim, generator=g,
                                                           dtype=torch.float64)
    return {"input_ids": torch.tensor(ids, device=device), "position_ids": torch.tensor(pos, device=device),
            "cu_seqlens": cu.to(device), "image_features": features.to(device=device, dtype=dtype),
            "labels": torch.tensor(labels, device=device)}
