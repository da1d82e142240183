"""BLIP-2 stage 1: a frozen image encoder and a Q-Former trained with ITC, ITM and ITG.

As LAVIS ``Blip2Qformer``: a frozen ViT (:class:`~mmkernels.models.layers.VisionTransformer`,
run without gradients) and a trainable LayerNorm give the image tokens; learned query tokens
(and text) go through BERT-style post-LayerNorm layers whose queries cross-attend to the image
every ``cross_attention_freq`` layers and whose queries and text use separate FFNs. The loss is
the sum of image-text contrastive (queries and text in separate passes, max over queries, label
smoothing 0.1), image-text matching on hard negatives drawn from the similarities (``[queries ;
text]`` under the bidirectional mask) and image-grounded text generation (``[queries ; text]``
under the multimodal causal mask, next-token cross-entropy, label smoothing 0.1). The LM head's
decoder has its own weight (BERT ties it to the word embeddings).

The ``mmkernels`` form runs :func:`mmkernels.blip2_itc_loss`, :func:`mmkernels.itm_hard_negatives`,
:func:`mmkernels.multimodal_attention` (under :meth:`mmkernels.MultimodalMask.blip2` for ITM and
ITG, :meth:`~mmkernels.MultimodalMask.key_padding` for the text alone, no mask for the queries
alone and the ViT), :func:`mmkernels.cross_attention`, and one :func:`mmkernels.fused_kv_projection`
GEMM for every cross-attention layer's keys and values, computed once for the ``B`` images and
shared by the three objectives. The ``plain`` form is LAVIS's code: eager attention under dense
masks, per-layer K/V projections of each pass's image tokens (``5 B`` images a step), the
materialised ``[B, B, Q]`` similarities, and the same counter-based draw of the negatives in plain
PyTorch (``mmkernels.contrastive.itc.reference.negatives_reference``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import MultimodalMask, multimodal_attention
from ..contrastive import blip2_itc_loss, itm_hard_negatives
from ..contrastive.itc import random as itc_random
from ..contrastive.itc.reference import negatives_reference
from ..cross_attention import cross_attention, fused_kv_projection, share_kv_storage
from ..cross_attention.reference import MAX_HEAD_DIM
from .common import check_impl
from .layers import VisionTransformer, attend_plain, merge_heads, split_heads

#: reserved token ids: padding, [CLS] (ITC/ITM text), [DEC] (ITG's first token), [SEP]
PAD_ID, CLS_ID, DEC_ID, SEP_ID = 0, 1, 2, 3
NUM_SPECIAL = 4
#: BLIP-2's label smoothing of the ITC and ITG cross-entropies
LABEL_SMOOTHING = 0.1


@dataclass
class Config:
    """Sizes of the frozen ViT, the Q-Former and the heads. The defaults are BLIP-2's with the
    ViT-L/14 image encoder (257 image tokens); :meth:`tiny` is the config the tests train."""

    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    num_query_tokens: int = 32
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    num_layers: int = 12
    cross_attention_freq: int = 2
    vocab_size: int = 30523
    text_len: int = 32
    embed_dim: int = 256
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02

    def __post_init__(self):
        self.validate()

    @classmethod
    def tiny(cls, **overrides) -> "Config":
        """The smallest config, the one the tests train (``overrides`` set fields): two Q-Former
        layers, the first with cross-attention; weights drawn wider than BERT's 0.02, which at
        width 16 would leave the image's and the text's signal too faint to learn from in a few
        steps."""
        fields = dict(image_size=8, patch_size=4, vision_width=16, vision_layers=1, vision_heads=2,
                      num_query_tokens=4, hidden_size=16, num_heads=2, intermediate_size=32,
                      num_layers=2, cross_attention_freq=2, vocab_size=32, text_len=8, embed_dim=8,
                      initializer_range=0.15)
        return cls(**{**fields, **overrides})

    def validate(self) -> None:
        """A ``ValueError`` naming the first field that cannot build a model."""
        for name, value in asdict(self).items():
            if name in ("layer_norm_eps", "initializer_range"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise ValueError(f"Config.{name} must be a positive float, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Config.{name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"Config.image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        if self.vision_width % self.vision_heads:
            raise ValueError(f"Config.vision_width {self.vision_width} is not a multiple of vision_heads "
                             f"{self.vision_heads}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"Config.hidden_size {self.hidden_size} is not a multiple of num_heads "
                             f"{self.num_heads}")
        if self.hidden_size // self.num_heads > MAX_HEAD_DIM:
            raise ValueError(f"Config: head dim hidden_size / num_heads = {self.hidden_size // self.num_heads} "
                             f"is larger than the supported {MAX_HEAD_DIM}")
        if self.vocab_size <= NUM_SPECIAL:
            raise ValueError(f"Config.vocab_size must exceed the {NUM_SPECIAL} special tokens, got "
                             f"{self.vocab_size}")
        if self.text_len < 3:
            raise ValueError(f"Config.text_len must be at least 3 ([CLS] word [SEP]), got {self.text_len}")


# ----------------------------------------------------------------------------- Q-Former pieces

class FFN(nn.Module):
    """BERT's feed-forward sublayer: ``LayerNorm(x + fc2(gelu(fc1(x))))``, ``[..., W] -> [..., W]``."""

    def __init__(self, width: int, hidden: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


class Attention(nn.Module):
    """BERT's attention sublayer, ``LayerNorm(x + dense(attention))``: ``query [W, W]``, ``key``
    and ``value [W, C]`` (``C = W`` for self-attention, the image width for cross-attention)."""

    def __init__(self, width: int, heads: int, kv_width: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)

    def out(self, x: torch.Tensor, heads_out: torch.Tensor) -> torch.Tensor:
        """``[N, S, W]`` from the residual ``x [N, S, W]`` and ``heads_out [N, H, S, D]``."""
        return self.norm(x + self.dense(merge_heads(heads_out)))


class ImageKV:
    """The mmkernels form's cross-attention input: one ``(k, v)`` pair ``[B, H, Lk, D]`` per
    cross-attention layer (views of one fused GEMM over the ``B`` images) and, for ITM's
    ``3 B`` rows ``[positives ; (image neg[i], text i) ; (image i, text neg i)]``, ``neg [B]``
    int64 (``None``: row ``i`` attends to image ``i``)."""

    def __init__(self, kv: list, neg: torch.Tensor | None = None):
        self.kv, self.neg = kv, neg

    def with_negatives(self, neg: torch.Tensor) -> "ImageKV":
        return ImageKV(self.kv, neg)


def _cross_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, neg: torch.Tensor | None) -> torch.Tensor:
    """:func:`mmkernels.cross_attention` of ``q [N, H, Q, D]`` over the per-image ``k, v [B, H,
    Lk, D]``. With ``neg`` (ITM, ``N = 3 B``) the two row blocks that see image ``i`` run as one
    ``2 Q``-query call on ``k, v`` themselves; only the negatives' keys and values are gathered."""
    if neg is None:
        return cross_attention(q, k, v)
    b, queries = k.shape[0], q.shape[2]
    both = torch.stack([q[:b], q[2 * b:]], dim=2).flatten(2, 3)             # [B, H, 2Q, D]
    pos = cross_attention(both, k, v).unflatten(2, (2, queries))            # [B, H, 2, Q, D]
    negs = cross_attention(q[b:2 * b], k.index_select(0, neg), v.index_select(0, neg))
    return torch.cat([pos[:, :, 0], negs, pos[:, :, 1]], dim=0)


class QFormerLayer(nn.Module):
    """One Q-Former layer: self-attention over all tokens, then for the first ``query_len``
    tokens cross-attention to the image (if the layer has it) and the query FFN, for the rest the
    text FFN."""

    def __init__(self, config: Config, has_cross: bool, impl: str):
        super().__init__()
        w, eps = config.hidden_size, config.layer_norm_eps
        self.impl = impl
        self.attention = Attention(w, config.num_heads, w, eps)
        self.crossattention = Attention(w, config.num_heads, config.vision_width, eps) if has_cross else None
        self.ffn = FFN(w, config.intermediate_size, eps)
        self.ffn_query = FFN(w, config.intermediate_size, eps)

    def forward(self, x: torch.Tensor, query_len: int, mask, image, cross_index: int) -> torch.Tensor:
        """``x [N, S, W]``; ``mask``: ``[N, 1, S, S]`` bool (plain) or a ``MultimodalMask``
        (mmkernels), ``None`` for full attention; ``image``: ``[N, Lk, C]`` image tokens (plain)
        or an :class:`ImageKV` (mmkernels); ``cross_index``: this layer's index among the
        cross-attention layers. Returns ``[N, S, W]``."""
        att = self.attention
        q, k, v = (split_heads(lin(x), att.heads) for lin in (att.query, att.key, att.value))
        x = att.out(x, attend_plain(q, k, v, mask) if self.impl == "plain"
                    else multimodal_attention(q, k, v, mask))
        if query_len == 0:
            return self.ffn(x)
        xq = x[:, :query_len]
        if self.crossattention is not None:
            xq = self._cross(xq, image, cross_index)
        xq = self.ffn_query(xq)
        if query_len == x.shape[1]:
            return xq
        return torch.cat([xq, self.ffn(x[:, query_len:])], dim=1)

    def _cross(self, xq: torch.Tensor, image, cross_index: int) -> torch.Tensor:
        att = self.crossattention
        q = split_heads(att.query(xq), att.heads)
        if self.impl == "plain":
            k, v = (split_heads(lin(image), att.heads) for lin in (att.key, att.value))
            return att.out(xq, attend_plain(q, k, v))
        k, v = image.kv[cross_index]
        return att.out(xq, _cross_attend(q, k, v, image.neg))


class QFormer(nn.Module):
    """The Q-Former: text embeddings (word + position), the input LayerNorm over ``[queries ;
    text]`` and the layers (cross-attention in layers ``0, freq, 2 freq, ...``)."""

    def __init__(self, config: Config, impl: str):
        super().__init__()
        w = config.hidden_size
        self.heads = config.num_heads
        self.word_embeddings = nn.Embedding(config.vocab_size, w, padding_idx=PAD_ID)
        self.position_embeddings = nn.Embedding(config.text_len, w)
        self.norm = nn.LayerNorm(w, eps=config.layer_norm_eps)
        freq = config.cross_attention_freq
        self.layers = nn.ModuleList(QFormerLayer(config, i % freq == 0, impl) for i in range(config.num_layers))
        self.cross_index = [i // freq for i in range(config.num_layers)]

    def cross_kv_linears(self) -> list[tuple[nn.Linear, nn.Linear]]:
        """The ``(key, value)`` linears of the cross-attention layers, in order."""
        return [(l.crossattention.key, l.crossattention.value) for l in self.layers if l.crossattention is not None]

    def image_kv(self, image_embeds: torch.Tensor) -> ImageKV:
        """The keys and values of every cross-attention layer from ``image_embeds [B, Lk, C]`` in
        one GEMM (:func:`mmkernels.fused_kv_projection`)."""
        pairs = self.cross_kv_linears()
        kv = fused_kv_projection(image_embeds, [(k.weight, v.weight) for k, v in pairs],
                                 [(k.bias, v.bias) for k, v in pairs], num_heads=self.heads)
        return ImageKV(kv)

    def forward(self, query: torch.Tensor | None, text_ids: torch.Tensor | None, mask, image) -> torch.Tensor:
        """``query [N, Q, W]`` (or ``None``), ``text_ids [N, T]`` int64 (or ``None``); ``mask``
        and ``image`` as :meth:`QFormerLayer.forward` takes them. Returns ``[N, Q + T, W]``."""
        parts = [] if query is None else [query]
        if text_ids is not None:
            pos = torch.arange(text_ids.shape[1], device=text_ids.device)
            parts.append(self.word_embeddings(text_ids) + self.position_embeddings(pos))
        x = self.norm(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
        query_len = 0 if query is None else query.shape[1]
        for layer, ci in zip(self.layers, self.cross_index):
            x = layer(x, query_len, mask, image, ci)
        return x


class LMHead(nn.Module):
    """BERT's LM prediction head: ``decoder(norm(gelu(transform(x))))``, ``[..., W] -> [..., V]``."""

    def __init__(self, width: int, vocab_size: int, eps: float):
        super().__init__()
        self.transform = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.decoder = nn.Linear(width, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.transform(x))))


# ----------------------------------------------------------------------------- the model

class Model(nn.Module):
    """BLIP-2 stage 1 in the form ``impl`` (``"plain"`` or ``"mmkernels"``).

    ``forward(images, text_ids, text_lengths) -> loss`` (0-dim, the parameters' dtype): ``images
    [B, 3, image_size, image_size]`` floating, ``text_ids [B, T]`` int64 (``T <= text_len``;
    ``[CLS] words [SEP]`` then ``PAD_ID``), ``text_lengths [B]`` int64 in ``[1, T]`` (tokens at
    ``t >= text_lengths[b]`` are padding), ``B >= 2`` (ITM draws a negative from the others).
    The loss is ``itc + itm + itg``. The ViT's parameters are frozen (``requires_grad=False``).
    """

    def __init__(self, config: Config, impl: str = "mmkernels"):
        super().__init__()
        if not isinstance(config, Config):
            raise TypeError(f"config must be a mmkernels.models.blip2.Config, got {type(config).__name__}")
        config.validate()
        self.impl, self.config = check_impl(impl), config
        c, w = config, config.hidden_size
        self.visual_encoder = VisionTransformer(c.image_size, c.patch_size, c.vision_width, c.vision_layers,
                                                c.vision_heads, impl=impl)
        self.visual_encoder.requires_grad_(False)
        self.ln_vision = nn.LayerNorm(c.vision_width)
        self.query_tokens = nn.Parameter(torch.empty(c.num_query_tokens, w))
        self.qformer = QFormer(c, impl)
        self.vision_proj = nn.Linear(w, c.embed_dim)
        self.text_proj = nn.Linear(w, c.embed_dim)
        self.itm_head = nn.Linear(w, 2)
        self.lm_head = LMHead(w, c.vocab_size, c.layer_norm_eps)
        self.temp = nn.Parameter(torch.full((), 0.07))
        self._init_weights(c.initializer_range)
        self._share_kv_storage()

    @torch.no_grad()
    def _init_weights(self, std: float) -> None:
        """BERT's initialisation for everything but the ViT: normal(0, std) weights, zero biases."""
        self.query_tokens.normal_(0.0, std)
        for name, m in self.named_modules():
            if name.startswith("visual_encoder"):
                continue
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std)
                m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()

    def _share_kv_storage(self) -> None:
        # the mmkernels form reads every cross-attention layer's K/V weights as one matrix
        if self.impl == "mmkernels":
            share_kv_storage(self.qformer.cross_kv_linears())

    def _apply(self, fn, *args, **kwargs):
        # .to() / .double() give each parameter a new storage: put the K/V weights back together
        out = super()._apply(fn, *args, **kwargs)
        self._share_kv_storage()
        return out

    def _check_batch(self, images, text_ids, text_lengths) -> None:
        c = self.config
        for name, t in (("images", images), ("text_ids", text_ids), ("text_lengths", text_lengths)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        want = (3, c.image_size, c.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want or not images.is_floating_point():
            raise ValueError(f"images must be floating [B, {want[0]}, {want[1]}, {want[2]}], got "
                             f"{images.dtype} {tuple(images.shape)}")
        b = images.shape[0]
        if b < 2:
            raise ValueError(f"the batch needs at least 2 samples (ITM draws negatives from the others), got {b}")
        if text_ids.dim() != 2 or text_ids.dtype != torch.int64 or text_ids.shape[0] != b:
            raise ValueError(f"text_ids must be int64 [B, T] with B = {b}, got {text_ids.dtype} "
                             f"{tuple(text_ids.shape)}")
        if not 1 <= text_ids.shape[1] <= c.text_len:
            raise ValueError(f"text_ids has {text_ids.shape[1]} tokens; T must lie in [1, text_len = {c.text_len}]")
        if text_lengths.dim() != 1 or text_lengths.dtype != torch.int64 or text_lengths.shape[0] != b:
            raise ValueError(f"text_lengths must be int64 [B] with B = {b}, got {text_lengths.dtype} "
                             f"{tuple(text_lengths.shape)}")
        for name, t in (("text_ids", text_ids), ("text_lengths", text_lengths)):
            if t.device != images.device:
                raise ValueError(f"{name} is on {t.device} but images are on {images.device}")

    def _mask(self, mask: MultimodalMask):
        """The self-attention mask in this form: dense ``[N, 1, S, S]`` bool for ``plain``."""
        return mask.to_dense() if self.impl == "plain" else mask

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor, text_lengths: torch.Tensor) -> torch.Tensor:
        """The training loss ``itc + itm + itg`` of one batch (see the class docstring)."""
        self._check_batch(images, text_ids, text_lengths)
        with torch.no_grad():
            self.temp.clamp_(min=0.001, max=0.5)
            vision = self.visual_encoder(images)                               # frozen
        image_embeds = self.ln_vision(vision)                                  # [B, Lk, C]
        b, t = text_ids.shape
        nq = self.config.num_query_tokens
        query = self.query_tokens.expand(b, -1, -1)                           # [B, Q, W]
        image = image_embeds if self.impl == "plain" else self.qformer.image_kv(image_embeds)

        # ITC: the queries alone (with the image), the text alone
        query_out = self.qformer(query, None, None, image)
        text_out = self.qformer(None, text_ids, self._mask(MultimodalMask.key_padding(text_lengths, t)), None)
        image_feats = F.normalize(self.vision_proj(query_out), dim=-1)         # [B, Q, E]
        text_feat = F.normalize(self.text_proj(text_out[:, 0]), dim=-1)       # [B, E], the [CLS] token
        loss_itc = self._itc(image_feats, text_feat)

        # ITM on [positives ; (negative image, text) ; (image, negative text)]
        neg_text, neg_image = self._negatives(image_feats, text_feat)
        ids_all = torch.cat([text_ids, text_ids, text_ids[neg_text]])
        lengths_all = torch.cat([text_lengths, text_lengths, text_lengths[neg_text]])
        if self.impl == "plain":
            image_all = torch.cat([image_embeds, image_embeds[neg_image], image_embeds])
        else:
            image_all = image.with_negatives(neg_image)
        mask = self._mask(MultimodalMask.blip2(nq, lengths_all, t, "itm"))
        out = self.qformer(self.query_tokens.expand(3 * b, -1, -1), ids_all, mask, image_all)
        itm_logits = self.itm_head(out[:, :nq]).mean(dim=1)                   # [3B, 2]
        itm_labels = torch.cat([torch.ones(b, dtype=torch.long, device=images.device),
                                torch.zeros(2 * b, dtype=torch.long, device=images.device)])
        loss_itm = F.cross_entropy(itm_logits, itm_labels)

        # ITG: [DEC] then the words, each predicting the next under the multimodal causal mask
        dec_ids = torch.cat([torch.full_like(text_ids[:, :1], DEC_ID), text_ids[:, 1:]], dim=1)
        padding = torch.arange(t, device=text_ids.device)[None] >= text_lengths[:, None]
        labels = dec_ids.masked_fill(padding, -100)
        mask = self._mask(MultimodalMask.blip2(nq, text_lengths, t, "itg"))
        out = self.qformer(query, dec_ids, mask, image)
        logits = self.lm_head(out[:, nq:])                                    # [B, T, V]
        loss_itg = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                   label_smoothing=LABEL_SMOOTHING)
        return loss_itc + loss_itm + loss_itg

    def _itc(self, image_feats: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
        """BLIP-2's ITC of ``image_feats [B, Q, E]`` and ``text_feat [B, E]`` (normalised)."""
        if self.impl == "mmkernels":
            return blip2_itc_loss(image_feats, text_feat, 1.0 / self.temp, label_smoothing=LABEL_SMOOTHING)
        # LAVIS: concat_all_gather passes no gradient to the other side's features
        image_all, text_all = image_feats.detach(), text_feat.detach()
        sim_q2t = torch.matmul(image_feats.unsqueeze(1), text_all.unsqueeze(-1)).squeeze(-1)   # [B, B, Q]
        sim_i2t = sim_q2t.max(-1).values / self.temp
        sim_t2q = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), image_all.permute(0, 2, 1)).squeeze(-2)
        sim_t2i = sim_t2q.max(-1).values / self.temp                                        # [B, B]
        targets = torch.arange(image_feats.shape[0], device=image_feats.device)
        return (F.cross_entropy(sim_i2t, targets, label_smoothing=LABEL_SMOOTHING)
                + F.cross_entropy(sim_t2i, targets, label_smoothing=LABEL_SMOOTHING)) / 2

    def _negatives(self, image_feats: torch.Tensor, text_feat: torch.Tensor):
        """``(negative text per image, negative image per text)``, int64 ``[B]`` each, drawn from
        the softmax of the scaled similarities without the positive, each direction from a seed
        taken from torch's default generator (as the mmkernels op takes it)."""
        if self.impl == "mmkernels":
            return itm_hard_negatives(image_feats, text_feat, 1.0 / self.temp)
        with torch.no_grad():
            img, txt, scale = image_feats.detach(), text_feat.detach(), 1.0 / self.temp.detach()
            ids = torch.arange(img.shape[0], device=img.device)
            neg_text = negatives_reference(img, txt, scale, ids, ids, itc_random.draw_seed(None, img.device))
            neg_image = negatives_reference(txt, img, scale, ids, ids, itc_random.draw_seed(None, img.device))
        return neg_text, neg_image


# ----------------------------------------------------------------------------- data

#: latent classes of the synthetic data: each has an image prototype and a caption template
NUM_CLASSES = 8


def synthetic_batch(config: Config, batch_size: int, *, seed: int, device="cpu",
                    dtype: torch.dtype = torch.float32) -> dict:
    """A batch with structure: each sample has a latent class (of :data:`NUM_CLASSES`, the same
    prototypes and templates for every seed); its image is the class prototype plus noise, its
    caption ``[CLS]`` + the class template (a tenth of the words replaced at random) + ``[SEP]``,
    of a random length in ``[3, T]`` with ``T = text_len``, padded with ``PAD_ID``. Captions use
    at most 12 distinct words, so that a small model learns their statistics within a few steps.

    Returns ``images [B, 3, S, S]`` (``dtype``), ``text_ids [B, T]`` int64, ``text_lengths [B]``
    int64, on ``device``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2 (ITM needs negatives), got {batch_size!r}")
    s, t, v = config.image_size, config.text_len, config.vocab_size
    shared = torch.Generator().manual_seed(20240)
    prototypes = torch.randn(NUM_CLASSES, 3, s, s, generator=shared)
    words_used = NUM_SPECIAL + min(v - NUM_SPECIAL, 12)
    templates = torch.randint(NUM_SPECIAL, words_used, (NUM_CLASSES, t), generator=shared)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    images = prototypes[labels] + 0.5 * torch.randn(batch_size, 3, s, s, generator=g)
    words = templates[labels]
    noise = torch.randint(NUM_SPECIAL, words_used, words.shape, generator=g)
    words = torch.where(torch.rand(words.shape, generator=g) < 0.1, noise, words)
    lengths = torch.randint(3, t + 1, (batch_size,), generator=g)
    pos = torch.arange(t)[None]
    ids = torch.cat([torch.full((batch_size, 1), CLS_ID), words[:, 1:]], dim=1)
    ids = torch.where(pos == lengths[:, None] - 1, SEP_ID, ids)
    ids = torch.where(pos >= lengths[:, None], PAD_ID, ids)
    return {"images": images.to(device=device, dtype=dtype), "text_ids": ids.to(device),
            "text_lengths": lengths.to(device)}
