"""ALBEF (Li et al., 2021; BLIP's ITC/ITM share it): a ViT image encoder, a BERT-like text encoder,
a fusion encoder (text self-attention, cross-attention to the image tokens, MLP), trained with
image-text contrastive learning (momentum distillation, feature queues) and image-text matching
on hard negatives. Masked language modelling is left out: it has no mmkernels kernel.

The ``mmkernels`` form runs :func:`mmkernels.multimodal_attention` (image and padded text
self-attention, ``MultimodalMask.key_padding``), :func:`mmkernels.momentum_itc_loss` (the queues
read in place, no ``[B, B + K]`` similarities), :func:`mmkernels.itm_hard_negatives`,
:func:`mmkernels.fused_kv_projection` (the K/V of every fusion layer from one GEMM, computed once
per image and gathered for the negative pairs) and :func:`mmkernels.cross_attention`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import MultimodalMask
from ..contrastive import itm_hard_negatives, momentum_itc_loss
from ..contrastive.itc import random as itc_random
from ..contrastive.itc.reference import negatives_reference
from ..cross_attention import cross_attention, fused_kv_projection
from .common import check_impl
from .layers import MLP, Block, SelfAttention, VisionTransformer, attend_plain, merge_heads, split_heads

PAD_ID, CLS_ID = 0, 1   # token ids the synthetic batches use: padding, [CLS]


@dataclass
class Config:
    """ALBEF's sizes (defaults: ALBEF-base, ViT-B/16 at 256 px, 6 + 6 BERT layers)."""

    image_size: int = 256
    patch_size: int = 16
    channels: int = 3
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vocab_size: int = 30522
    text_len: int = 30           # longest text (positions)
    text_width: int = 768
    text_layers: int = 6
    fusion_layers: int = 6
    text_heads: int = 12
    mlp_ratio: float = 4.0
    embed_dim: int = 256         # ITC feature size
    queue_size: int = 65536      # K, a multiple of the batch size
    momentum: float = 0.995      # EMA factor of the momentum encoders
    alpha: float = 0.4           # distillation weight of the ITC targets
    temp: float = 0.07           # initial temperature (learnable, clamped to [0.001, 0.5])

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise ``ValueError`` / ``TypeError`` naming the first bad field."""
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int)):
                raise TypeError(f"Config.{f.name} must be an int, got {v!r}")
            if f.type == "float" and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise TypeError(f"Config.{f.name} must be a float, got {v!r}")
            if f.name not in ("momentum", "alpha") and not v > 0:
                raise ValueError(f"Config.{f.name} must be positive, got {v!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"Config.image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        for width, heads in (("vision_width", "vision_heads"), ("text_width", "text_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"Config.{width} {getattr(self, width)} is not a multiple of "
                                 f"{heads} {getattr(self, heads)}")
        for name in ("momentum", "alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Config.{name} must lie in [0, 1], got {getattr(self, name)!r}")
        if self.vocab_size < 3:
            raise ValueError(f"Config.vocab_size must be at least 3 (padding, [CLS], a word), "
                             f"got {self.vocab_size}")

    @classmethod
    def tiny(cls) -> "Config":
        """The config the tests train: 5 image tokens, 6 text tokens, 32 wide, a queue of 16.
        ``momentum`` 0.5: over a few tens of steps ALBEF's 0.995 would leave the momentum
        encoders (the ITC keys and targets) at their initial, nearly collapsed, features."""
        return cls(image_size=8, patch_size=4, vision_width=32, vision_layers=1, vision_heads=2,
                   vocab_size=24, text_len=6, text_width=32, text_layers=1, fusion_layers=2,
                   text_heads=2, mlp_ratio=2.0, embed_dim=16, queue_size=16, momentum=0.5)


# ----------------------------------------------------------------------------- encoders

class TextEncoder(nn.Module):
    """BERT-like bidirectional text encoder (pre-LayerNorm blocks) over right-padded text.

    ``forward(input_ids [B, T] int64, mask: MultimodalMask.key_padding) -> [B, T, W]`` after the
    final LayerNorm; token 0 is [CLS]. Outputs at padding positions are never read.
    """

    def __init__(self, vocab_size: int, text_len: int, width: int, layers: int, heads: int,
                 mlp_ratio: float, impl: str):
        super().__init__()
        self.token_embed = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.pos_embed = nn.Parameter(torch.randn(text_len, width) * 0.02)
        self.ln_embed = nn.LayerNorm(width, eps=1e-6)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, impl) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width, eps=1e-6)

    def forward(self, input_ids: torch.Tensor, mask: MultimodalMask) -> torch.Tensor:
        x = self.ln_embed(self.token_embed(input_ids) + self.pos_embed[:input_ids.shape[1]])
        for blk in self.blocks:
            x = blk(x, mask)
        return self.ln_post(x)


class CrossAttention(nn.Module):
    """Text-to-image attention: ``query [W, W]``, ``key``/``value [W, C]``, ``proj [W, W]``.

    ``forward(x [N, T, W], kv) -> [N, T, W]``; ``kv`` is the image tokens ``[N, Lk, C]`` in the
    plain form (projected here), a ``(k, v)`` pair of ``[N, H, Lk, W / H]`` in the mmkernels form
    (projected for every layer at once by :meth:`FusionEncoder.image_kv`).
    """

    def __init__(self, width: int, encoder_width: int, heads: int, impl: str):
        super().__init__()
        self.impl, self.heads = impl, heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(encoder_width, width)
        self.value = nn.Linear(encoder_width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, kv) -> torch.Tensor:
        q = split_heads(self.query(x), self.heads)
        if self.impl == "plain":
            k, v = (split_heads(lin(kv), self.heads) for lin in (self.key, self.value))
            out = attend_plain(q, k, v)
        else:
            out = cross_attention(q, *kv)
        return self.proj(merge_heads(out))


class FusionLayer(nn.Module):
    """Pre-LayerNorm fusion layer: ``x + attn(ln_1(x), mask)``, ``x + cross(ln_2(x), kv)``,
    ``x + mlp(ln_3(x))``; ``x [N, T, W]``."""

    def __init__(self, width: int, encoder_width: int, heads: int, mlp_ratio: float, impl: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = SelfAttention(width, heads, impl)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.cross = CrossAttention(width, encoder_width, heads, impl)
        self.ln_3 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, mask: MultimodalMask, kv) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        x = x + self.cross(self.ln_2(x), kv)
        return x + self.mlp(self.ln_3(x))


class FusionEncoder(nn.Module):
    """ALBEF's multimodal encoder: text tokens attend to themselves and to the image tokens.

    ``image_kv(image_embeds [B, Lk, C])`` gives each layer's image input (the tokens themselves in
    the plain form; the ``(k, v)`` views of one fused GEMM in the mmkernels form);
    ``forward(x [N, T, W], mask, kvs) -> [N, T, W]`` after the final LayerNorm.
    """

    def __init__(self, width: int, encoder_width: int, layers: int, heads: int, mlp_ratio: float,
                 impl: str):
        super().__init__()
        self.impl, self.heads = impl, heads
        self.layers = nn.ModuleList(FusionLayer(width, encoder_width, heads, mlp_ratio, impl)
                                    for _ in range(layers))
        self.ln_post = nn.LayerNorm(width, eps=1e-6)

    def image_kv(self, image_embeds: torch.Tensor) -> list:
        if self.impl == "plain":
            return [image_embeds] * len(self.layers)
        crosses = [layer.cross for layer in self.layers]
        return fused_kv_projection(image_embeds, [(c.key.weight, c.value.weight) for c in crosses],
                                   [(c.key.bias, c.value.bias) for c in crosses], num_heads=self.heads)

    def forward(self, x: torch.Tensor, mask: MultimodalMask, kvs: list) -> torch.Tensor:
        for layer, kv in zip(self.layers, kvs):
            x = layer(x, mask, kv)
        return self.ln_post(x)


# ----------------------------------------------------------------------------- the model

class Model(nn.Module):
    """ALBEF pre-training without MLM: ``forward(images, input_ids, attention_mask)`` returns
    ``loss_itc + loss_itm`` (0-dim, the images' dtype).

    Inputs: ``images [B, channels, image_size, image_size]`` floating; ``input_ids [B, T]``
    int64 (``T <= text_len``, token 0 the [CLS]); ``attention_mask [B, T]`` int64 or bool, 1 on
    real tokens, right padding (the text lengths are its row sums). ``B >= 2`` and ``queue_size``
    a multiple of ``B``, as ALBEF's queue requires.

    Forward, as ALBEF's: clamp ``temp``; encode; EMA-update the momentum encoders and
    projections (``*_m``, frozen parameters) under ``no_grad`` and encode with them; ITC against
    ``[momentum features; queue]`` with targets ``alpha * softmax(momentum sims) + (1 - alpha) *
    one-hot``; enqueue the momentum features (buffers ``image_queue``, ``text_queue [D, K]``,
    ``queue_ptr [1]``); ITM on ``B`` positive pairs and ``2B`` hard-negative pairs (for each image
    a text, for each text an image, drawn from the softmax of ``sim / temp`` of online against
    momentum features with the positive excluded), cross-entropy of the fused [CLS] token's
    2-way head.

    The hard negatives are Gumbel-max draws with a counter-based hash seeded from torch's
    default generator (one seed per direction, :func:`mmkernels.itm_hard_negatives`); the plain
    form draws the same seeds and computes the same draw from the materialised similarities
    (:func:`~mmkernels.contrastive.itc.reference.negatives_reference`). That is the distribution
    ALBEF's ``torch.multinomial(softmax(sim) with the positive zeroed)`` samples from.

    Both forms enqueue in place before the backward, as ALBEF does: the plain form's
    concatenation copies the queue, ``momentum_itc_loss`` keeps its own copy for the backward
    (``queue_snapshot``). The mmkernels form writes at ``queue_ptr`` without a host
    synchronisation.
    """

    def __init__(self, config: Config, impl: str = "mmkernels"):
        super().__init__()
        if not isinstance(config, Config):
            raise TypeError(f"config must be an albef.Config, got {type(config).__name__}")
        config.check()
        self.config, self.impl = config, check_impl(impl)
        c = config
        self.visual_encoder = VisionTransformer(c.image_size, c.patch_size, c.vision_width, c.vision_layers,
                                                c.vision_heads, c.mlp_ratio, c.channels, impl)
        self.text_encoder = TextEncoder(c.vocab_size, c.text_len, c.text_width, c.text_layers, c.text_heads,
                                        c.mlp_ratio, impl)
        self.fusion_encoder = FusionEncoder(c.text_width, c.vision_width, c.fusion_layers, c.text_heads,
                                            c.mlp_ratio, impl)
        self.vision_proj = nn.Linear(c.vision_width, c.embed_dim)
        self.text_proj = nn.Linear(c.text_width, c.embed_dim)
        self.itm_head = nn.Linear(c.text_width, 2)
        self.temp = nn.Parameter(torch.tensor(float(c.temp)))
        # momentum copies: same initial values, trained only through the EMA
        for name in self._momentum_names():
            m = copy.deepcopy(getattr(self, name)).requires_grad_(False)
            setattr(self, name + "_m", m)
        self.register_buffer("image_queue", F.normalize(torch.randn(c.embed_dim, c.queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(c.embed_dim, c.queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @staticmethod
    def _momentum_names() -> tuple:
        return ("visual_encoder", "vision_proj", "text_encoder", "text_proj")

    # -- pieces shared by both forms

    def _check_inputs(self, images, input_ids, attention_mask) -> None:
        c = self.config
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"images must be a floating [B, C, H, W] tensor, got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        if tuple(images.shape[1:]) != (c.channels, c.image_size, c.image_size):
            raise ValueError(f"images must be [B, {c.channels}, {c.image_size}, {c.image_size}], got "
                             f"{tuple(images.shape)}")
        b = images.shape[0]
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.int64 or input_ids.dim() != 2:
            raise ValueError("input_ids must be an int64 [B, T] tensor")
        if input_ids.shape[0] != b or not 1 <= input_ids.shape[1] <= c.text_len:
            raise ValueError(f"input_ids must be [B={b}, T <= {c.text_len}], got {tuple(input_ids.shape)}")
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape \
                or attention_mask.is_floating_point():
            raise ValueError(f"attention_mask must be an integer or bool tensor of input_ids' shape "
                             f"{tuple(input_ids.shape)}")
        if b < 2:
            raise ValueError("ITM needs a batch of at least 2 (each sample needs a negative)")
        if c.queue_size % b:
            raise ValueError(f"queue_size {c.queue_size} must be a multiple of the batch size {b}")

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.config.momentum
        for name in self._momentum_names():
            for p, p_m in zip(getattr(self, name).parameters(), getattr(self, name + "_m").parameters()):
                p_m.mul_(m).add_(p.detach(), alpha=1.0 - m)

    def _itm_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [3B, 2]``: B positive pairs, then 2B negative ones."""
        b = logits.shape[0] // 3
        labels = torch.cat([torch.ones(b, dtype=torch.long, device=logits.device),
                            torch.zeros(2 * b, dtype=torch.long, device=logits.device)])
        return F.cross_entropy(logits, labels)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        self._check_inputs(images, input_ids, attention_mask)
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        seq = input_ids.shape[1]
        lengths = attention_mask.to(torch.int64).sum(1)
        text_mask = MultimodalMask.key_padding(lengths, seq)
        image_embeds = self.visual_encoder(images)                                 # [B, 1 + P, Cv]
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)     # [B, D]
        text_embeds = self.text_encoder(input_ids, text_mask)                      # [B, T, W]
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)
        with torch.no_grad():
            self._momentum_update()
            image_feat_m = F.normalize(self.vision_proj_m(self.visual_encoder_m(images)[:, 0]), dim=-1)
            text_embeds_m = self.text_encoder_m(input_ids, text_mask)
            text_feat_m = F.normalize(self.text_proj_m(text_embeds_m[:, 0]), dim=-1)
        if self.impl == "plain":
            loss_itc = self._itc_plain(image_feat, text_feat, image_feat_m, text_feat_m)
            self._enqueue_plain(image_feat_m, text_feat_m)
            neg_text, neg_image = self._negatives_plain(image_feat, text_feat, image_feat_m, text_feat_m)
            logits = self._itm_plain(image_embeds, text_embeds, lengths, neg_text, neg_image)
        else:
            loss_itc = momentum_itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, 1.0 / self.temp,
                                         alpha=self.config.alpha, image_queue=self.image_queue.T,
                                         text_queue=self.text_queue.T)
            self._enqueue(image_feat_m, text_feat_m)
            neg_text, neg_image = itm_hard_negatives(image_feat, text_feat, 1.0 / self.temp,
                                                     image_keys=image_feat_m, text_keys=text_feat_m)
            logits = self._itm(image_embeds, text_embeds, lengths, neg_text, neg_image)
        return loss_itc + self._itm_loss(logits)

    # -- the plain form, as ALBEF's code writes it

    def _itc_plain(self, image_feat, text_feat, image_feat_m, text_feat_m) -> torch.Tensor:
        """``[B, B + K]`` similarities against ``[momentum features; queue]``, soft targets."""
        alpha, temp = self.config.alpha, self.temp
        with torch.no_grad():
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1)
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1)
            sim_i2t_m = image_feat_m @ text_feat_all / temp
            sim_t2i_m = text_feat_m @ image_feat_all / temp
            sim_targets = torch.zeros_like(sim_i2t_m)
            sim_targets.fill_diagonal_(1)
            sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
            sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
        sim_i2t = image_feat @ text_feat_all / temp
        sim_t2i = text_feat @ image_feat_all / temp
        loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
        loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
        return (loss_i2t + loss_t2i) / 2

    @torch.no_grad()
    def _enqueue_plain(self, image_feat_m, text_feat_m) -> None:
        b, ptr = image_feat_m.shape[0], int(self.queue_ptr)
        self.image_queue[:, ptr:ptr + b] = image_feat_m.T
        self.text_queue[:, ptr:ptr + b] = text_feat_m.T
        self.queue_ptr[0] = (ptr + b) % self.config.queue_size

    @torch.no_grad()
    def _negatives_plain(self, image_feat, text_feat, image_feat_m, text_feat_m):
        """(negative text per image, negative image per text), int64 ``[B]`` each: the seeds drawn
        as ``itm_hard_negatives`` draws them, the draw over the materialised similarities."""
        ids = torch.arange(image_feat.shape[0], device=image_feat.device)
        scale = 1.0 / self.temp
        seed = itc_random.draw_seed(None, image_feat.device)
        neg_text = negatives_reference(image_feat, text_feat_m, scale, ids, ids, seed)
        seed = itc_random.draw_seed(None, image_feat.device)
        neg_image = negatives_reference(text_feat, image_feat_m, scale, ids, ids, seed)
        return neg_text, neg_image

    def _itm_plain(self, image_embeds, text_embeds, lengths, neg_text, neg_image) -> torch.Tensor:
        """ITM logits ``[3B, 2]``: a pass over the positive pairs, one over the negative pairs."""
        seq = text_embeds.shape[1]
        fusion = self.fusion_encoder
        output_pos = fusion(text_embeds, MultimodalMask.key_padding(lengths, seq),
                            fusion.image_kv(image_embeds))
        image_embeds_all = torch.cat([image_embeds[neg_image], image_embeds], dim=0)
        text_embeds_all = torch.cat([text_embeds, text_embeds[neg_text]], dim=0)
        lengths_all = torch.cat([lengths, lengths[neg_text]], dim=0)
        output_neg = fusion(text_embeds_all, MultimodalMask.key_padding(lengths_all, seq),
                            fusion.image_kv(image_embeds_all))
        return self.itm_head(torch.cat([output_pos[:, 0], output_neg[:, 0]], dim=0))

    # -- the mmkernels form

    @torch.no_grad()
    def _enqueue(self, image_feat_m, text_feat_m) -> None:
        """Write the momentum features at ``queue_ptr`` in place, without host synchronisation."""
        b, k = image_feat_m.shape[0], self.config.queue_size
        cols = (self.queue_ptr + torch.arange(b, device=self.queue_ptr.device)) % k
        self.image_queue.index_copy_(1, cols, image_feat_m.T)
        self.text_queue.index_copy_(1, cols, text_feat_m.T)
        self.queue_ptr.copy_((self.queue_ptr + b) % k)

    def _itm(self, image_embeds, text_embeds, lengths, neg_text, neg_image) -> torch.Tensor:
        """ITM logits ``[3B, 2]`` from one fusion pass over the ``3B`` pairs, in the plain form's
        order; every layer's image K/V comes from one GEMM over the ``B`` images, gathered."""
        seq = text_embeds.shape[1]
        text_all = torch.cat([text_embeds, text_embeds, text_embeds[neg_text]], dim=0)
        lengths_all = torch.cat([lengths, lengths, lengths[neg_text]], dim=0)
        # images (pos, neg, pos): only the middle third is a gather, whose backward scatters
        kvs = [tuple(torch.cat([t, t.index_select(0, neg_image), t]) for t in kv)
               for kv in self.fusion_encoder.image_kv(image_embeds)]
        output = self.fusion_encoder(text_all, MultimodalMask.key_padding(lengths_all, seq), kvs)
        return self.itm_head(output[:, 0])


# ----------------------------------------------------------------------------- data

def synthetic_batch(config: Config, batch_size: int, *, seed: int, device="cpu",
                    dtype: torch.dtype = torch.float32) -> dict:
    """Image-text pairs drawn from 16 latent classes shared by every batch (the class prototypes
    come from a fixed seed): an image is its class's prototype plus noise, a text is [CLS] and
    its class's token template (a few words swapped for random ones), right-padded to a random
    length.

    Returns ``images [B, channels, image_size, image_size]`` in ``dtype``, ``input_ids [B,
    text_len]`` int64 and ``attention_mask [B, text_len]`` int64 (1 on real tokens).
    """
    c = config
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    classes, t = 16, c.text_len
    fixed = torch.Generator().manual_seed(20210716)
    protos = torch.randn(classes, c.channels, c.image_size, c.image_size, generator=fixed)
    templates = torch.randint(CLS_ID + 1, c.vocab_size, (classes, t), generator=fixed)
    g = torch.Generator().manual_seed(int(seed))
    label = torch.randint(0, classes, (batch_size,), generator=g)
    images = protos[label] + 0.5 * torch.randn(protos[label].shape, generator=g)
    ids = templates[label]
    noise = torch.randint(CLS_ID + 1, c.vocab_size, ids.shape, generator=g)
    ids = torch.where(torch.rand(ids.shape, generator=g) < 0.15, noise, ids)
    ids[:, 0] = CLS_ID
    lengths = torch.randint(max(1, (t + 1) // 2), t + 1, (batch_size,), generator=g)
    attention_mask = (torch.arange(t)[None, :] < lengths[:, None]).to(torch.int64)
    ids = ids.masked_fill(attention_mask == 0, PAD_ID)
    return {"images": images.to(device=device, dtype=dtype), "input_ids": ids.to(device),
            "attention_mask": attention_mask.to(device)}
