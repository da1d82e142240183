"""mmkernels' attention inside HF transformers models: ``attn_implementation="mmkernels"``.

Usage (transformers >= 5, imported only when a function here runs)::

    from mmkernels.integrations.hf_attention import register_attention
    name = register_attention()                     # "mmkernels"; calling it again changes nothing
    model = AutoModelForCausalLM.from_config(config, attn_implementation=name)
    model.set_attn_implementation(name)             # a model already built or loaded, sub-models included
    assert model.config._attn_implementation == name

``set_attn_implementation`` switches every sub-model (LLaVA's vision tower and language model,
...) whose attention layers call HF's ``AttentionInterface``; for a model class that does not,
transformers only logs a warning and leaves it as it was, hence the check.

:func:`register_attention` registers :func:`attention_mask_function` with HF's
``AttentionMaskInterface`` (HF's ``create_causal_mask``, ``create_bidirectional_mask`` and
``create_sliding_window_causal_mask`` call it instead of building a dense ``[B, 1, Sq, Sk]``
mask) and an attention function (:func:`attention_forward`) with ``AttentionInterface``. The mask
function returns an :class:`HFMask` (O(B*S) metadata); the attention function turns it, once
per forward, into a :class:`mmkernels.MultimodalMask` and runs
:func:`mmkernels.multimodal_attention`, without host synchronisation on CUDA.

Which HF masks become which ``MultimodalMask`` (query ``i`` is position ``q_offset + i``, key
``j`` is ``kv_offset + j``, as in HF's masks; a KV cache makes ``Sq < Sk``):

* causal mask: rule ``CAUSAL`` on those positions; bidirectional mask (encoders, vision
  towers): rule ``FULL``; no mask from HF (``None``): the layer's ``is_causal``, as HF's sdpa.
* the 2D ``attention_mask`` (left or right padding): segment -1 for padded keys, which nobody
  sees; queries keep the segment of their document, as HF masks keys only.
* bidirectional image blocks (``block_sequence_ids`` of Gemma 3 / PaliGemma, a
  ``blockwise_overlay`` or-mask): modality 1 for block tokens, rules
  ``[[CAUSAL, CAUSAL], [CAUSAL, SPAN]]``, one run per block (``image_spans_in_causal``, with runs
  split where the block id changes). Each block must be one contiguous stretch of the real
  tokens; otherwise a ``ValueError`` (CPU) or a device assert (CUDA) says so.
* packed documents: segment ids from HF's packed-sequence mask, and, as HF's flash-attention
  path does, from ``position_ids`` restarting at their minimum inside a row (batch 1, no 2D
  mask, no cache offset) or from ``cu_seq_lens_q``/``cu_seq_lens_k``. HF's sdpa path separates
  documents only when it detects them itself, without a cache and without a 2D mask
  (``use_cache=False``); with the cache a forward makes by default it does not.
* a sliding window wider than every query-key distance of the call is dropped (it masks nothing).

It falls back, recorded by ``mmkernels.explain()`` as op ``hf_attention`` with the reason (and
logged at DEBUG level on the logger ``mmkernels.dispatch``):

* to transformers' own sdpa attention, on a dense mask: a 4D mask given by the caller (a custom
  mask); a mask HF composes from pieces with no O(S) form here (an active sliding window,
  chunked attention, a model's own mask functions), for which the mask function builds HF's
  dense sdpa mask; ``dropout > 0`` (training: multimodal_attention has no dropout); a value head
  dim other than the query's; a ``position_bias``.
* to the model's own eager attention: ``softcap`` or attention sinks (``s_aux``), which sdpa
  does not take.

Outputs at padded query positions may differ from HF's, which nothing reads: a query that sees
no key (left padding) gives 0; a padded query takes the image block of the real token before it.
"""
from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass

import torch

from .. import _dispatch
from ..attention import MultimodalMask, multimodal_attention
from ..attention.mask import CAUSAL, FULL, SPAN

__all__ = ["HFMask", "attention_forward", "attention_mask_function", "register_attention"]

_MARK = "_mmkernels_hf_attention"          # set on the functions registered here
_FALLBACK = "_mmkernels_fallback"          # set on a dense mask built by the fallback: why
_BUILTIN = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4",
            "paged|eager")


# ----------------------------------------------------------------------------- registration

def register_attention(name: str = "mmkernels", *, packed_position_ids: bool = True) -> str:
    """Register mmkernels' attention with transformers under ``name``; return ``name``.

    Then ``attn_implementation=name`` in ``from_config``/``from_pretrained`` or
    ``model.set_attn_implementation(name)`` uses it. Idempotent; registering again with other
    options replaces mmkernels' own functions. ``packed_position_ids=False`` never reads
    ``position_ids`` (plain causal batches of size 1 then keep the causal fast paths).

    Raises ``ValueError`` for a name transformers or another library already uses, or one
    transformers would read as a Hub kernel (``org/repo``); ``ImportError`` without
    transformers >= 5.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise ValueError(f"name must be a non-empty string of letters, digits, '_', '.' or '-', got {name!r}")
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is one of transformers' own attention implementations")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError("register_attention needs transformers >= 5 (AttentionInterface, "
                          "AttentionMaskInterface): pip install 'transformers>=5'") from e
    for interface in (AttentionInterface, AttentionMaskInterface):
        current = interface().get(name)
        if current is not None and not getattr(current, _MARK, False):
            raise ValueError(f"{name!r} is already registered with transformers' {interface.__name__} by "
                             "another library; choose another name")
    AttentionInterface.register(name, _attention_function(bool(packed_position_ids)))
    AttentionMaskInterface.register(name, attention_mask_function)
    return name


@functools.lru_cache(maxsize=None)
def _attention_function(packed_position_ids: bool):
    fn = functools.partial(attention_forward, packed_position_ids=packed_position_ids)
    setattr(fn, _MARK, True)
    return fn


# ----------------------------------------------------------------------------- HF's mask functions

class _NoForm(Exception):
    """HF's mask has no O(S) form here; the message says why."""


@dataclass(frozen=True, eq=False)
class _Form:
    """A mask of the shape ``(base [OR same block]) AND same packed document``."""

    causal: bool                          # base rule: CAUSAL, or FULL (every pair)
    blocks: torch.Tensor | None = None    # block ids OR-ed in (bidirectional inside a block)
    packed: torch.Tensor | None = None    # HF's packed-sequence ids AND-ed in

    def is_full(self) -> bool:
        return not self.causal and self.packed is None


@dataclass(frozen=True, eq=False)
class _Overlay:
    kind: str                             # "blocks" or "packed"
    ids: torch.Tensor


def _hf_closure(fn, mu) -> tuple[str, dict]:
    """``(factory name, captured variables)`` of a mask function made by one of
    ``transformers.masking_utils``' factories; ``_NoForm`` for any other function."""
    code = getattr(fn, "__code__", None)
    if getattr(fn, "__module__", None) != mu.__name__ or code is None or "." not in fn.__qualname__:
        name = getattr(fn, "__qualname__", type(fn).__name__)
        raise _NoForm(f"the mask function {name} (module {getattr(fn, '__module__', '?')}) has no O(S) form here")
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
    return fn.__qualname__.split(".", 1)[0], cells


class _Parser:
    """Reads the mask function HF composes (causal or bidirectional base, or-ed block overlay,
    and-ed sliding window and packed-sequence mask) into a :class:`_Form`."""

    def __init__(self, mu, q_length: int, q_offset, kv_offset):
        self.mu, self.q_length, self.q_offset, self.kv_offset = mu, q_length, q_offset, kv_offset
        self.remapped = False

    def form(self, fn) -> _Form:
        out = self.parse(fn)
        if not isinstance(out, _Form):
            raise _NoForm("an overlay without a causal or bidirectional base")
        if self.remapped and out.packed is None:
            raise _NoForm("positions remapped without a packed-sequence mask")
        return out

    def parse(self, fn):
        mu = self.mu
        if fn is mu.causal_mask_function:
            return _Form(causal=True)
        if fn is mu.bidirectional_mask_function:
            return _Form(causal=False)
        factory, cells = _hf_closure(fn, mu)
        if factory == "sliding_window_overlay":
            return self.window(cells["sliding_window"])
        if factory == "blockwise_overlay":
            return _Overlay("blocks", cells["block_sequence_ids"])
        if factory == "packed_sequence_mask_function":
            return _Overlay("packed", cells["packed_sequence_mask"])
        if factory == "remap_positions_for_packed_sequence":
            # HF remaps positions only inside packed documents, whose positions step by 1:
            # causality and window distances on positions equal those on indices there
            self.remapped = True
            return self.parse(cells["mask_function"])
        if factory == "and_masks":
            return _and([self.parse(f) for f in cells["mask_functions"]])
        if factory == "or_masks":
            return _or([self.parse(f) for f in cells["mask_functions"]])
        raise _NoForm(f"the mask function {fn.__qualname__} has no O(S) form here")

    def window(self, size) -> _Form:
        """A sliding window keeps ``q - kv < size``: every pair when the largest distance is below it."""
        if isinstance(self.q_offset, torch.Tensor) or isinstance(self.kv_offset, torch.Tensor):
            raise _NoForm("a sliding window with tensor offsets (static cache): its reach is on the device")
        widest = self.q_offset + self.q_length - 1 - self.kv_offset
        if widest < size:
            return _Form(causal=False)
        raise _NoForm(f"an active sliding window of {size} tokens (distances up to {widest})")


def _and(parts) -> _Form:
    forms = [p for p in parts if isinstance(p, _Form)]
    overlays = [p for p in parts if isinstance(p, _Overlay)]
    if any(o.kind == "blocks" for o in overlays):
        raise _NoForm("a block overlay AND-ed into the mask")
    packed = [o.ids for o in overlays] + [f.packed for f in forms if f.packed is not None]
    if len(packed) > 1:
        raise _NoForm("two packed-sequence masks")
    bases = [f for f in forms if f.causal]
    if not bases:
        base = _Form(causal=False)
    elif len(bases) == 1 or any(f.blocks is None for f in bases):
        # every base contains the plain causal mask: with one of them plain, the AND is plain
        base = bases[0] if len(bases) == 1 else _Form(causal=True)
    else:
        raise _NoForm("two block overlays AND-ed")
    return _Form(base.causal, base.blocks, packed[0] if packed else None)


def _or(parts) -> _Form:
    forms = [p for p in parts if isinstance(p, _Form)]
    overlays = [p for p in parts if isinstance(p, _Overlay)]
    if any(o.kind == "packed" for o in overlays) or any(f.packed is not None for f in forms):
        raise _NoForm("a packed-sequence mask OR-ed into the mask")
    if any(f.is_full() for f in forms):
        return _Form(causal=False)
    blocks = [o.ids for o in overlays] + [f.blocks for f in forms if f.blocks is not None]
    if not forms:
        raise _NoForm("a block overlay without a causal base")
    if len(blocks) > 1:
        raise _NoForm("two block overlays OR-ed")
    return _Form(causal=True, blocks=blocks[0] if blocks else None)


# ----------------------------------------------------------------------------- the mask HF hands on

def _fit(x: torch.Tensor, batch: int, length: int, fill, device) -> torch.Tensor:
    """``x [B or 1, L']`` on ``device``, cut or padded with ``fill`` to ``[batch, length]``."""
    x = x.to(device, non_blocking=True)
    if x.dim() != 2 or x.shape[0] not in (1, batch):
        raise ValueError(f"expected a [B, S] tensor with B in (1, {batch}), got shape {tuple(x.shape)}")
    x = x[:, :length]
    if x.shape[1] < length:
        x = torch.nn.functional.pad(x, (0, length - x.shape[1]), value=fill)
    return x.expand(batch, length)


def _check_contiguous_blocks(ids: torch.Tensor) -> None:
    """Every block id ``>= 0`` of ``ids [B, L]`` fills one contiguous stretch (sort, no sync on CUDA)."""
    s, order = torch.sort(ids, dim=1, stable=True)
    split = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0) & (order[:, 1:] - order[:, :-1] != 1)
    msg = ("block_sequence_ids: a bidirectional block occupies two separate stretches of real tokens; "
           "mmkernels' SPAN rule needs each block contiguous (use attn_implementation='sdpa' for this mask)")
    if ids.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(split.any()):
            raise ValueError(msg)
    else:
        torch._assert_async(~split.any(), msg)


def _starts(ids: torch.Tensor) -> torch.Tensor:
    """Where a new run of equal ids begins in each row of ``ids [B, S]`` (bool, column 0 True)."""
    out = torch.ones_like(ids, dtype=torch.bool)
    out[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return out


def _cu_docs(cu: torch.Tensor, n: int, device) -> torch.Tensor:
    """Document of each of ``n`` tokens from ``cu_seqlens``; -1 past the last document. int64 ``[1, n]``."""
    cu = cu.to(device, torch.int64, non_blocking=True).reshape(-1)
    doc = torch.searchsorted(cu, torch.arange(n, device=device), right=True) - 1
    return torch.where(doc >= cu.shape[0] - 1, -1, doc)[None]


class HFMask:
    """What :func:`attention_mask_function` hands HF's attention layers: O(B*S) metadata.

    Holds the base rule (causal or bidirectional), the sizes and offsets HF computed
    (``q_length``, ``kv_length``, ``q_offset``, ``kv_offset``), and, over the ``kv_offset +
    kv_length`` positions: the real tokens of the 2D mask (``valid``, bool), the block modality
    and run ids (int32) and HF's packed-document starts. :meth:`multimodal` makes the
    :class:`MultimodalMask` of one call. ``shape``/``ndim`` are those of the dense mask it
    replaces, ``(B, 1, q_length, kv_length)``.
    """

    ndim = 4        # generate() hands masks it made ahead back to create_causal_mask, which reads ndim/shape

    def __init__(self, form: _Form, batch: int, q_length: int, kv_length: int, q_offset, kv_offset,
                 padding: torch.Tensor | None, device):
        if isinstance(kv_offset, torch.Tensor):
            raise _NoForm("a tensor kv_offset")
        blocks = form.blocks is not None and form.causal
        if blocks and not isinstance(q_offset, torch.Tensor) and q_offset + q_length > kv_offset + kv_length:
            raise _NoForm(f"image blocks with queries past the keys (q_offset {q_offset}, q_length {q_length}, "
                          f"kv_offset {kv_offset}, kv_length {kv_length})")
        self.causal = form.causal
        self.batch, self.q_length, self.kv_length = batch, q_length, kv_length
        self.q_offset, self.kv_offset = q_offset, kv_offset
        self.device = torch.device(device)
        span = kv_offset + kv_length
        self.valid = None if padding is None else _fit(padding.to(torch.bool), batch, span, False, self.device)
        self.mod = self.run = None
        if blocks:
            self.mod, self.run = self._blocks(_fit(form.blocks.to(torch.int64), batch, span, -1, self.device))
        self.packed_starts = None
        if form.packed is not None:
            self.packed_starts = _starts(_fit(form.packed, batch, span, -1, self.device))
        self._memo = None

    def _blocks(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Modality (1 = in a block) and run ids from block ids ``[B, L]``. A padded token takes
        the block of the last real token before it, so padding never splits a block (nobody
        sees padded keys; their queries only differ where HF's outputs are meaningless)."""
        if self.valid is not None:
            idx = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            last = torch.cummax(torch.where(self.valid, idx, -1), dim=1).values
            ids = torch.where(last >= 0, ids.gather(1, last.clamp(min=0)), -1)
        _check_contiguous_blocks(ids)
        run = torch.cumsum(_starts(ids).to(torch.int32), dim=1, dtype=torch.int32) - 1
        return (ids >= 0).to(torch.int32), run

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, 1, self.q_length, self.kv_length)

    def __repr__(self) -> str:
        parts = ["causal" if self.causal else "bidirectional"]
        parts += [name for name, t in (("padding", self.valid), ("blocks", self.mod), ("packed", self.packed_starts))
                  if t is not None]
        return (f"HFMask({'+'.join(parts)}, B={self.batch}, q_length={self.q_length}, kv_length={self.kv_length}, "
                f"q_offset={self.q_offset}, kv_offset={self.kv_offset})")

    def multimodal(self, sq: int, sk: int, *, position_ids=None, cu_seq_lens_q=None, cu_seq_lens_k=None,
                   packed_position_ids: bool = True) -> MultimodalMask | None:
        """The :class:`MultimodalMask` of a call with ``Sq = sq``, ``Sk = sk`` (``None``: full
        attention), made once for the layers that share these arguments."""
        if (sq, sk) != (self.q_length, self.kv_length):
            raise ValueError(f"the attention mask was made for Sq={self.q_length}, Sk={self.kv_length}; "
                             f"the layer has Sq={sq}, Sk={sk}")
        if not packed_position_ids:
            position_ids = None
        key = (position_ids, cu_seq_lens_q, cu_seq_lens_k)
        if self._memo is not None and all(a is b for a, b in zip(self._memo[0], key)):
            return self._memo[1]
        mask = self._build(position_ids, cu_seq_lens_q, cu_seq_lens_k)
        self._memo = (key, mask)
        return mask

    def _documents(self, position_ids, cu_q, cu_k) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Packed documents of the queries and keys (int64 ``[B, S]``, -1 past the last), or ``None``."""
        b, sq, sk, dev = self.batch, self.q_length, self.kv_length, self.device
        flat = sq == sk and not isinstance(self.q_offset, torch.Tensor) and self.q_offset == 0 == self.kv_offset
        starts = self.packed_starts
        ends = None
        if cu_q is not None:
            if b != 1:
                raise ValueError(f"cu_seq_lens_q describes one flattened row, but the batch has {b}")
            dq = _cu_docs(cu_q, sq, dev)
            dk = _cu_docs(cu_k if cu_k is not None else cu_q, sk, dev)
            if sq != sk or cu_k is not None and cu_k is not cu_q:
                return dq, dk                       # query and key documents as given
            starts = _starts(dq) if starts is None else starts | _starts(dq)
            ends = dq < 0
        elif (position_ids is not None and isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2
              and position_ids.shape[-1] == sq and b == 1 and self.valid is None and flat):
            # HF's flash-attention rule: a document starts where the position id is the row's minimum
            pos = position_ids.to(dev, non_blocking=True)[:1]
            new = pos == pos.amin(dim=1, keepdim=True)
            new[:, 0] = True
            starts = new if starts is None else starts | new
        if starts is None:
            return None
        doc = torch.cumsum(starts.to(torch.int64), dim=1) - 1
        if ends is not None:
            doc = torch.where(ends, -1, doc)
        return doc, doc

    def _build(self, position_ids, cu_q, cu_k) -> MultimodalMask | None:
        b, sq, sk, dev = self.batch, self.q_length, self.kv_length, self.device
        docs = self._documents(position_ids, cu_q, cu_k)
        plain = docs is None and self.valid is None and self.mod is None
        q_at_end = not isinstance(self.q_offset, torch.Tensor) and self.q_offset == self.kv_offset + sk - sq
        if plain and (not self.causal or sq == 1 and q_at_end):
            return None                                             # every query sees every key
        if plain and sq == sk and q_at_end:
            return MultimodalMask.causal(b, sq, device=dev)         # the causal fast paths
        k_idx = torch.arange(sk, device=dev) + self.kv_offset
        q_idx = torch.arange(sq, device=dev) + self.q_offset
        zeros_q = torch.zeros(b, sq, dtype=torch.int32, device=dev)
        zeros_k = torch.zeros(b, sk, dtype=torch.int32, device=dev)
        q_seg, k_seg = (zeros_q, zeros_k) if docs is None else (docs[0].expand(b, sq), docs[1].expand(b, sk))
        if self.valid is not None:
            k_seg = torch.where(self.valid[:, self.kv_offset:self.kv_offset + sk], k_seg, -1)
        if self.mod is not None:
            q_mod, k_mod = self.mod.index_select(1, q_idx), self.mod[:, self.kv_offset:self.kv_offset + sk]
            q_run, k_run = self.run.index_select(1, q_idx), self.run[:, self.kv_offset:self.kv_offset + sk]
            rules = [[CAUSAL, CAUSAL], [CAUSAL, SPAN]]
        else:
            q_mod, k_mod, q_run, k_run = zeros_q, zeros_k, zeros_q, zeros_k
            rules = [[CAUSAL if self.causal else FULL]]
        # non_blocking: the host-to-device copy of this tiny table must not synchronise
        rules = torch.tensor(rules, dtype=torch.int8).to(dev, non_blocking=True)
        meta = [q_mod, k_mod, q_seg, k_seg, q_idx.expand(b, sq), k_idx.expand(b, sk), q_run, k_run]
        meta = [t.to(torch.int32).contiguous() for t in meta]
        return MultimodalMask.from_metadata(meta + [rules])


def attention_mask_function(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                            mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """The mask function HF's ``create_*_mask`` call (``AttentionMaskInterface``).

    Returns an :class:`HFMask` when HF's composed ``mask_function`` has an O(S) form (see the
    module docstring); otherwise HF's own dense sdpa mask (bool ``[B, 1, q_length, kv_length]``,
    or ``None`` where sdpa needs none), which the attention function runs through sdpa.
    ``attention_mask``: HF's 2D padding mask (bool ``[B, kv_offset + kv_length]``, True = real
    token), or an :class:`HFMask` made earlier (``generate`` builds masks ahead), returned as is.
    """
    if isinstance(attention_mask, HFMask):
        return attention_mask
    from transformers import masking_utils as mu
    mask_function = mu.causal_mask_function if mask_function is None else mask_function
    device = kwargs.get("device", "cpu")
    try:
        form = _Parser(mu, q_length, q_offset, kv_offset).form(mask_function)
        return HFMask(form, batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask, device)
    except _NoForm as why:
        dense = mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                             kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                             **kwargs)
        if dense is not None:
            setattr(dense, _FALLBACK, f"HF's mask has no O(S) form: {why}")
        return dense


setattr(attention_mask_function, _MARK, True)


# ----------------------------------------------------------------------------- the attention function

def _record(path: str, query: torch.Tensor, reason: str) -> None:
    case = (_dispatch.device_kind(query.device), _dispatch.dtype_name(query.dtype), "hf")
    _dispatch._record(_dispatch.Decision("attention", "hf_attention", case, path, None, reason))


def _fallback_reason(query, value, attention_mask, dropout, kwargs) -> tuple[str, str] | None:
    """``(path, why)`` when this call cannot run on multimodal_attention, else ``None``."""
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            return "hf_eager", f"{name} is set (sdpa does not take it either)"
    if isinstance(attention_mask, torch.Tensor):
        why = getattr(attention_mask, _FALLBACK, None)
        return "hf_sdpa", why or f"a dense {attention_mask.dim()}D attention mask was given (a custom mask)"
    if dropout:
        return "hf_sdpa", f"attention dropout {dropout} (multimodal_attention has no dropout)"
    if value.shape[-1] != query.shape[-1]:
        return "hf_sdpa", f"value head dim {value.shape[-1]} != query head dim {query.shape[-1]}"
    if kwargs.get("position_bias") is not None:
        return "hf_sdpa", "a position_bias is added to the scores"
    return None


def _mask_of_call(module, query, key, attention_mask, kwargs, packed_position_ids):
    """``(MultimodalMask or None, key length to use)`` for an :class:`HFMask` or no mask."""
    b, sq, sk = query.shape[0], query.shape[2], key.shape[2]
    extra = dict(position_ids=kwargs.get("position_ids"), cu_seq_lens_q=kwargs.get("cu_seq_lens_q"),
                 cu_seq_lens_k=kwargs.get("cu_seq_lens_k"), packed_position_ids=packed_position_ids)
    if isinstance(attention_mask, HFMask):
        return attention_mask.multimodal(sq, sk, **extra), sk
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal = bool(is_causal) and sq > 1
    if causal and sk != sq:
        if sk < sq:
            raise ValueError(f"a causal call without mask needs Sk >= Sq, got Sq={sq}, Sk={sk}")
        sk = sq               # as HF's sdpa: queries are the first Sq keys (an empty static cache)
    spec = HFMask(_Form(causal=causal), b, sq, sk, 0, 0, None, query.device)
    return spec.multimodal(sq, sk, **extra), sk


def attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                      dropout: float = 0.0, scaling: float | None = None, *, packed_position_ids: bool = True,
                      **kwargs):
    """HF's attention function signature, on :func:`mmkernels.multimodal_attention`.

    Args:
        module: the attention layer (its ``is_causal`` serves calls without mask).
        query: ``[B, Hq, Sq, D]``; key, value: ``[B, Hkv, Sk, D]`` (``Hq % Hkv == 0``: grouped
            heads need no copies), float32/bfloat16/float16/float64.
        attention_mask: an :class:`HFMask`, ``None``, or a dense tensor mask (runs HF's sdpa).
        dropout: attention dropout (> 0 runs HF's sdpa); scaling: softmax scale (default ``D**-0.5``).
        packed_position_ids: read packed documents from ``position_ids`` (set by
            :func:`register_attention`).
        kwargs: what HF passes on (``position_ids``, ``cu_seq_lens_q``/``_k``, ``is_causal``, ...).

    Returns:
        ``(out [B, Sq, Hq, D] contiguous, None)``. See the module docstring for the fallbacks.
    """
    if attention_mask is not None and not isinstance(attention_mask, (HFMask, torch.Tensor)):
        raise TypeError(f"mmkernels' HF attention takes the mask of its own mask function, None or a tensor, got "
                        f"{type(attention_mask).__name__} (a mask made for another attn_implementation?)")
    fallback = _fallback_reason(query, value, attention_mask, dropout, kwargs)
    if fallback is not None:
        return _fallback(fallback, module, query, key, value, attention_mask, dropout, scaling,
                         packed_position_ids, kwargs)
    mask, sk = _mask_of_call(module, query, key, attention_mask, kwargs, packed_position_ids)
    if sk != key.shape[2]:
        key, value = key[:, :, :sk], value[:, :, :sk]
    out = multimodal_attention(query, key, value, mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _dense(module, query, key, attention_mask, kwargs, packed_position_ids):
    """For the fallbacks: the mask as a bool ``[B, 1, Sq, Sk]`` tensor, and the rows that see some
    key (bool ``[B, 1, Sq, 1]``, ``None`` for a tensor mask, passed on as given)."""
    if isinstance(attention_mask, torch.Tensor):
        return attention_mask, None
    mask, sk = _mask_of_call(module, query, key, attention_mask, kwargs, packed_position_ids)
    b, sq = query.shape[0], query.shape[2]
    dense = torch.ones(b, 1, sq, sk, dtype=torch.bool, device=query.device) if mask is None else mask.to_dense()
    if sk != key.shape[2]:
        dense = torch.nn.functional.pad(dense, (0, key.shape[2] - sk), value=False)
    seen = dense.any(-1, keepdim=True)
    # a row that sees nothing sees every key instead (finite), and its output is zeroed
    return dense | ~seen, seen


def _fallback(fallback, module, query, key, value, attention_mask, dropout, scaling, packed_position_ids, kwargs):
    path, why = fallback
    _record(path, query, why)
    dense, seen = _dense(module, query, key, attention_mask, kwargs, packed_position_ids)
    if seen is not None:           # the mask made here says all, causality included
        kwargs = {k: v for k, v in kwargs.items() if k != "is_causal"}
    if path == "hf_eager":
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise NotImplementedError(f"mmkernels' HF attention: {why}, and {type(module).__module__} has no "
                                      "eager_attention_forward to fall back to")
        if dense is not None and dense.dtype == torch.bool:        # eager adds its mask to the scores
            dense = torch.zeros(dense.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~dense, torch.finfo(query.dtype).min)
        out, weights = eager(module, query, key, value, dense, dropout=dropout, scaling=scaling, **kwargs)
    else:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        out, weights = sdpa_attention_forward(module, query, key, value, dense, dropout=dropout, scaling=scaling,
                                              **kwargs)
    if seen is not None:
        out = out * seen.transpose(1, 2).to(out.dtype)              # [B, Sq, 1, 1] over [B, Sq, H, D]
    return out, weights
