"""Attention masks described by O(S) per-token metadata (the contract of the attention family).

A :class:`MultimodalMask` never stores an ``S x S`` matrix. It holds, for the
query side and the key side, one int32 ``[B, S]`` tensor each of

* ``mod``: modality id in ``[0, NM)`` (e.g. query tokens / image / text / instruction),
* ``seg``: segment id; ``-1`` marks padding (attends nowhere, seen by nobody),
* ``pos``: position used by the ``CAUSAL`` and ``SPAN`` rules,
* ``run``: id of the contiguous run of equal modality a token belongs to,

plus a rule table ``rules [NM, NM]`` (int8) saying, for a query of modality ``a``
and a key of modality ``b``, which rule decides visibility::

    BLOCKED = 0   never
    FULL    = 1   always
    CAUSAL  = 2   k_pos <= q_pos
    SPAN    = 3   q_run == k_run  or  k_pos <= q_pos   (bidirectional inside a run, causal across)

and ``visible(b, i, j) = q_seg[b, i] >= 0 and q_seg[b, i] == k_seg[b, j] and rule(...)``.

:meth:`MultimodalMask.to_dense` materialises the boolean mask (for the reference
and for debugging); :meth:`MultimodalMask.tile_map` classifies each
``block_m x block_n`` tile as empty / full / partial from per-tile summaries of
the metadata, on the device, without host synchronisation.
"""
from __future__ import annotations

import math

import torch

from .. import _validation as check

BLOCKED = 0
FULL = 1
CAUSAL = 2
SPAN = 3
RULE_NAMES = {BLOCKED: "BLOCKED", FULL: "FULL", CAUSAL: "CAUSAL", SPAN: "SPAN"}

#: what a mask's ``kind`` can be: the builder that made it, or ``"custom"``
KINDS = ("custom", "causal", "key_padding", "prefix_lm", "blip2", "instructblip", "beit3_captioning",
         "packed", "image_spans")

TILE_EMPTY = 0
TILE_FULL = 1
TILE_PARTIAL = 2

_I32_MAX = torch.iinfo(torch.int32).max
_I32_MIN = torch.iinfo(torch.int32).min


# ----------------------------------------------------------------------------- input helpers

def _int_tensor(x, name: str, ndim: int) -> torch.Tensor:
    """Check that ``x`` is an integer tensor of rank ``ndim``; return it as int32 (same device)."""
    check.tensor(x, name, ndim)
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise TypeError(f"{name} must be an integer tensor (int32 or int64), got {x.dtype}")
    return x.to(torch.int32)


def _lengths(x, name: str, device=None) -> torch.Tensor:
    """A ``[B]`` tensor of lengths (tensor or sequence of ints) as int32."""
    if not isinstance(x, torch.Tensor):
        if isinstance(x, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in x):
            x = torch.tensor(x, dtype=torch.int32)
        else:
            raise TypeError(f"{name} must be a 1-D integer tensor or a list of ints, got {type(x).__name__}")
    x = _int_tensor(x, name, 1)
    if device is not None:
        x = x.to(device, non_blocking=True)
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: the batch needs at least one sample")
    return x


def _size(n, name: str, minimum: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {n}")
    return n


def _check_nonneg_lengths(x: torch.Tensor, name: str) -> None:
    """``x >= 0`` (eager ValueError on CPU, asynchronous device assert on CUDA)."""
    ok = x >= 0
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok.all()):
            raise ValueError(f"{name} must be non-negative, got {x.tolist()}")
    else:
        torch._assert_async(ok.all(), f"{name} must be non-negative")


def _check_segments(seg: torch.Tensor, name: str) -> None:
    """Segment ids are ``>= -1`` (-1 is padding)."""
    ok = seg >= -1
    if seg.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok.all()):
            raise ValueError(f"{name} must be >= -1 (-1 marks padding), found {int(seg.min())}")
    else:
        torch._assert_async(ok.all(), f"{name} must be >= -1 (-1 marks padding)")


def _run_ids(mod: torch.Tensor) -> torch.Tensor:
    """Id of the contiguous run of equal modality each token belongs to (a new run starts where the
    modality changes, as the contract says; segments need no break: the segment test already
    separates samples).

    ``mod``: int32 ``[B, S]``. Returns int32 ``[B, S]`` (0, 0, 1, 1, 1, 2, ...), computed with a
    cumulative sum on the device.
    """
    change = mod[:, 1:] != mod[:, :-1]
    run = torch.zeros_like(mod)
    run[:, 1:] = torch.cumsum(change.to(torch.int32), dim=1, dtype=torch.int32)
    return run


def _both_sides(q, k, sq: int, sk: int, q_name: str, k_name: str, default):
    """The query- and key-side ``[B, S]`` tensors of one metadata field from what was given: both
    from ``default()`` when neither was, one side for both when ``Sq == Sk``, the queries as the last
    ``Sq`` keys when only the keys were given."""
    if k is None:
        if q is None:
            return default()
        if sq != sk:
            raise ValueError(f"{q_name} given with Sq={sq} != Sk={sk}: pass {k_name} too")
        return q, q
    if q is None:
        if sk < sq:
            raise ValueError(f"{k_name} given with Sq={sq} > Sk={sk}: pass {q_name} too")
        q = k[:, sk - sq:]
    return q, k


def _arange_rows(batch: int, n: int, offset: int, device) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.int32, device=device) + offset).expand(batch, n).contiguous()


# ----------------------------------------------------------------------------- the mask

class MultimodalMask:
    """A multimodal attention mask described by per-token metadata (O(B*S) memory).

    Args:
        modality_ids: integer ``[B, Sq]``, modality of each query token, in ``[0, NM)``.
        rules: integer ``[NM, NM]`` (tensor or nested list), ``rules[a, b]`` one of
            ``BLOCKED, FULL, CAUSAL, SPAN`` for a query of modality ``a`` and a key of modality ``b``.
        segment_ids: integer ``[B, Sq]``; tokens attend only inside their segment; ``-1`` is padding.
            Default: all 0 (or, when only ``key_segment_ids`` is given and ``Sq <= Sk``, the key
            segments of the last ``Sq`` keys).
        key_modality_ids: integer ``[B, Sk]``. Default: ``modality_ids`` (then ``Sk == Sq``).
        key_segment_ids: integer ``[B, Sk]``. Default: ``segment_ids`` when ``Sk == Sq``, else all 0
            (required when ``segment_ids`` is given and ``Sk != Sq``).
        positions: integer ``[B, Sq]`` used by ``CAUSAL``/``SPAN``. Default: the queries are the last
            ``Sq`` keys, i.e. the last ``Sq`` entries of the key positions.
        key_positions: integer ``[B, Sk]``. Default: ``arange(Sk)`` (or ``positions`` when ``Sk == Sq``).

    Run ids (for ``SPAN``) are computed from the key side: a run is a maximal stretch of equal
    modality. Queries take the run id of the key at the same index when they are
    the last ``Sq <= Sk`` keys; with ``Sq > Sk`` query runs are numbered from the query side alone
    (``SPAN`` is then only meaningful across its causal part).

    All metadata is int32 on one device; ``rules`` is int8 on that device. Validation is eager
    (``ValueError``/``TypeError``) for CPU tensors; on CUDA the value checks (modality ids inside
    the rule table, segment ids >= -1) are asynchronous device asserts, so building a mask never
    synchronises with the host.

    Attributes: ``q_mod, k_mod, q_seg, k_seg, q_pos, k_pos, q_run, k_run`` (int32 ``[B, S]``),
    ``rules`` (int8 ``[NM, NM]``), ``shape == (B, Sq, Sk)``, ``num_modalities``, and ``kind``
    (which builder made the mask, see :data:`KINDS`; ``"custom"`` for the constructor and
    :meth:`from_metadata`) with ``kind_params``, what the PyTorch-op paths need to serve that
    kind without the metadata (``lengths`` for ``"key_padding"``, ``cu_seqlens`` and ``causal``
    for ``"packed"``, ``objective`` for ``"blip2"``).
    """

    def __init__(self, modality_ids, rules, *, segment_ids=None, key_modality_ids=None,
                 key_segment_ids=None, positions=None, key_positions=None):
        q_mod = _int_tensor(modality_ids, "modality_ids", 2)
        check.nonempty(q_mod, "modality_ids")
        device = q_mod.device
        batch, sq = q_mod.shape

        def side(x, name, length):
            if x is None:
                return None
            t = _int_tensor(x, name, 2)
            check.same_device(("modality_ids", q_mod), (name, t))
            if t.shape[0] != batch:
                raise ValueError(f"{name} has batch size {t.shape[0]} but modality_ids has {batch}")
            if length is not None and t.shape[1] != length:
                raise ValueError(f"{name} has length {t.shape[1]} but must have length {length} "
                                 f"(shape {tuple(t.shape)})")
            return t

        k_mod = side(key_modality_ids, "key_modality_ids", None)
        if k_mod is None:
            k_mod = q_mod
        check.nonempty(k_mod, "key_modality_ids")
        sk = k_mod.shape[1]
        q_seg = side(segment_ids, "segment_ids", sq)
        k_seg = side(key_segment_ids, "key_segment_ids", sk)
        q_pos = side(positions, "positions", sq)
        k_pos = side(key_positions, "key_positions", sk)

        # rules
        if not isinstance(rules, torch.Tensor):
            try:
                rules = torch.tensor(rules)
            except (TypeError, ValueError) as e:
                raise TypeError(f"rules must be an integer [NM, NM] tensor or nested list, got {rules!r}") from e
        rules = _int_tensor(rules, "rules", 2)
        if rules.shape[0] != rules.shape[1] or rules.shape[0] == 0:
            raise ValueError(f"rules must be a square [NM, NM] table with NM >= 1, got shape {tuple(rules.shape)}")
        if rules.device.type == "cpu":
            bad = (rules < BLOCKED) | (rules > SPAN)
            if bool(bad.any()):
                raise ValueError("rules entries must be BLOCKED=0, FULL=1, CAUSAL=2 or SPAN=3, found "
                                 f"{int(rules[bad][0])}")
        else:
            torch._assert_async(((rules >= BLOCKED) & (rules <= SPAN)).all(),
                                "rules entries must be BLOCKED=0, FULL=1, CAUSAL=2 or SPAN=3")
        nm = rules.shape[0]
        # non_blocking: a host-to-device copy of this tiny table must not synchronise
        rules = rules.to(dtype=torch.int8).to(device, non_blocking=rules.device.type == "cpu")

        # defaults (queries are the last Sq keys)
        off = sk - sq
        q_seg, k_seg = _both_sides(q_seg, k_seg, sq, sk, "segment_ids", "key_segment_ids",
                                   lambda: (torch.zeros_like(q_mod), torch.zeros_like(k_mod)))
        q_pos, k_pos = _both_sides(q_pos, k_pos, sq, sk, "positions", "key_positions",
                                   lambda: (_arange_rows(batch, sq, off, device), _arange_rows(batch, sk, 0, device)))

        check.index_range(q_mod, "modality_ids", nm)
        if key_modality_ids is not None:
            check.index_range(k_mod, "key_modality_ids", nm)
        _check_segments(q_seg, "segment_ids")
        if k_seg is not q_seg:
            _check_segments(k_seg, "key_segment_ids")

        k_run = _run_ids(k_mod)
        q_run = k_run[:, off:] if off >= 0 else _run_ids(q_mod)
        self._set(q_mod, k_mod, q_seg, k_seg, q_pos, k_pos, q_run, k_run, rules)

    # -- construction without validation (used by .to)
    def _set(self, q_mod, k_mod, q_seg, k_seg, q_pos, k_pos, q_run, k_run, rules):
        self.kind, self.kind_params = "custom", {}
        self.q_mod, self.k_mod = q_mod.contiguous(), k_mod.contiguous()
        self.q_seg, self.k_seg = q_seg.contiguous(), k_seg.contiguous()
        self.q_pos, self.k_pos = q_pos.contiguous(), k_pos.contiguous()
        self.q_run, self.k_run = q_run.contiguous(), k_run.contiguous()
        self.rules = rules.contiguous()

    def _tag(self, kind: str, **params) -> "MultimodalMask":
        """Record which builder made the mask (``kind``) and what its fast paths need."""
        if kind not in KINDS:
            raise ValueError(f"unknown mask kind {kind!r}; one of {KINDS}")
        self.kind, self.kind_params = kind, params
        return self

    def _fields(self):
        return (self.q_mod, self.k_mod, self.q_seg, self.k_seg, self.q_pos, self.k_pos,
                self.q_run, self.k_run, self.rules)

    def metadata(self) -> list[torch.Tensor]:
        """The kernels' view: ``[q_mod, k_mod, q_seg, k_seg, q_pos, k_pos, q_run, k_run, rules]``."""
        return list(self._fields())

    @classmethod
    def from_metadata(cls, meta) -> "MultimodalMask":
        """Rebuild a mask from :meth:`metadata` (no validation: the tensors come from a mask)."""
        mask = cls.__new__(cls)
        mask._set(*meta)
        return mask

    # -- properties
    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, Sq, Sk)``."""
        return (self.q_mod.shape[0], self.q_mod.shape[1], self.k_mod.shape[1])

    @property
    def device(self) -> torch.device:
        """The device of every metadata tensor."""
        return self.q_mod.device

    @property
    def num_modalities(self) -> int:
        """``NM``, the size of the rule table."""
        return self.rules.shape[0]

    def to(self, device) -> "MultimodalMask":
        """A copy of the mask with every metadata tensor on ``device``."""
        out = MultimodalMask.__new__(MultimodalMask)
        out._set(*(t.to(device) for t in self._fields()))
        return out._tag(self.kind, **{name: t.to(device) if isinstance(t, torch.Tensor) else t
                                      for name, t in self.kind_params.items()})

    def __repr__(self) -> str:
        b, sq, sk = self.shape
        return (f"MultimodalMask(kind={self.kind!r}, B={b}, Sq={sq}, Sk={sk}, "
                f"num_modalities={self.num_modalities}, device={self.device})")

    # -- dense form
    def to_dense(self) -> torch.Tensor:
        """The boolean mask ``[B, 1, Sq, Sk]`` (True = the query attends to the key).

        Materialises ``B * Sq * Sk`` elements: for the reference and for debugging only.
        """
        qm, km = self.q_mod.long()[:, :, None], self.k_mod.long()[:, None, :]
        rule = self.rules[qm, km]                                          # [B, Sq, Sk] int8
        causal = self.k_pos[:, None, :] <= self.q_pos[:, :, None]
        same_run = self.k_run[:, None, :] == self.q_run[:, :, None]
        seg_ok = (self.q_seg[:, :, None] >= 0) & (self.q_seg[:, :, None] == self.k_seg[:, None, :])
        vis = (rule == FULL) | ((rule == CAUSAL) & causal) | ((rule == SPAN) & (causal | same_run))
        return (seg_ok & vis)[:, None]

    # -- tile classification
    def tile_map(self, block_m: int, block_n: int) -> torch.Tensor:
        """Classify each ``block_m x block_n`` tile: int8 ``[B, ceil(Sq/block_m), ceil(Sk/block_n)]``.

        ``0`` (``TILE_EMPTY``): no query of the tile sees any key of the tile.
        ``1`` (``TILE_FULL``): every query of the tile sees every key of the tile.
        ``2`` (``TILE_PARTIAL``): anything else; the kernel evaluates the mask per element.

        Only in-bounds rows/columns count (the last tiles may be ragged; kernels bound-check them).
        Computed on the device from per-tile summaries of the O(S) metadata (min/max of segment,
        position and run ids, and which modalities occur), never from the ``S x S`` mask, and
        without host synchronisation. The classification is **conservative**: a tile that is in
        fact empty or full may be reported partial (e.g. a ``CAUSAL`` pair whose positions
        straddle the tile), but a tile reported empty is always empty and one reported full is
        always full. With block size 1 the map is exact, and the tests check that it is exact for
        every builder's masks (causal, padding, prefix-LM, BLIP-2, InstructBLIP, BEiT-3, packed,
        image spans); it can be conservative for hand-made rule tables and positions.

        On CUDA (power-of-two blocks, NM <= 31) the same map comes from one Triton launch
        (:mod:`mmkernels.attention.tile_kernel`); elsewhere from torch ops.
        """
        block_m = _size(block_m, "block_m")
        block_n = _size(block_n, "block_n")
        b, sq, sk = self.shape
        nm = self.num_modalities
        if self.device.type == "cuda" and _pow2(block_m) and _pow2(block_n) and nm <= 31:
            from .tile_kernel import tile_map_triton  # the same map in one launch (triton is optional)
            return tile_map_triton(self.metadata(), block_m, block_n)
        q = _TileSummary(self.q_mod, self.q_seg, self.q_pos, self.q_run, block_m, nm)
        k = _TileSummary(self.k_mod, self.k_seg, self.k_pos, self.k_run, block_n, nm)

        def pair(a, c):                                   # [B, Tm] x [B, Tn] -> [B, Tm, Tn]
            return a[:, :, None], c[:, None, :]

        # segment test: q_seg >= 0 and q_seg == k_seg
        qmin, kmax = pair(q.vseg_min, k.vseg_max)
        qmax, kmin = pair(q.vseg_max, k.vseg_min)
        seg_none = (qmax < kmin) | (kmax < qmin)          # valid segment ranges disjoint (or a side all padding)
        a, c = pair(q.seg_min, k.seg_min)
        a2, c2 = pair(q.seg_max, k.seg_max)
        seg_all = (a == a2) & (c == c2) & (a == c) & (a >= 0)  # one segment, no padding, on both sides

        # positions: CAUSAL holds for all pairs / for none
        qpmin, kpmax = pair(q.pos_min, k.pos_max)
        qpmax, kpmin = pair(q.pos_max, k.pos_min)
        causal_all = kpmax <= qpmin
        causal_none = kpmin > qpmax
        # runs: q_run == k_run for all pairs / for none
        qrmin, krmax = pair(q.run_min, k.run_max)
        qrmax, krmin = pair(q.run_max, k.run_min)
        run_all = (qrmin == qrmax) & (krmin == krmax) & (qrmin == krmin)
        run_none = (qrmax < krmin) | (krmax < qrmin)

        # which rules occur among the (query modality, key modality) pairs of the tile: exact,
        # as counts  present_q @ [rules == r] @ present_k^T
        rules = self.rules.to(torch.float32)
        has = []
        k_present_t = k.present.transpose(1, 2)                      # [B, NM, Tn]
        for r in (BLOCKED, FULL, CAUSAL, SPAN):                      # static loop over the 4 rule kinds
            sel = (rules == r).to(torch.float32)                      # [NM, NM]
            has.append(torch.bmm(torch.matmul(q.present, sel), k_present_t) > 0)   # [B, Tm, Tn]
        has_blocked, has_full, has_causal, has_span = has

        span_none = causal_none & run_none
        span_all = causal_all | run_all
        empty = seg_none | (~has_full & (~has_causal | causal_none) & (~has_span | span_none))
        full = seg_all & ~has_blocked & (~has_causal | causal_all) & (~has_span | span_all)
        out = torch.full(empty.shape, TILE_PARTIAL, dtype=torch.int8, device=self.device)
        out = torch.where(full, torch.full_like(out, TILE_FULL), out)
        out = torch.where(empty, torch.full_like(out, TILE_EMPTY), out)
        return out

    # -- builders --------------------------------------------------------------------------------

    @classmethod
    def causal(cls, batch: int, seq_len: int, *, device=None) -> "MultimodalMask":
        """Plain causal self-attention (GPT-style decoders, the LLM of LLaVA/BLIP-2 OPT): key j <= query i.

        One modality, rule ``CAUSAL``; ``[B, S]`` metadata on ``device``.
        """
        batch, seq_len = _size(batch, "batch"), _size(seq_len, "seq_len")
        mod = torch.zeros(batch, seq_len, dtype=torch.int32, device=device)
        return cls(mod, torch.tensor([[CAUSAL]], dtype=torch.int8))._tag("causal")

    @classmethod
    def key_padding(cls, lengths, seq_len: int) -> "MultimodalMask":
        """Bidirectional attention over padded samples (BERT/ViT encoders, CLIP's text tower without
        its causal mask, the HF ``attention_mask``): token ``j`` of sample ``b`` is real when
        ``j < lengths[b]``.

        Padding tokens (``j >= lengths[b]``) get segment ``-1``: they see nothing (output 0) and are
        seen by nobody. ``lengths``: ``[B]`` integer tensor or list (values above ``seq_len`` act as
        ``seq_len``).
        """
        lengths = _lengths(lengths, "lengths")
        seq_len = _size(seq_len, "seq_len")
        _check_nonneg_lengths(lengths, "lengths")
        seg = _pad_segments(lengths, seq_len)
        mask = cls(torch.zeros_like(seg), torch.tensor([[FULL]], dtype=torch.int8), segment_ids=seg)
        return mask._tag("key_padding", lengths=lengths.clamp(0, seq_len))

    @classmethod
    def prefix_lm(cls, prefix_lengths, lengths, seq_len: int) -> "MultimodalMask":
        """Prefix-LM mask of GLM / VisualGLM-6B (and UniLM's seq2seq mask): the first
        ``prefix_lengths[b]`` tokens (image tokens + prompt) attend to each other bidirectionally;
        later tokens attend to the whole prefix and causally to earlier later tokens; tokens at
        ``j >= lengths[b]`` are padding.

        Modality 0 is the prefix, 1 the generated part; rules ``[[FULL, BLOCKED], [FULL, CAUSAL]]``.
        """
        prefix = _lengths(prefix_lengths, "prefix_lengths")
        lengths = _lengths(lengths, "lengths", device=prefix.device)
        seq_len = _size(seq_len, "seq_len")
        if prefix.shape != lengths.shape:
            raise ValueError(f"prefix_lengths has {prefix.shape[0]} samples but lengths has {lengths.shape[0]}")
        _check_nonneg_lengths(prefix, "prefix_lengths")
        _check_nonneg_lengths(lengths, "lengths")
        idx = torch.arange(seq_len, dtype=torch.int32, device=prefix.device)[None]
        mod = (idx >= prefix[:, None]).to(torch.int32)
        rules = torch.tensor([[FULL, BLOCKED], [FULL, CAUSAL]], dtype=torch.int8)
        return cls(mod, rules, segment_ids=_pad_segments(lengths, seq_len))._tag("prefix_lm")

    @classmethod
    def blip2(cls, num_query_tokens: int, text_lengths, text_len: int, objective: str = "itc") -> "MultimodalMask":
        """The BLIP-2 Q-Former self-attention masks (LAVIS ``Blip2Qformer``), one per training objective.

        The sequence is ``[num_query_tokens learned queries ; text_len text tokens]`` (modality 0 =
        queries, 1 = text); text token ``t`` of sample ``b`` is padding when ``t >= text_lengths[b]``.

        * ``"itc"`` (image-text contrastive): queries and text are blind to each other; each side is
          bidirectional inside itself. Rules ``[[FULL, BLOCKED], [BLOCKED, FULL]]``.
        * ``"itm"`` (image-text matching): fully bidirectional. Rules ``[[FULL, FULL], [FULL, FULL]]``.
        * ``"itg"`` (image-grounded text generation, the multimodal causal mask): queries see only
          queries; text sees all queries and earlier text. Rules ``[[FULL, BLOCKED], [FULL, CAUSAL]]``.
        """
        objectives = {
            "itc": [[FULL, BLOCKED], [BLOCKED, FULL]],
            "itm": [[FULL, FULL], [FULL, FULL]],
            "itg": [[FULL, BLOCKED], [FULL, CAUSAL]],
        }
        if objective not in objectives:
            raise ValueError(f"objective must be one of {tuple(objectives)}, got {objective!r}")
        return _two_part(cls, num_query_tokens, "num_query_tokens", text_lengths, "text_lengths",
                         text_len, "text_len", objectives[objective])._tag("blip2", objective=objective)

    @classmethod
    def instructblip(cls, num_query_tokens: int, instruction_lengths, instruction_len: int) -> "MultimodalMask":
        """InstructBLIP's instruction-aware Q-Former (LAVIS ``Blip2T5Instruct``/``Blip2VicunaInstruct``):
        the sequence ``[queries ; instruction tokens]`` attends bidirectionally (queries and
        instruction see each other); instruction token ``t`` is padding when
        ``t >= instruction_lengths[b]``. Modality 0 = queries, 1 = instruction; all rules ``FULL``.
        """
        return _two_part(cls, num_query_tokens, "num_query_tokens", instruction_lengths, "instruction_lengths",
                         instruction_len, "instruction_len", [[FULL, FULL], [FULL, FULL]])._tag("instructblip")

    @classmethod
    def beit3_captioning(cls, num_image_tokens: int, text_lengths, text_len: int) -> "MultimodalMask":
        """BEiT-3 image captioning (``BEiT3ForCaptioning`` in unilm/beit3): ``[image tokens ; text]``
        where image tokens see all image tokens only and text sees all image tokens plus earlier
        text; text token ``t`` is padding when ``t >= text_lengths[b]``.
        Modality 0 = image, 1 = text; rules ``[[FULL, BLOCKED], [FULL, CAUSAL]]``.
        """
        return _two_part(cls, num_image_tokens, "num_image_tokens", text_lengths, "text_lengths",
                         text_len, "text_len", [[FULL, BLOCKED], [FULL, CAUSAL]])._tag("beit3_captioning")

    @classmethod
    def packed(cls, cu_seqlens, causal: bool = True, *, seq_len: int | None = None) -> "MultimodalMask":
        """Packed (varlen) samples in one row, as in FlashAttention's ``cu_seqlens`` API and packed
        LLaVA / OpenFlamingo training: sample ``i`` occupies tokens ``cu_seqlens[i]:cu_seqlens[i+1]``
        and attends only inside itself, causally (``causal=True``) or bidirectionally.

        ``cu_seqlens``: integer ``[N + 1]``, non-decreasing, starting at 0. Returns a mask of batch 1
        and length ``seq_len`` (default ``cu_seqlens[-1]``, read from the tensor: pass ``seq_len``
        for a CUDA ``cu_seqlens`` to avoid that host synchronisation). Tokens at
        ``j >= cu_seqlens[-1]`` are padding.
        """
        cu = _int_tensor(cu_seqlens, "cu_seqlens", 1)
        if cu.shape[0] < 2:
            raise ValueError(f"cu_seqlens needs at least 2 entries (one sample), got {cu.shape[0]}")
        if seq_len is None:
            seq_len = int(cu[-1])
        seq_len = _size(seq_len, "seq_len")
        if cu.device.type == "cpu":
            if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
                raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu.tolist()}")
        else:
            torch._assert_async((cu[0] == 0) & (cu[1:] >= cu[:-1]).all(),
                                "cu_seqlens must start at 0 and be non-decreasing")
        idx = torch.arange(seq_len, dtype=torch.int32, device=cu.device)
        seg = torch.searchsorted(cu, idx, right=True).to(torch.int32) - 1
        seg = torch.where(seg >= cu.shape[0] - 1, torch.full_like(seg, -1), seg)[None]
        rule = CAUSAL if causal else FULL
        mask = cls(torch.zeros_like(seg), torch.tensor([[rule]], dtype=torch.int8), segment_ids=seg)
        return mask._tag("packed", cu_seqlens=cu, causal=bool(causal))

    @classmethod
    def image_spans_in_causal(cls, modality_ids, image_modality: int = 1, *, segment_ids=None) -> "MultimodalMask":
        """Causal sequence in which each contiguous run of image tokens is bidirectional (LLaVA-style
        interleaved image/text sequences with bidirectional image patches, as in Gemma-3/PaliGemma-style
        VLMs): an image token sees every token of its own image run and everything before it; text is
        causal.

        ``modality_ids``: integer ``[B, S]``; tokens equal to ``image_modality`` are image tokens,
        anything else is text. The mask's modalities are 0 = text, 1 = image with rules
        ``[[CAUSAL, CAUSAL], [CAUSAL, SPAN]]``. ``segment_ids`` (optional) packs samples / marks padding.
        """
        mod = _int_tensor(modality_ids, "modality_ids", 2)
        mod = (mod == int(image_modality)).to(torch.int32)
        rules = torch.tensor([[CAUSAL, CAUSAL], [CAUSAL, SPAN]], dtype=torch.int8)
        return cls(mod, rules, segment_ids=segment_ids)._tag("image_spans")


# ----------------------------------------------------------------------------- builder helpers

def _pad_segments(lengths: torch.Tensor, seq_len: int, start: int = 0) -> torch.Tensor:
    """Segment 0 for ``j < start + lengths[b]``, -1 beyond: int32 ``[B, seq_len]``."""
    idx = torch.arange(seq_len, dtype=torch.int32, device=lengths.device)[None]
    return torch.where(idx < start + lengths[:, None], 0, -1).to(torch.int32)


def _two_part(cls, n_first, first_name, lengths, lengths_name, second_len, second_name, rules):
    """``[n_first always-present tokens (modality 0) ; second_len padded tokens (modality 1)]``."""
    n_first = _size(n_first, first_name, minimum=0)
    second_len = _size(second_len, second_name, minimum=0)
    if n_first + second_len == 0:
        raise ValueError(f"{first_name} + {second_name} must be at least 1")
    lengths = _lengths(lengths, lengths_name)
    _check_nonneg_lengths(lengths, lengths_name)
    total = n_first + second_len
    idx = torch.arange(total, dtype=torch.int32, device=lengths.device)[None]
    mod = (idx >= n_first).to(torch.int32).expand(lengths.shape[0], total)
    seg = _pad_segments(lengths, total, start=n_first)
    return cls(mod, torch.tensor(rules, dtype=torch.int8), segment_ids=seg)


def _pow2(n: int) -> bool:
    return n & (n - 1) == 0


class _TileSummary:
    """Per-tile summaries of one side's metadata (all ``[B, T]`` int32, ``present`` float32 ``[B, T, NM]``).

    Rows past the end of the sequence are neutral: they change no minimum, maximum or presence.
    """

    def __init__(self, mod, seg, pos, run, block: int, nm: int):
        b, s = mod.shape
        t = math.ceil(s / block)
        pad = t * block - s

        def tiles(x, fill):
            if pad:
                x = torch.cat([x, torch.full((b, pad), fill, dtype=x.dtype, device=x.device)], dim=1)
            return x.view(b, t, block)

        self.seg_min = tiles(seg, _I32_MAX).amin(-1)
        self.seg_max = tiles(seg, _I32_MIN).amax(-1)
        valid = seg >= 0
        self.vseg_min = tiles(torch.where(valid, seg, _I32_MAX), _I32_MAX).amin(-1)
        self.vseg_max = tiles(torch.where(valid, seg, -1), -1).amax(-1)
        self.pos_min = tiles(pos, _I32_MAX).amin(-1)
        self.pos_max = tiles(pos, _I32_MIN).amax(-1)
        self.run_min = tiles(run, _I32_MAX).amin(-1)
        self.run_max = tiles(run, _I32_MIN).amax(-1)
        # rows past the end get modality id nm, which matches no column of the one-hot
        ids = tiles(mod, nm)
        onehot = ids[..., None] == torch.arange(nm, dtype=mod.dtype, device=mod.device)  # [B, T, block, NM]
        self.present = onehot.any(2).to(torch.float32)                                   # [B, T, NM] 0/1
