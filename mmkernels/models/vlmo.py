"""VLMo / BEiT-3: a multiway transformer, trained with image-text contrast (ITC) and matching (ITM).

Every block shares its self-attention (and, as in VLMo, the LayerNorm before it) across
modalities and holds modality experts for the LayerNorm before the FFN and for the FFN: a
vision and a language expert (V-FFN, L-FFN), and in the top ``vl_layers`` blocks a third,
vision-language expert (VL-FFN) for image-text pairs, as in VLMo. The final LayerNorm has a
vision and a language expert (BEiT-3's ``MultiwayNetwork`` around it).

One training step encodes ``3 B`` rows ``[image tokens ; text tokens]``, three per pair:

* the **unimodal** row: a block-diagonal mask keeps image and text apart, so the row holds the
  image-only and the text-only encodings of the pair (VLMo's separate passes, packed); its
  class tokens give the ITC features;
* the **matched** row (the pair) and the **mismatched** row (the image with a random other
  text), fused by full attention; a head on the text ``[CLS]`` tells match from not (ITM).

Below the VL blocks every row splits by position (the number of image tokens: V before, L
after); in the VL blocks the batch is mixed: unimodal rows route V / L, fused rows VL, by a
modality-ids tensor per token.

The ``mmkernels`` form runs :class:`mmkernels.MultiwayFFN` and :class:`mmkernels.MultiwayLayerNorm`
(split position or ids tensor), :func:`mmkernels.multimodal_attention` (segment mask from
per-token metadata) and :func:`mmkernels.contrastive_loss`. The ``plain`` form indexes the same
stacked expert weights: torchscale's split / concatenate for the split layout, boolean-index
routing for the ids, eager attention with a dense mask, and the materialised ``[B, B]`` logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import MultimodalMask
from ..attention.mask import FULL
from ..contrastive import contrastive_loss
from ..experts import MultiwayFFN, MultiwayLayerNorm
from .common import check_impl
from .layers import SelfAttention

#: expert indices: vision, language, vision-language (the last only in the top blocks)
V, L, VL = 0, 1, 2

#: token ids the synthetic texts reserve: padding and the leading [CLS]
PAD, CLS = 0, 1


@dataclass
class Config:
    """Sizes of the model (defaults: VLMo-Base, ViT-B/16 at 224 pixels, 40 text tokens)."""

    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    vocab_size: int = 30522
    text_len: int = 40          # text tokens per sample, [CLS] included (padded to this)
    width: int = 768
    heads: int = 12
    layers: int = 12
    vl_layers: int = 2          # the top blocks with a VL expert
    mlp_ratio: float = 4.0
    embed_dim: int = 768        # ITC feature size
    eps: float = 1e-6           # of every LayerNorm

    @classmethod
    def tiny(cls) -> "Config":
        """The config the tests train: 5 image tokens, 6 text tokens, width 32, 2 blocks (1 VL)."""
        return cls(image_size=8, patch_size=4, channels=3, vocab_size=32, text_len=6, width=32, heads=2,
                   layers=2, vl_layers=1, mlp_ratio=2.0, embed_dim=16)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int)):
                raise TypeError(f"Config.{f.name} must be an int, got {v!r}")
        for name in ("image_size", "patch_size", "channels", "width", "heads", "layers", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"Config.{name} must be at least 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if not 0 <= self.vl_layers <= self.layers:
            raise ValueError(f"vl_layers must lie in [0, layers = {self.layers}], got {self.vl_layers}")
        if self.text_len < 2:
            raise ValueError(f"text_len must be at least 2 ([CLS] and one word), got {self.text_len}")
        if self.vocab_size < 3:
            raise ValueError(f"vocab_size must be at least 3 (padding, [CLS], one word), got {self.vocab_size}")
        if not self.mlp_ratio > 0 or int(self.width * self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio must give an FFN width of at least 1, got {self.mlp_ratio}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")

    @property
    def image_tokens(self) -> int:
        """Class token plus patches."""
        return 1 + (self.image_size // self.patch_size) ** 2


#: how a multiway module routes ``x [B, S, W]``: a split position, or int64 modality ids ``[B, S]``
Route = int | torch.Tensor


def _route_plain(fn, x: torch.Tensor, route: Route, experts: int, width_out: int) -> torch.Tensor:
    """``fn(tokens, e)`` for each of ``experts`` experts, routed as the papers' code does: an int
    ``route`` splits ``x [B, S, W]`` by position and concatenates (torchscale
    ``MultiwayNetwork``); an ids tensor ``[B, S]`` selects each expert's tokens by boolean
    indexing into an empty output (as CogVLM routes)."""
    if isinstance(route, int):
        return torch.cat([fn(x[:, :route], V), fn(x[:, route:], L)], dim=1)
    out = x.new_empty(*x.shape[:-1], width_out)
    for e in range(experts):
        sel = route == e
        out[sel] = fn(x[sel], e)
    return out


def layer_norm(impl: str, norm: MultiwayLayerNorm, x: torch.Tensor, route: Route) -> torch.Tensor:
    """The multiway LayerNorm ``norm`` (``weight, bias [E, W]``) of ``x [B, S, W]``; ``route``: an
    int split position (two experts) or an int64 modality-ids tensor ``[B, S]``."""
    if impl == "mmkernels":
        return norm(x, route)
    return _route_plain(lambda t, e: F.layer_norm(t, norm.normalized_shape, norm.weight[e], norm.bias[e], norm.eps),
                        x, route, norm.num_experts, x.shape[-1])


def ffn(impl: str, mlp: MultiwayFFN, x: torch.Tensor, route: Route) -> torch.Tensor:
    """The multiway FFN ``mlp`` (``w_in [E, F, W]``, ``w_out [E, W, F]``, gelu) of ``x [B, S, W]``,
    ``route`` as for :func:`layer_norm`."""
    if impl == "mmkernels":
        return mlp(x, route)

    def expert(t, e):
        return F.linear(F.gelu(F.linear(t, mlp.w_in[e], mlp.b_in[e])), mlp.w_out[e], mlp.b_out[e])
    return _route_plain(expert, x, route, mlp.num_experts, mlp.out_features)


class MultiwayBlock(nn.Module):
    """Pre-LayerNorm block as VLMo writes it: ``x + attn(ln_1(x))`` with the LayerNorm and the
    attention shared, then ``x + ffn(ln_2(x))`` with ``ln_2`` and ``ffn`` holding ``experts``
    experts (2: V, L; 3: V, L, VL). ``forward(x [B, S, W], mask, route, vl_route) -> [B, S, W]``:
    a block with the VL expert routes by ``vl_route``, the others by ``route``."""

    def __init__(self, config: Config, experts: int, impl: str):
        super().__init__()
        w, e = config.width, experts
        self.impl, self.experts = impl, experts
        self.ln_1 = nn.LayerNorm(w, eps=config.eps)
        self.attn = SelfAttention(w, config.heads, impl)
        self.ln_2 = MultiwayLayerNorm(w, e, eps=config.eps)
        self.ffn = MultiwayFFN(w, int(w * config.mlp_ratio), e, activation="gelu")

    def forward(self, x: torch.Tensor, mask: MultimodalMask, route: Route, vl_route: Route) -> torch.Tensor:
        r = vl_route if self.experts == 3 else route
        x = x + self.attn(self.ln_1(x), mask)
        return x + ffn(self.impl, self.ffn, layer_norm(self.impl, self.ln_2, x, r), r)


class Model(nn.Module):
    """VLMo in the form ``impl`` (``"plain"`` or ``"mmkernels"``).

    ``forward(images, text_ids, text_lengths) -> loss`` (0-dim, images' dtype): ITC + ITM.

    * ``images``: ``[B, channels, image_size, image_size]`` floating, ``B >= 2``;
    * ``text_ids``: int64 ``[B, text_len]``, ``[CLS]`` first;
    * ``text_lengths``: int64 ``[B]`` in ``[1, text_len]``: tokens at and past it are padding.

    The ITM negatives (a random other text for each image) are drawn from torch's default
    generator on the batch's device, the same in both forms.
    """

    def __init__(self, config: Config, impl: str = "mmkernels"):
        super().__init__()
        if not isinstance(config, Config):
            raise TypeError(f"config must be a vlmo.Config, got {type(config).__name__}")
        self.config, self.impl = config, check_impl(impl)
        w = config.width
        self.patch_embed = nn.Conv2d(config.channels, w, config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.randn(w) * 0.02)
        self.image_pos = nn.Parameter(torch.randn(config.image_tokens, w) * 0.02)
        self.word_embed = nn.Embedding(config.vocab_size, w)
        self.text_pos = nn.Parameter(torch.randn(config.text_len, w) * 0.02)
        self.type_embed = nn.Parameter(torch.randn(2, w) * 0.02)          # image, text
        bottom = config.layers - config.vl_layers
        self.blocks = nn.ModuleList(MultiwayBlock(config, 2 if i < bottom else 3, impl) for i in range(config.layers))
        self.ln_final = MultiwayLayerNorm(w, 2, eps=config.eps)
        self.image_proj = nn.Linear(w, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(w, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))
        self.itm_head = nn.Linear(w, 2)

    # -- inputs
    def _check(self, images, text_ids, text_lengths) -> None:
        c = self.config
        for name, t in (("images", images), ("text_ids", text_ids), ("text_lengths", text_lengths)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        want = (c.channels, c.image_size, c.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want or not images.is_floating_point():
            raise ValueError(f"images must be floating [B, {want[0]}, {want[1]}, {want[2]}], got "
                             f"{images.dtype} {tuple(images.shape)}")
        b = images.shape[0]
        if b < 2:
            raise ValueError(f"the batch needs at least 2 pairs (ITM draws a negative text from another pair), got {b}")
        if text_ids.dtype != torch.int64 or tuple(text_ids.shape) != (b, c.text_len):
            raise ValueError(f"text_ids must be int64 [B, text_len] = [{b}, {c.text_len}], got "
                             f"{text_ids.dtype} {tuple(text_ids.shape)}")
        if text_lengths.dtype != torch.int64 or tuple(text_lengths.shape) != (b,):
            raise ValueError(f"text_lengths must be int64 [B] = [{b}], got {text_lengths.dtype} "
                             f"{tuple(text_lengths.shape)}")
        if text_lengths.device.type == "cpu":          # a value check on a GPU would synchronise
            if bool(((text_lengths < 1) | (text_lengths > c.text_len)).any()):
                raise ValueError(f"text_lengths must lie in [1, {c.text_len}], got {text_lengths.tolist()}")

    def _embed(self, images: torch.Tensor, text_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens ``[B, Ni, W]`` (class token, patches) and text tokens ``[B, Nt, W]``."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], dim=1)
        img = x + self.image_pos + self.type_embed[0]
        txt = self.word_embed(text_ids) + self.text_pos + self.type_embed[1]
        return img, txt

    def _encode(self, x: torch.Tensor, mask: MultimodalMask, route: Route, vl_route: Route) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x, mask, route, vl_route)
        return layer_norm(self.impl, self.ln_final, x, route)

    def _rows(self, text_lengths: torch.Tensor, ni: int, nt: int) -> tuple[MultimodalMask, torch.Tensor]:
        """The mask and the VL blocks' modality ids ``[3B, Ni + Nt]`` of the rows (unimodal,
        matched, mismatched) of each pair; ``text_lengths [3B]``, one per row."""
        rows, s = text_lengths.shape[0], ni + nt
        pos = torch.arange(s, device=text_lengths.device)
        fused = (torch.arange(rows, device=pos.device) % 3 != 0)[:, None]
        is_text = (pos >= ni)[None]
        # segments: image 0 and text 1 in a unimodal row, 0 in a fused row, -1 on padding
        seg = torch.where(fused, 0, is_text.long()).expand(rows, s)
        seg = torch.where(pos[None] < ni + text_lengths[:, None], seg, -1)
        mask = MultimodalMask(torch.zeros_like(seg), [[FULL]], segment_ids=seg)
        ids = torch.where(fused, VL, is_text.long()).expand(rows, s).contiguous()
        return mask, ids

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor, text_lengths: torch.Tensor) -> torch.Tensor:
        self._check(images, text_ids, text_lengths)
        img, txt = self._embed(images, text_ids)
        b, ni, nt = img.shape[0], img.shape[1], txt.shape[1]
        other = (torch.arange(b, device=img.device) + torch.randint(1, b, (b,), device=img.device)) % b
        pair = torch.cat([img, txt], dim=1)
        x = torch.stack([pair, pair, torch.cat([img, txt[other]], dim=1)], dim=1).reshape(3 * b, ni + nt, -1)
        lengths = torch.stack([text_lengths, text_lengths, text_lengths[other]], dim=1).reshape(-1)
        mask, ids = self._rows(lengths, ni, nt)
        out = self._encode(x, mask, ni, ids).reshape(b, 3, ni + nt, -1)
        return self._itc(out[:, 0, 0], out[:, 0, ni]) + self._itm(out[:, 1:, ni])

    # -- objectives
    def _itc(self, image_cls: torch.Tensor, text_cls: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE of the unimodal rows' class tokens ``[B, W]`` (image, text [CLS])."""
        img_f = F.normalize(self.image_proj(image_cls), dim=-1)
        txt_f = F.normalize(self.text_proj(text_cls), dim=-1)
        scale = self.logit_scale.exp()
        if self.impl == "mmkernels":
            return contrastive_loss(img_f, txt_f, scale)
        logits = scale * img_f @ txt_f.t()
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2

    def _itm(self, text_cls: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the ITM head on the fused rows' text [CLS] ``[B, 2, W]`` (matched,
        mismatched)."""
        logits = self.itm_head(text_cls).reshape(-1, 2)
        labels = (torch.arange(logits.shape[0], device=logits.device) % 2 == 0).long()
        return F.cross_entropy(logits, labels)


def synthetic_batch(config: Config, batch_size: int, *, seed: int, device="cpu", dtype=torch.float32,
                    num_classes: int = 16) -> dict:
    """Pairs drawn from ``num_classes`` latent classes shared by every batch: a class's images
    are its prototype image plus noise, its texts its template sentence with some words replaced
    and a random length. Returns ``images [B, C, H, W]`` (``dtype``), ``text_ids [B, text_len]``
    and ``text_lengths [B]`` (int64). Classes repeat within a batch only when ``B > num_classes``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int of at least 2, got {batch_size!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int of at least 2, got {num_classes!r}")
    c, n = config, config.text_len
    proto = torch.Generator().manual_seed(20240601)       # the classes: the same for every seed
    images_proto = torch.randn(num_classes, c.channels, c.image_size, c.image_size, generator=proto,
                               dtype=torch.float64)
    words_proto = torch.randint(2, c.vocab_size, (num_classes, n - 1), generator=proto)
    g = torch.Generator().manual_seed(seed)
    if batch_size <= num_classes:
        classes = torch.randperm(num_classes, generator=g)[:batch_size]
    else:
        classes = torch.randint(num_classes, (batch_size,), generator=g)
    images = images_proto[classes]
    images = images + 0.5 * torch.randn(images.shape, generator=g, dtype=torch.float64)
    words = words_proto[classes]
    swap = torch.rand(words.shape, generator=g) < 0.15
    words = torch.where(swap, torch.randint(2, c.vocab_size, words.shape, generator=g), words)
    lengths = torch.randint(max(2, n // 2), n + 1, (batch_size,), generator=g)
    text_ids = torch.cat([torch.full((batch_size, 1), CLS), words], dim=1)
    text_ids = torch.where(torch.arange(n)[None] < lengths[:, None], text_ids, torch.full_like(text_ids, PAD))
    return {"images": images.to(device=device, dtype=dtype), "text_ids": text_ids.to(device),
            "text_lengths": lengths.to(device)}
