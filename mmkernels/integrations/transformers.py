"""Drop-in use of mmkernels' cross-attention kernels inside HF transformers' BLIP-2 / InstructBLIP
Q-Former: :func:`patch_blip2` (its docstring says what it changes, which masks it reads and how
it differs from HF's attention), :func:`unpatch_blip2`, :func:`is_patched`.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from ..cross_attention import cross_attention, fused_kv_projection, share_kv_storage

_KV = "_mmkernels_cross_kv"            # (encoder_hidden_states, k, v) stashed on a cross-attention module
_STATE = "_mmkernels_blip2_patch"      # on the Q-Former model: the patch record
_PREV = "_mmkernels_prev_forward"      # on each patched module: its instance-level forward before the patch

_QFORMER_CLASSES = (
    ("transformers.models.blip_2.modeling_blip_2", "Blip2QFormerModel"),
    ("transformers.models.instructblip.modeling_instructblip", "InstructBlipQFormerModel"),
    ("transformers.models.instructblipvideo.modeling_instructblipvideo", "InstructBlipVideoQFormerModel"),
)


def _qformer_classes() -> tuple[type, ...]:
    import importlib

    found = []
    for module, name in _QFORMER_CLASSES:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    if not found:
        raise ImportError("patch_blip2 needs transformers with BLIP-2 (pip install transformers)")
    return tuple(found)


def _find_qformer(model) -> nn.Module:
    classes = _qformer_classes()
    if isinstance(model, classes):
        return model
    inner = getattr(model, "qformer", None) if isinstance(model, nn.Module) else None
    if isinstance(inner, classes):
        return inner
    names = ", ".join(c.__name__ for c in classes)
    raise TypeError(f"patch_blip2 takes a transformers Q-Former model ({names}) or a model holding one as "
                    f".qformer (Blip2Model, Blip2ForConditionalGeneration, InstructBLIP), got "
                    f"{type(model).__name__}")


# ----------------------------------------------------------------------------- masks

def key_padding_from_hf_mask(mask, batch: int, kv_len: int) -> torch.Tensor | None:
    """HF's Q-Former attention mask (any of its forms) as a bool ``[B, kv_len]`` key-padding mask.

    ``mask``: ``None``; a 4D ``[B or 1, 1 or heads, 1 or Q, kv_len]`` mask, bool (True = attend)
    or float additive (values > -1 attend; ``finfo.min``/-10000/-inf are padding); or a 2D
    ``[B, kv_len]`` mask (nonzero = attend). The first query row is read: HF's Q-Former masks are
    padding-only, the same for every query row. Returns ``None`` for ``None``.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"the mmkernels BLIP-2 patch takes tensor attention masks (eager or sdpa attention), "
                        f"got {type(mask).__name__}; flex attention's BlockMask is not supported")
    if mask.dim() == 4:
        row = mask[:, 0, 0, :]
        if mask.dtype == torch.bool:
            attend = row
        elif mask.is_floating_point():
            attend = row > -1.0
        else:
            attend = row != 0
    elif mask.dim() == 2:
        attend = mask if mask.dtype == torch.bool else mask != 0
    else:
        raise ValueError(f"expected a 4D [B, 1, Q, S] or 2D [B, S] attention mask, got shape {tuple(mask.shape)}")
    if attend.shape[-1] != kv_len or attend.shape[0] not in (1, batch):
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not fit batch {batch} and "
                         f"{kv_len} keys")
    return attend.expand(batch, kv_len)


# ----------------------------------------------------------------------------- forwards

def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, width = x.shape
    return x.view(b, s, heads, width // heads).transpose(1, 2)


def _attention_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                       encoder_attention_mask=None, **kwargs):
    """``*QFormerMultiHeadAttention.forward`` on :func:`mmkernels.cross_attention`."""
    heads = self.num_attention_heads
    b, s = hidden_states.shape[:2]
    q = _split_heads(self.query(hidden_states), heads)
    if encoder_hidden_states is not None:                  # cross-attention to the image features
        stash = self.__dict__.get(_KV)
        if stash is not None and stash[0] is encoder_hidden_states:
            k, v = stash[1], stash[2]                      # from the encoder's fused projection
        else:
            k = _split_heads(self.key(encoder_hidden_states), heads)
            v = _split_heads(self.value(encoder_hidden_states), heads)
        mask = encoder_attention_mask
    else:
        k = _split_heads(self.key(hidden_states), heads)
        v = _split_heads(self.value(hidden_states), heads)
        mask = attention_mask
    kpm = key_padding_from_hf_mask(mask, b, k.shape[2])
    out = cross_attention(q, k, v, key_padding_mask=kpm, scale=self.scaling,
                          dropout_p=self.attention_dropout if self.training else 0.0)
    return out.transpose(1, 2).reshape(b, s, -1), None


def _cross_modules(encoder) -> list[nn.Module]:
    return [layer.crossattention.attention for layer in encoder.layer
            if getattr(layer, "has_cross_attention", False)]


def _checkpointing(encoder) -> bool:
    return encoder.training and (getattr(encoder, "gradient_checkpointing", False)
                                 or any(getattr(l, "gradient_checkpointing", False) for l in encoder.layer))


def _encoder_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                     encoder_attention_mask=None, query_length=0, **kwargs):
    """``*QFormerEncoder.forward`` with the cross K/V of every layer from one GEMM."""
    prev = self.__dict__.get(_PREV)
    original = prev if prev is not None else types.MethodType(type(self).forward, self)
    mods = _cross_modules(self)
    if encoder_hidden_states is None or not query_length or not mods or _checkpointing(self):
        return original(hidden_states, attention_mask, encoder_hidden_states,
                        encoder_attention_mask=encoder_attention_mask, query_length=query_length, **kwargs)
    biases = None
    if all(m.key.bias is not None and m.value.bias is not None for m in mods):
        biases = [(m.key.bias, m.value.bias) for m in mods]
    kvs = fused_kv_projection(encoder_hidden_states, [(m.key.weight, m.value.weight) for m in mods], biases,
                              num_heads=mods[0].num_attention_heads)
    try:
        for m, (k, v) in zip(mods, kvs):
            m.__dict__[_KV] = (encoder_hidden_states, k, v)
        return original(hidden_states, attention_mask, encoder_hidden_states,
                        encoder_attention_mask=encoder_attention_mask, query_length=query_length, **kwargs)
    finally:
        for m in mods:
            m.__dict__.pop(_KV, None)


# ----------------------------------------------------------------------------- patching

def _override(module: nn.Module, fn) -> None:
    module.__dict__[_PREV] = module.__dict__.get("forward")
    module.forward = types.MethodType(fn, module)


def _restore(module: nn.Module) -> None:
    prev = module.__dict__.pop(_PREV, None)
    module.__dict__.pop("forward", None)
    module.__dict__.pop(_KV, None)
    if prev is not None:
        module.forward = prev


def _attention_modules(qformer) -> list[nn.Module]:
    mods = []
    for layer in qformer.encoder.layer:
        mods.append(layer.attention.attention)
        if getattr(layer, "has_cross_attention", False):
            mods.append(layer.crossattention.attention)
    return mods


def patch_blip2(model):
    """Run a HF BLIP-2 / InstructBLIP Q-Former's attention on mmkernels' kernels.

    Args:
        model: a ``Blip2QFormerModel`` (or InstructBLIP's Q-Former), or a model holding one as
            ``.qformer`` (``Blip2Model``, ``Blip2ForConditionalGeneration``, ...). Works with the
            ``"eager"`` and ``"sdpa"`` attention implementations.

    Returns:
        ``unpatch()``, which restores the original forwards exactly (same as
        :func:`unpatch_blip2`). Patching an already patched model changes nothing but re-shares
        the K/V weight storage (useful after ``.to()``) and returns the same kind of callable.

    Raises:
        TypeError: ``model`` is not (and does not hold) a transformers Q-Former.

    Models: ``Blip2Model``, ``Blip2ForConditionalGeneration``, ``Blip2ForImageTextRetrieval`` and
    InstructBLIP's models hold the Q-Former as ``.qformer`` (InstructBLIP's has the same structure).
    The patch changes no class and no weight; it sets instance-level ``forward`` overrides:

    * every Q-Former attention module (``*QFormerMultiHeadAttention``, self- and cross-attention)
      computes q/k/v with its own linears as ``[B, H, S, D]`` views and calls
      :func:`mmkernels.cross_attention` (attention dropout inside the kernel in training);
    * the Q-Former encoder computes the keys and values of ALL its cross-attention layers with one
      :func:`mmkernels.fused_kv_projection` GEMM before the layers run, hands each cross-attention
      module its ``(k, v)`` for the duration of the call, and clears them afterwards (also on
      exceptions). The cross layers' key/value weights are moved into one storage
      (:func:`mmkernels.share_kv_storage`) so that GEMM reads them without a copy.
      After moving the model (``.to()``, ``.half()``) call ``patch_blip2`` again to re-share them
      (a second patch changes nothing else); without that the projection concatenates the weights
      on each call, which is correct but copies them.

    Masks. HF hands the attention modules a 4D mask made by ``create_bidirectional_mask``: ``None``,
    a bool mask (sdpa) or a float additive one (eager: 0 = attend, ``finfo.min`` = padded), of
    shape ``[B, 1, 1, S]`` or ``[B, 1, Q, S]``. The Q-Former's masks are padding-only (every query
    row of a sample sees the same keys), so the patch reads the first query row as a ``[B, S]``
    key-padding mask: bool True = attend; floating values > -1 attend and the rest (``finfo.min``,
    -10000, -inf) are padding. A mask that differs between query rows (a custom 4D causal mask) is
    not supported: use :class:`mmkernels.QFormer` with a :class:`mmkernels.MultimodalMask` for that.
    A 2D ``[B, S]`` mask (1 = attend) is accepted too.

    Differences from HF's attention, by design: a query whose keys are all padding gets a zero
    output (HF averages over the padding); attention dropout draws mmkernels' counter-based mask;
    the attention weights are not returned (``output_attentions`` yields ``None`` entries).
    With gradient checkpointing on (in training), the encoder does not fuse the K/V projection:
    each cross-attention layer projects its own K/V inside its checkpointed region.
    """
    qformer = _find_qformer(model)
    encoder = qformer.encoder
    share_kv_storage([(m.key, m.value) for m in _cross_modules(encoder)])
    if _STATE not in qformer.__dict__:
        for m in _attention_modules(qformer):
            _override(m, _attention_forward)
        _override(encoder, _encoder_forward)
        qformer.__dict__[_STATE] = True
    return lambda: unpatch_blip2(qformer)


def unpatch_blip2(model) -> None:
    """Undo :func:`patch_blip2` on ``model`` (a Q-Former or a model holding one); a no-op when it
    is not patched."""
    qformer = _find_qformer(model)
    if qformer.__dict__.pop(_STATE, None) is None:
        return
    for m in _attention_modules(qformer):
        _restore(m)
    _restore(qformer.encoder)


def is_patched(model) -> bool:
    """Whether :func:`patch_blip2` is in effect on ``model``'s Q-Former."""
    return _STATE in _find_qformer(model).__dict__


# the one-call entry point over every patch above and the attention switch; imported last, as it
# imports this module
from .hf_apply import ApplyReport, apply_mmkernels, unapply_mmkernels  # noqa: E402
