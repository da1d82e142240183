"""The attention paths built from PyTorch's own fast ops, for backend ``auto`` (see ``_dispatch``).

* ``"sdpa"``: ``scaled_dot_product_attention`` (PyTorch picks flash, cuDNN or the efficient
  kernel) for full attention, plain causal masks (``Sq == Sk``) and key padding, given as a
  ``[B, 1, 1, Sk]`` boolean mask (O(B*S), never ``S x S``).
* ``"varlen"``: ``torch.nn.attention.varlen.varlen_attn`` for packed documents (CUDA only).
* ``"flex"``: FlexAttention, compiled once per shape, fed a ``BlockMask`` made directly from
  :meth:`MultimodalMask.tile_map` (no ``create_block_mask``) whose ``mask_mod`` evaluates the
  mask from its O(S) metadata: any mask.

:func:`eligibility` says, for one call, which of them can run it (``None``) or why not;
:func:`run` runs one. Every path keeps the op contract: rows that see no key give 0 and zero
gradient, no host synchronisation, no ``S x S`` tensor beyond the memory budget.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _dispatch
from .mask import MultimodalMask, TILE_FULL, TILE_PARTIAL

PATHS = ("sdpa", "varlen", "flex")

#: sequences up to this length (the longer of Sq and Sk) are "short" in a shape class
SHORT_SEQ = 1024

#: mask kinds of :func:`shape_class`; every other builder's kind is ``"multimodal"``
CLASS_KINDS = ("none", "causal", "key_padding", "packed", "multimodal")

FLEX_BLOCK = 128


def mask_kind(mask: MultimodalMask | None) -> str:
    """The mask's kind as the shape classes see it: ``"none"`` for full attention, the
    builder's kind for causal, key padding and packed masks, else ``"multimodal"``."""
    if mask is None:
        return "none"
    return mask.kind if mask.kind in CLASS_KINDS else "multimodal"


def shape_class(mask_kind: str, sq: int, sk: int, head_dim: int) -> str:
    """The shape class of a call: ``"<kind>:s<=1024"`` or ``"<kind>:s>1024"`` on the longer
    sequence, with ``mask_kind`` in :data:`CLASS_KINDS` (any other kind counts as
    ``"multimodal"``). ``head_dim`` does not split the classes: every path serves the same
    head dims."""
    kind = mask_kind if mask_kind in CLASS_KINDS else "multimodal"
    length = "s<=1024" if max(sq, sk) <= SHORT_SEQ else "s>1024"
    return f"{kind}:{length}"


# ----------------------------------------------------------------------------- eligibility

def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _sdpa_math_bytes(q: torch.Tensor, sk: int) -> int:
    """What SDPA's math fallback holds at once: fp32 scores and probabilities, ``[B, Hq, Sq, Sk]``."""
    b, hq, sq, _ = q.shape
    return 2 * b * hq * sq * sk * 4


def sdpa_fallback_reason(q, k, v, attn_mask, dropout_p: float, is_causal: bool, enable_gqa: bool,
                         scale: float) -> str | None:
    """``None`` when SDPA runs a fused kernel (flash, cuDNN, efficient) on these inputs or its
    math fallback fits the memory budget, else why not. Asks PyTorch's own selector (host-side
    checks only)."""
    if torch.compiler.is_compiling():
        # the selector returns a Python int, which Dynamo cannot trace: inside a compiled graph
        # only CPU dropout (run by the math kernel there) counts as the fallback
        fused = not (dropout_p > 0 and q.device.type == "cpu")
        return None if fused else _math_budget_reason(q, k)
    try:
        choice = torch._fused_sdp_choice(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                         is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    except (RuntimeError, TypeError, ValueError, AttributeError):  # no selector in this build: assume fused
        return None
    if choice != int(torch.nn.attention.SDPBackend.MATH):
        return None
    return _math_budget_reason(q, k)


def _math_budget_reason(q, k) -> str | None:
    need, budget = _sdpa_math_bytes(q, k.shape[2]), _dispatch.memory_budget()
    if need > budget:
        return (f"SDPA would fall back to its math kernel here, whose Sq x Sk scores "
                f"({need} bytes) exceed memory_budget ({budget} bytes)")
    return None


def fp32_gradient_reason(q, k, v, what: str) -> str | None:
    """Why PyTorch's fused attention (``what``: SDPA, FlexAttention) is not chosen for float32
    inputs that need gradients, or None. Their backward recomputes the probabilities from one
    float32 log-sum-exp, whose rounding at large scores costs many times eager's error in
    float32 (README, "Numerics"); the kernels keep the row max and the sum apart. In 16-bit
    dtypes eager's own rounding dominates and they keep the twice-eager rule. A
    :class:`~mmkernels._dispatch.NotForAuto` reason: ``use_path`` still runs them."""
    if q.dtype == torch.float32 and _needs_grad(q, k, v):
        return _dispatch.NotForAuto(
            f"float32 with gradients: {what}'s backward recomputes the probabilities from one "
            "rounded log-sum-exp, beyond twice eager's error at large scores (use_path runs it)")
    return None


def _sdpa_reason(q, k, v, mask, scale, return_lse) -> str | None:
    if return_lse:
        return "SDPA does not return the log-sum-exp (return_lse=True)"
    kind = "none" if mask is None else mask.kind
    sq, sk = q.shape[2], k.shape[2]
    if kind == "causal" and sq != sk:
        return "SDPA's is_causal aligns queries to the first keys, the mask to the last (Sq != Sk)"
    if kind not in ("none", "causal", "key_padding"):
        return f"SDPA serves no mask, causal and key padding masks, not {kind!r} (it would need a dense mask)"
    attn_mask = None
    if kind == "key_padding" and not torch.compiler.is_compiling():  # a probe for the selector
        attn_mask = torch.empty((q.shape[0], 1, 1, sk), dtype=torch.bool, device=q.device)
    gqa = q.shape[1] != k.shape[1]
    # a reason it cannot run first: use_path runs past a NotForAuto reason only
    return (sdpa_fallback_reason(q, k, v, attn_mask, 0.0, kind == "causal", gqa, scale)
            or fp32_gradient_reason(q, k, v, "SDPA"))


def _varlen_reason(q, k, v, mask, return_lse) -> str | None:
    if mask is None or mask.kind != "packed":
        return "varlen attention serves packed masks (MultimodalMask.packed) only"
    if return_lse:
        return "the varlen path does not return the log-sum-exp (return_lse=True)"
    if q.device.type != "cuda":
        return f"varlen_attn runs on CUDA only, not on {q.device.type} tensors"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"varlen_attn takes bfloat16 or float16, not {q.dtype}"
    if q.shape[2] != k.shape[2]:
        return "varlen attention needs Sq == Sk for a packed mask"
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return "this torch has no torch.nn.attention.varlen"
    return None


def _flex_reason(q, k, v, mask, return_lse) -> str | None:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return "this torch has no FlexAttention"
    if q.dtype == torch.float64:
        return "FlexAttention takes float32, bfloat16 or float16 here"
    if q.device.type == "cpu":
        if _needs_grad(q, k, v):
            return "FlexAttention has no backward on CPU (inputs require grad)"
        if return_lse:
            return "compiled FlexAttention on CPU does not return the log-sum-exp"
    elif q.device.type != "cuda":
        return f"FlexAttention runs on CPU and CUDA, not on {q.device.type} tensors"
    if _flex_key(q, k, mask, return_lse) not in _flex_shapes and len(_flex_shapes) >= _recompile_limit():
        return (f"FlexAttention is already compiled for {len(_flex_shapes)} shapes, Dynamo's "
                "recompile limit: another shape would run it eagerly with S x S scores")
    return fp32_gradient_reason(q, k, v, "FlexAttention")  # last: use_path may run past it


def eligibility(q, k, v, mask, scale: float, return_lse: bool) -> dict[str, str | None]:
    """``{path: None or the reason it cannot run this call}`` for every path of :data:`PATHS`."""
    return {
        "sdpa": _sdpa_reason(q, k, v, mask, scale, return_lse),
        "varlen": _varlen_reason(q, k, v, mask, return_lse),
        "flex": _flex_reason(q, k, v, mask, return_lse),
    }


# ----------------------------------------------------------------------------- choosing

def choose(family: str, op: str, q: torch.Tensor, cls: str, can: dict) -> tuple[str, str | None]:
    """``(path, kernel backend)`` of :func:`_dispatch.choose` for this call (both attention
    families use it)."""
    d = _dispatch.choose(family, op, q, cls, can)
    return d.path, d.backend


# ----------------------------------------------------------------------------- running

def run(path: str, q, k, v, mask, scale: float, return_lse: bool = False):
    """Run ``path`` (one of :data:`PATHS`, eligible for the call): ``out`` (and ``lse`` for flex)."""
    if path == "sdpa":
        return sdpa_attention(q, k, v, mask, scale)
    if path == "varlen":
        return varlen_attention(q, k, v, mask, scale)
    if path == "flex":
        return flex_attention(q, k, v, mask, scale, return_lse=return_lse)
    raise ValueError(f"unknown attention path {path!r}")


def key_padding_masks(lengths: torch.Tensor, sq: int, sk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From the sample lengths ``[B]``: the keys SDPA may see, bool ``[B, 1, 1, Sk]``, and the real
    queries, bool ``[B, Sq]``.

    A sample with no real token (length 0) lets its queries see every key, so SDPA's rows stay
    finite; all those queries are padding and their output is zeroed afterwards.
    """
    j = torch.arange(sk, device=lengths.device, dtype=lengths.dtype)
    keys = (j[None] < lengths[:, None]) | (lengths[:, None] <= 0)
    i = torch.arange(sq, device=lengths.device, dtype=lengths.dtype)
    queries = i[None] < lengths[:, None]
    return keys[:, None, None, :], queries


def sdpa_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """``scaled_dot_product_attention`` for no mask, a causal mask or key padding.

    Padded query rows are multiplied by 0: their output is 0 and, as SDPA's backward sees a zero
    output gradient there, they pass zero gradient to q, k and v.
    """
    gqa = q.shape[1] != k.shape[1]
    kind = "none" if mask is None else mask.kind
    if kind in ("none", "causal"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=kind == "causal", scale=scale,
                                              enable_gqa=gqa)
    lengths = mask.kind_params["lengths"].to(q.device, non_blocking=True)
    keys, queries = key_padding_masks(lengths, q.shape[2], k.shape[2])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, scale=scale, enable_gqa=gqa)
    return out * queries[:, None, :, None].to(out.dtype)


def varlen_layout(q, k, v, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[1, H, S, D]`` q/k/v as varlen's packed ``[S, H, D]`` views, the ``cu_seqlens`` to pass
    (int32 on q's device; the tokens past the last document, padding, form one extra document
    so that every row stays finite) and the real tokens, bool ``[S]``."""
    s = q.shape[2]
    cu = mask.kind_params["cu_seqlens"].to(q.device, torch.int32, non_blocking=True).clamp(0, s)
    cu = torch.cat([cu, torch.full((1,), s, dtype=torch.int32, device=q.device)])
    real = mask.q_seg[0] >= 0
    return q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, real


def varlen_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """Packed documents through ``varlen_attn``. ``max_q = max_k = S``, an upper bound of every
    document's length, so nothing is read back from the device."""
    from torch.nn.attention.varlen import varlen_attn
    qp, kp, vp, cu, real = varlen_layout(q, k, v, mask)
    s = q.shape[2]
    window = (-1, 0) if mask.kind_params["causal"] else (-1, -1)
    out = varlen_attn(qp, kp, vp, cu, cu, s, s, scale=scale, window_size=window,
                      enable_gqa=q.shape[1] != k.shape[1])              # [S, H, D]
    out = out * real[:, None, None].to(out.dtype)
    return out.transpose(0, 1)[None]


# ----------------------------------------------------------------------------- flex

_flex_fn = []                 # the compiled flex_attention, made on first use
_flex_shapes: set[tuple] = set()  # the input shapes it has been compiled for


def _recompile_limit() -> int:
    config = torch._dynamo.config
    return int(getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 8)))


def _flex_key(q, k, mask, return_lse) -> tuple:
    """What Dynamo specialises the compiled call on."""
    nm = None if mask is None else mask.num_modalities
    return (q.device.type, q.dtype, tuple(q.shape), tuple(k.shape), nm, return_lse)


def _compiled_flex():
    """The compiled ``flex_attention`` (one compile per input shape: Dynamo's cache holds them;
    ``dynamic=False`` because a dynamic-shape recompile fails on CPU)."""
    if not _flex_fn:
        from torch.nn.attention.flex_attention import flex_attention as flex
        _flex_fn.append(torch.compile(flex, dynamic=False))
    return _flex_fn[0]


def _blocks(tiles: torch.Tensor, which: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``which`` tiles of each query block row: counts ``[B, 1, Tm]`` and column indices
    ``[B, 1, Tm, Tn]`` (those tiles first, in order), by a stable sort: no ``nonzero``."""
    sel = tiles == which
    count = sel.sum(-1, dtype=torch.int32)
    order = torch.argsort((~sel).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return count[:, None], order[:, None]


def block_mask(mask: MultimodalMask):
    """A FlexAttention ``BlockMask`` for ``mask``: 128 x 128 tiles of :meth:`tile_map`, empty ones
    dropped, full ones as full blocks, partial ones evaluated by a ``mask_mod`` that reads the
    mask's metadata (the same rule as :meth:`MultimodalMask.to_dense`)."""
    from torch.nn.attention.flex_attention import BlockMask
    from .mask import CAUSAL, FULL, SPAN
    tiles = mask.tile_map(FLEX_BLOCK, FLEX_BLOCK)
    kv_num, kv_idx = _blocks(tiles, TILE_PARTIAL)
    full_num, full_idx = _blocks(tiles, TILE_FULL)
    q_mod, k_mod, q_seg, k_seg, q_pos, k_pos, q_run, k_run, rules = mask.metadata()
    # one fresh tensor per side: builders share tensors between the sides (q_mod is k_mod when
    # Sq == Sk), and Dynamo would compile again for each pattern of such aliasing
    qm = torch.stack([q_mod, q_seg, q_pos, q_run])                 # [4, B, Sq]
    km = torch.stack([k_mod, k_seg, k_pos, k_run])                 # [4, B, Sk]
    rules = rules.to(torch.int32)

    def mask_mod(b, h, qi, kj):
        rule = rules[qm[0, b, qi], km[0, b, kj]]
        causal = km[2, b, kj] <= qm[2, b, qi]
        same_run = qm[3, b, qi] == km[3, b, kj]
        seg_ok = (qm[1, b, qi] >= 0) & (qm[1, b, qi] == km[1, b, kj])
        return seg_ok & ((rule == FULL) | ((rule == CAUSAL) & causal) | ((rule == SPAN) & (causal | same_run)))

    _, sq, sk = mask.shape
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(sq, sk))


def flex_attention(q, k, v, mask, scale: float, *, return_lse: bool = False):
    """Compiled FlexAttention under :func:`block_mask` (no block mask for full attention). Rows
    that see no key come out 0 (``lse = -inf``)."""
    fn = _compiled_flex()
    if not _needs_grad(q, k, v):
        # no graph is recorded; detached inputs also keep CPU FlexAttention, which has no
        # backward and rejects inputs that require grad, usable under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    _flex_shapes.add(_flex_key(q, k, mask, return_lse))
    bm = None if mask is None else block_mask(mask)
    res = fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
             return_lse=return_lse)
    if not return_lse:
        return res
    out, lse = res
    return out, lse.float()
