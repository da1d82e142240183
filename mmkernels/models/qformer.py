"""The BLIP-2 / InstructBLIP Q-Former on mmkernels' attention kernels, weight-compatible with HF's
``Blip2QFormerModel`` and ``InstructBlipQFormerModel``: :class:`QFormer` (its docstring says what
runs where). transformers is not imported here.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validation as check
from ..attention import MultimodalMask, multimodal_attention
from ..cross_attention import cross_attention, fused_kv_projection, share_kv_storage
from ..cross_attention.reference import MAX_HEAD_DIM
from .layers import merge_heads, split_heads


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# HF ``hidden_act`` names -> the torch function that computes them.
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}

_CONFIG_FIELDS = ("hidden_size", "num_attention_heads", "intermediate_size", "hidden_act",
                  "num_hidden_layers", "cross_attention_frequency", "encoder_hidden_size",
                  "layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob",
                  "use_qformer_text_input")
# With text_embeddings (InstructBLIP) the text FFN always exists, so use_qformer_text_input may be
# absent (InstructBlipQFormerConfig has none); the embedding tables need these instead.
_TEXT_EMBEDDING_FIELDS = ("vocab_size", "max_position_embeddings", "pad_token_id")


def _activation(act):
    if callable(act) and not isinstance(act, str):
        return act
    if act not in ACTIVATIONS:
        raise ValueError(f"config.hidden_act must be one of {tuple(ACTIVATIONS)} (or a callable), got {act!r}")
    return ACTIVATIONS[act]


def _positive_int(config, name: str) -> int:
    v = getattr(config, name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"config.{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"config.{name} must be at least 1, got {v}")
    return v


def _probability(config, name: str) -> float:
    v = getattr(config, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"config.{name} must be a float, got {type(v).__name__}")
    if not 0.0 <= float(v) < 1.0:
        raise ValueError(f"config.{name} must lie in [0, 1), got {v}")
    return float(v)


def _check_config(config, text_embeddings: bool) -> None:
    if text_embeddings:
        fields = [f for f in _CONFIG_FIELDS if f != "use_qformer_text_input"] + list(_TEXT_EMBEDDING_FIELDS)
        kind = "InstructBlipQFormerConfig"
    else:
        fields, kind = list(_CONFIG_FIELDS), "Blip2QFormerConfig"
    missing = [f for f in fields if not hasattr(config, f)]
    if missing:
        raise TypeError(f"QFormer config lacks {missing}; pass a transformers {kind} or an "
                        f"object with the attributes {fields}")
    if text_embeddings:
        if not getattr(config, "use_qformer_text_input", True):
            raise ValueError("text_embeddings=True needs the text FFN, but the config has "
                             "use_qformer_text_input=False")
        _positive_int(config, "vocab_size")
        _positive_int(config, "max_position_embeddings")
        pad = config.pad_token_id
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int)
                                or not 0 <= pad < config.vocab_size):
            raise ValueError(f"config.pad_token_id must be None or an int in [0, vocab_size), got {pad!r}")
    for name in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers",
                 "cross_attention_frequency", "encoder_hidden_size"):
        _positive_int(config, name)
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"config.hidden_size {config.hidden_size} is not a multiple of "
                         f"config.num_attention_heads {config.num_attention_heads}")
    head_dim = config.hidden_size // config.num_attention_heads
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim hidden_size / num_attention_heads = {head_dim} is larger than the "
                         f"supported {MAX_HEAD_DIM}")
    _probability(config, "hidden_dropout_prob")
    _probability(config, "attention_probs_dropout_prob")
    eps = config.layer_norm_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"config.layer_norm_eps must be a positive float, got {eps!r}")
    _activation(config.hidden_act)


def _padding_mask(mask, shape: tuple[int, int], name: str, device) -> torch.Tensor | None:
    """A ``[B, L]`` mask (bool, or numbers with nonzero = attend) as bool, True = attend."""
    if mask is None:
        return None
    check.tensor(mask, name, 2)
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape [B, L] = {shape}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the inputs are on {device}")
    return mask if mask.dtype == torch.bool else mask != 0


# ----------------------------------------------------------------------------- submodules
# Names mirror HF's Blip2QFormer* modules so state dicts are interchangeable; the math is in
# QFormer.forward and these small blocks.

class _MultiHeadAttention(nn.Module):
    """The ``query``/``key``/``value`` projections of one (self- or cross-) attention."""

    def __init__(self, config, is_cross_attention: bool):
        super().__init__()
        width = config.hidden_size
        kv_in = config.encoder_hidden_size if is_cross_attention else width
        self.num_heads = config.num_attention_heads
        self.dropout_p = float(config.attention_probs_dropout_prob)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_in, width)
        self.value = nn.Linear(kv_in, width)


class _ResidualOutput(nn.Module):
    """``LayerNorm(residual + dropout(dense(x)))`` (HF's ``Blip2QFormerSelfOutput``/``Output``)."""

    def __init__(self, config, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _AttentionBlock(nn.Module):
    def __init__(self, config, is_cross_attention: bool = False):
        super().__init__()
        self.attention = _MultiHeadAttention(config, is_cross_attention)
        self.output = _ResidualOutput(config, config.hidden_size)


class _Intermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, config, index: int, text_ffn: bool):
        super().__init__()
        self.attention = _AttentionBlock(config)
        self.has_cross_attention = index % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = _AttentionBlock(config, is_cross_attention=True)
        self.has_text_ffn = text_ffn
        if self.has_text_ffn:
            self.intermediate = _Intermediate(config)
            self.output = _ResidualOutput(config, config.intermediate_size)
        self.intermediate_query = _Intermediate(config)
        self.output_query = _ResidualOutput(config, config.intermediate_size)


class _Encoder(nn.Module):
    def __init__(self, config, text_ffn: bool):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(config, i, text_ffn) for i in range(config.num_hidden_layers))


class _Embeddings(nn.Module):
    """InstructBLIP's input embeddings (HF's ``InstructBlipQFormerEmbeddings``): the instruction's
    word + position embeddings after the query tokens, then LayerNorm and dropout over all of them."""

    def __init__(self, config):
        super().__init__()
        width = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, width, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, width)
        self.layernorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, query_embeds, input_ids, position_ids, dtype) -> torch.Tensor:
        parts = [] if query_embeds is None else [query_embeds.to(dtype)]
        if input_ids is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
            text = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
            parts.append(text.to(dtype))
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.dropout(self.layernorm(x))


def _reshare_after_load(module, incompatible_keys) -> None:
    module._share_kv_storage()


class QFormer(nn.Module):
    """The BLIP-2 / InstructBLIP Querying Transformer on mmkernels' kernels; loads HF weights.

    Args:
        config: a transformers ``Blip2QFormerConfig`` (``InstructBlipQFormerConfig`` with
            ``text_embeddings=True``), or any object with its attributes ``hidden_size``,
            ``num_attention_heads``, ``intermediate_size``, ``hidden_act`` (one of ``"gelu"``,
            ``"gelu_new"``, ``"gelu_pytorch_tanh"``, ``"relu"``, ``"silu"``/``"swish"``, or a
            callable), ``num_hidden_layers``, ``cross_attention_frequency``,
            ``encoder_hidden_size``, ``layer_norm_eps``, ``hidden_dropout_prob``,
            ``attention_probs_dropout_prob``, ``use_qformer_text_input`` (optional with
            ``text_embeddings``).
        text_embeddings: build InstructBLIP's input embeddings, so that ``forward`` takes the
            instruction as ``input_ids``: ``embeddings.word_embeddings`` (``[vocab_size,
            hidden_size]``, ``padding_idx=pad_token_id``), ``embeddings.position_embeddings``
            (``[max_position_embeddings, hidden_size]``) and ``embeddings.layernorm`` in place of
            ``layernorm``; the config then needs ``vocab_size``, ``max_position_embeddings`` and
            ``pad_token_id``, and every layer has the text FFN. Default ``False``: BLIP-2's layout.
        device, dtype: where and in which dtype to create the parameters.

    ``QFormer.from_hf(hf_qformer)`` builds one with an HF model's config, layout, dtype, device
    and weights. Like HF's, the module is meant to run in float32 (inputs are cast to its dtype);
    float64 works on the ``cpu`` and ``reference`` backends.

    Structure (``L = num_hidden_layers`` layers; a layer ``l`` with ``l % cross_attention_frequency == 0``
    also cross-attends to the image features)::

        x = dropout(layernorm(query_embeds))                         # [B, S, H], S = Q query tokens + text
        # InstructBLIP: x = dropout(layernorm(cat(query_embeds, word(input_ids) + position(position_ids))))
        for each layer:
            x = LN(x + dense(self_attention(x)))                     # all S tokens
            xq = x[:, :Q]
            if cross layer: xq = LN(xq + dense(cross_attention(xq, image)))
            xq = LN(xq + ffn_query(xq));  xt = LN(x[:, Q:] + ffn_text(x[:, Q:]))
            x = cat(xq, xt)

    What runs where:

    * the keys and values of every cross-attention layer come from ONE GEMM per forward
      (:func:`mmkernels.fused_kv_projection`); the layers' key/value weights live back to back in one
      storage (:func:`mmkernels.share_kv_storage`, redone after ``.to()``/``.half()``
      and after ``load_state_dict``), so that GEMM reads them without a copy;
    * cross-attention: :func:`mmkernels.cross_attention` (key padding from ``encoder_attention_mask``,
      attention dropout inside the kernel in training);
    * self-attention with a padding mask only: :func:`mmkernels.cross_attention` as well (it is
      self-attention with ``Lq = Lk = S``; dropout supported);
    * self-attention under a :class:`mmkernels.MultimodalMask` (BLIP-2's ITC/ITM/ITG masks):
      :func:`mmkernels.multimodal_attention`, which has no attention dropout.

    Parameter names equal those of HF's ``Blip2QFormerModel`` (``layernorm``,
    ``encoder.layer.{i}.attention.attention.query``, ``...crossattention.output.LayerNorm``,
    ``...intermediate_query.dense``, ...), or with ``text_embeddings=True`` those of
    ``InstructBlipQFormerModel`` (``embeddings.word_embeddings``, ``embeddings.position_embeddings``,
    ``embeddings.layernorm`` in place of ``layernorm``), so the state dicts load with ``strict=True``
    in both directions.

    Differences from HF's eager Q-Former, shared by every mmkernels backend: a query whose keys are
    all padding gets a zero attention output (HF averages over the padding); attention dropout uses
    mmkernels' counter-based mask, so it draws different (equally distributed) masks than
    ``nn.Dropout``.
    """

    def __init__(self, config, *, text_embeddings: bool = False, device=None, dtype=None):
        super().__init__()
        if not isinstance(text_embeddings, bool):
            raise TypeError(f"text_embeddings must be a bool, got {type(text_embeddings).__name__}")
        _check_config(config, text_embeddings)
        self.config = config
        self.num_heads = config.num_attention_heads
        self.has_text_embeddings = text_embeddings
        self.has_text_ffn = text_embeddings or bool(config.use_qformer_text_input)
        if text_embeddings:
            self.embeddings = _Embeddings(config)
        else:
            self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.encoder = _Encoder(config, self.has_text_ffn)
        self._init_weights(getattr(config, "initializer_range", 0.02))
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)          # _apply shares the K/V storage
        else:
            self._share_kv_storage()
        self.register_load_state_dict_post_hook(_reshare_after_load)
        self._warned_no_dropout = False

    @torch.no_grad()
    def _init_weights(self, std: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std)
                m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()

    def _input_layernorm(self) -> nn.LayerNorm:
        """The LayerNorm over the input tokens (it sets the dtype inputs are cast to)."""
        return self.embeddings.layernorm if self.has_text_embeddings else self.layernorm

    # -- the shared K/V storage
    def _cross_kv_linears(self) -> list[tuple[nn.Linear, nn.Linear]]:
        return [(l.crossattention.attention.key, l.crossattention.attention.value)
                for l in self.encoder.layer if l.has_cross_attention]

    def _share_kv_storage(self) -> None:
        share_kv_storage(self._cross_kv_linears())

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cuda() give every parameter a new storage: put the K/V back together.
        out = super()._apply(fn, *args, **kwargs)
        self._share_kv_storage()
        return out

    @classmethod
    @classmethod
    def from_hf(cls, hf_qformer) -> "QFormer":
        """A ``QFormer`` with the config, weights, dtype, device and train/eval mode of an HF
        ``Blip2QFormerModel``, ``InstructBlipQFormerModel`` or ``InstructBlipVideoQFormerModel``
        (or of a model holding one as ``.qformer``). InstructBLIP's Q-Formers, which embed the
        instruction themselves, give a model built with ``text_embeddings=True``."""
        if not isinstance(hf_qformer, nn.Module):
            raise TypeError(f"from_hf takes a transformers Blip2QFormerModel or InstructBlipQFormerModel, "
                            f"got {type(hf_qformer).__name__}")
        if not hasattr(hf_qformer, "encoder") and isinstance(getattr(hf_qformer, "qformer", None), nn.Module):
            hf_qformer = hf_qformer.qformer
        embeddings = getattr(hf_qformer, "embeddings", None)
        text = isinstance(getattr(embeddings, "word_embeddings", None), nn.Embedding)
        norm = getattr(embeddings if text else hf_qformer, "layernorm", None)
        if not (hasattr(hf_qformer, "encoder") and hasattr(hf_qformer, "config") and isinstance(norm, nn.LayerNorm)):
            raise TypeError(f"from_hf takes a transformers Blip2QFormerModel (with .config, .layernorm and "
                            f".encoder) or InstructBlipQFormerModel (with .config, .embeddings and .encoder), "
                            f"got {type(hf_qformer).__name__}")
        model = cls(hf_qformer.config, text_embeddings=text, device=norm.weight.device, dtype=norm.weight.dtype)
        model.load_state_dict(hf_qformer.state_dict(), strict=True)
        return model.train(hf_qformer.training)

    # -- forward
    def cross_kv(self, encoder_hidden_states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The ``(k, v)`` of every cross-attention layer, ``[B, H, Lk, D]`` views of one GEMM."""
        pairs = self._cross_kv_linears()
        return fused_kv_projection(encoder_hidden_states, [(k.weight, v.weight) for k, v in pairs],
                                   [(k.bias, v.bias) for k, v in pairs], num_heads=self.num_heads)

    def forward(self, query_embeds: torch.Tensor | None, encoder_hidden_states: torch.Tensor | None = None, *,
                query_length: int | None = None, attention_mask: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None,
                self_attention_mask: MultimodalMask | None = None,
                input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run the Q-Former.

        Args:
            query_embeds: ``[B, Q', hidden_size]``, floating: the ``Q`` learned query tokens,
                optionally followed by ``Q' - Q`` text embeddings (needs the text FFN). May be
                ``None`` when ``input_ids`` is given (text only: ``Q = 0``).
            encoder_hidden_states: image features ``[B, Lk, encoder_hidden_size]``; needed when
                ``query_length > 0`` (every cross-attention layer reads them).
            query_length: ``Q``, the number of query tokens (default: all of ``query_embeds``).
                Only they cross-attend and use the query FFN; the rest use the text FFN.
            attention_mask: ``[B, S]`` (bool, or numbers with nonzero = attend): key padding of
                the self-attention over all ``S`` tokens (queries, then text).
            encoder_attention_mask: ``[B, Lk]``, 1/True = attend: padding of the image features.
            self_attention_mask: a :class:`mmkernels.MultimodalMask` of shape ``(B, S, S)`` for the
                self-attention, e.g. ``MultimodalMask.blip2(Q, text_lengths, S - Q, "itg")``
                (express padding inside it; do not also pass ``attention_mask``). It runs
                :func:`mmkernels.multimodal_attention`, which applies no attention dropout.
            input_ids: ``[B, T]`` int64 (or int32) token ids of InstructBLIP's instruction (needs
                ``text_embeddings=True``). They are embedded (word + position embeddings) and
                follow the query tokens, so ``S = Q + T``; ``query_embeds`` then holds the query
                tokens only (``query_length``, if given, must equal ``query_embeds.shape[1]``).
                The queries and the instruction attend to each other in the self-attention;
                only the queries cross-attend to the image.
            position_ids: ``[B, T]`` or ``[1, T]`` integer positions of the instruction tokens
                (default ``0 .. T-1``, as HF); only with ``input_ids``.

        Returns:
            ``last_hidden_state [B, S, hidden_size]`` in the module's dtype.
        """
        dtype = self._input_layernorm().weight.dtype
        if query_length is not None and (isinstance(query_length, bool) or not isinstance(query_length, int)):
            raise TypeError(f"query_length must be an int or None, got {type(query_length).__name__}")
        if query_embeds is None:
            if input_ids is None:
                raise ValueError("query_embeds must be given (or input_ids, on a QFormer with text_embeddings)")
            b, queries = check.tensor(input_ids, "input_ids", 2).shape[0], 0
            device = input_ids.device
        else:
            check.tensor(query_embeds, "query_embeds", 3)
            check.floating(query_embeds, "query_embeds")
            check.nonempty(query_embeds, "query_embeds")
            b, queries, width = query_embeds.shape
            if width != self.config.hidden_size:
                raise ValueError(f"query_embeds must have width hidden_size = {self.config.hidden_size}, "
                                 f"got {width}")
            device = query_embeds.device
        s = queries + self._check_text_inputs(input_ids, position_ids, b, device)
        if input_ids is not None:
            if query_length is not None and query_length != queries:
                raise ValueError(f"with input_ids, query_embeds holds the query tokens only: query_length must "
                                 f"be None or query_embeds.shape[1] = {queries}, got {query_length}")
            query_length = queries
        if query_length is None:
            query_length = s
        if not 0 <= query_length <= s:
            raise ValueError(f"query_length must lie in [0, S] = [0, {s}], got {query_length}")
        if query_length < s and not self.has_text_ffn:
            raise ValueError(f"query_embeds has {s - query_length} text tokens after the {query_length} queries, "
                             "but the config has use_qformer_text_input=False (no text FFN)")
        self_kpm = _padding_mask(attention_mask, (b, s), "attention_mask", device)
        if self_attention_mask is not None:
            if not isinstance(self_attention_mask, MultimodalMask):
                raise TypeError("self_attention_mask must be a mmkernels.MultimodalMask, got "
                                f"{type(self_attention_mask).__name__}")
            if self_kpm is not None:
                raise ValueError("pass either attention_mask or self_attention_mask, not both: express the "
                                 "padding inside the MultimodalMask")
            if self_attention_mask.shape != (b, s, s):
                raise ValueError(f"self_attention_mask must have shape (B, S, S) = {(b, s, s)}, got "
                                 f"{self_attention_mask.shape}")
            if self_attention_mask.device != device:
                raise ValueError(f"self_attention_mask is on {self_attention_mask.device} but the inputs are "
                                 f"on {device}")
        cross = query_length > 0 and any(l.has_cross_attention for l in self.encoder.layer)
        kvs, cross_kpm = [], None
        if cross:
            if encoder_hidden_states is None:
                raise ValueError("encoder_hidden_states must be given: the query tokens cross-attend to them")
            check.tensor(encoder_hidden_states, "encoder_hidden_states", 3)
            check.floating(encoder_hidden_states, "encoder_hidden_states")
            check.nonempty(encoder_hidden_states, "encoder_hidden_states")
            bk, lk, c = encoder_hidden_states.shape
            if bk != b:
                raise ValueError(f"query_embeds has batch size {b} but encoder_hidden_states has {bk}")
            if c != self.config.encoder_hidden_size:
                raise ValueError(f"encoder_hidden_states must have width encoder_hidden_size = "
                                 f"{self.config.encoder_hidden_size}, got {c}")
            check.same_device(("query_embeds", query_embeds), ("encoder_hidden_states", encoder_hidden_states))
            cross_kpm = _padding_mask(encoder_attention_mask, (b, lk), "encoder_attention_mask", device)
            # one GEMM for the K/V of every cross-attention layer
            kvs = self.cross_kv(encoder_hidden_states.to(dtype))

        if self.has_text_embeddings:
            x = self.embeddings(query_embeds, input_ids, position_ids, dtype)
        else:
            x = self.dropout(self.layernorm(query_embeds.to(dtype)))
        kv_iter = iter(kvs)
        for layer in self.encoder.layer:
            x = self._self_attention(layer.attention, x, self_kpm, self_attention_mask)
            if query_length == 0:
                x = layer.output(layer.intermediate(x), x)
                continue
            xq = x[:, :query_length]
            if layer.has_cross_attention:
                xq = self._cross_attention(layer.crossattention, xq, next(kv_iter), cross_kpm)
            xq = layer.output_query(layer.intermediate_query(xq), xq)
            if query_length < s:
                xt = x[:, query_length:]
                xq = torch.cat([xq, layer.output(layer.intermediate(xt), xt)], dim=1)
            x = xq
        return x

    def _check_text_inputs(self, input_ids, position_ids, batch: int, device) -> int:
        """Check ``input_ids``/``position_ids``; returns the number of instruction tokens ``T``."""
        if input_ids is None:
            if position_ids is not None:
                raise ValueError("position_ids is given without input_ids")
            return 0
        if not self.has_text_embeddings:
            raise ValueError("input_ids needs a QFormer built with text_embeddings=True (InstructBLIP's "
                             "Q-Former); a BLIP-2 Q-Former takes text as embeddings in query_embeds")
        check.tensor(input_ids, "input_ids", 2)
        check.nonempty(input_ids, "input_ids")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        bi, t = input_ids.shape
        if bi != batch:
            raise ValueError(f"query_embeds has batch size {batch} but input_ids has {bi}")
        if input_ids.device != device:
            raise ValueError(f"input_ids is on {input_ids.device} but query_embeds is on {device}")
        if position_ids is None:
            if t > self.config.max_position_embeddings:
                raise ValueError(f"input_ids has {t} tokens, more than max_position_embeddings = "
                                 f"{self.config.max_position_embeddings}")
            return t
        check.tensor(position_ids, "position_ids", 2)
        if position_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"position_ids must be int64 or int32, got {position_ids.dtype}")
        if position_ids.shape[1] != t or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids must have shape [B, T] or [1, T] with B = {batch}, T = {t}, got "
                             f"{tuple(position_ids.shape)}")
        if position_ids.device != device:
            raise ValueError(f"position_ids is on {position_ids.device} but input_ids is on {device}")
        return t

    def _attention_dropout(self, block: _AttentionBlock) -> float:
        return block.attention.dropout_p if self.training else 0.0

    def _self_attention(self, block: _AttentionBlock, x, key_padding_mask, mm_mask):
        att = block.attention
        q = split_heads(att.query(x), att.num_heads)
        k = split_heads(att.key(x), att.num_heads)
        v = split_heads(att.value(x), att.num_heads)
        if mm_mask is not None:
            if self._attention_dropout(block) > 0 and not self._warned_no_dropout:
                self._warned_no_dropout = True
                warnings.warn("QFormer: attention dropout (attention_probs_dropout_prob="
                              f"{att.dropout_p}) is not applied in the self-attention under a MultimodalMask "
                              "(mmkernels.multimodal_attention has no dropout); cross-attention still uses it",
                              UserWarning, stacklevel=3)
            out = multimodal_attention(q, k, v, mm_mask)
        else:
            out = cross_attention(q, k, v, key_padding_mask=key_padding_mask,
                                  dropout_p=self._attention_dropout(block))
        return block.output(merge_heads(out), x)

    def _cross_attention(self, block: _AttentionBlock, xq, kv, key_padding_mask):
        att = block.attention
        q = split_heads(att.query(xq), att.num_heads)
        k, v = kv
        out = cross_attention(q, k, v, key_padding_mask=key_padding_mask, dropout_p=self._attention_dropout(block))
        return block.output(merge_heads(out), xq)
