"""Attention family: multimodal masked attention against SDPA and FlexAttention.

Three ops, all with the shape keys ``mask, B, H, S, D`` (self-attention, ``Sq = Sk = S``,
``Hq = Hkv = H``, q/k/v ``[B, H, S, D]``):

* ``attention_fwd`` (mode ``fwd``): one forward call, under ``torch.no_grad``.
* ``attention_fwd_bwd`` (mode ``fwd+bwd``): forward, then ``loss.backward()`` with
  ``loss = sum(out * dout)`` for a fixed random ``dout`` (zero on query rows that see no
  key, e.g. padding: a model ignores those outputs), gradients for q, k and v.
* ``attention_mask`` (mode ``fwd``): what each method spends turning the O(S) mask
  description into what its kernel reads: mmkernels' tile map (``mask.tile_map`` at the
  kernel's block size), FlexAttention's ``create_block_mask``, the dense ``[B, 1, S, S]``
  boolean mask of SDPA (``mask.to_dense()``). Compare ``mmkernels`` here with ``mmkernels``
  in ``attention_fwd`` of the same shape for "metadata cost as % of the forward".

``mask`` names the layout, ``kind:params``; every layout is built with a
:class:`mmkernels.attention.mask.MultimodalMask` builder, with fixed seeds (padding lengths,
document lengths), so every provider and every run sees the same mask:

* ``blip2_itg:NQ+T``: BLIP-2 Q-Former, image-grounded text generation (``blip2(objective="itg")``):
  NQ learned queries + T text tokens; text lengths drawn in ``[T/2, T]`` (the rest is padding).
* ``instructblip:NQ+T``: InstructBLIP's Q-Former, queries + T instruction tokens (padded likewise).
* ``beit3_cap:NI+T``: BEiT-3 captioning, NI image tokens + T text tokens (padded likewise).
* ``llava:NI``: LLaVA-style sequence, NI bidirectional image tokens then causal text
  (``image_spans_in_causal``).
* ``packed:LO-HI``: B = 1, documents of LO..HI tokens (seed 0), causal inside each (``packed``).
* ``full``: no mask (EVA ViT-g/14 vision tower, head dim 88): ``mask=None`` for every provider.
* ``causal``: plain causal (``MultimodalMask.causal``).

Providers: ``mmkernels`` (``mmkernels.multimodal_attention``), ``sdpa_dense`` (SDPA with the
dense boolean mask, built before the timed calls), ``sdpa_flash`` (SDPA ``is_causal=True``,
flash backend; plain causal only), ``flex`` (``flex_attention`` under ``torch.compile`` with a
prebuilt ``BlockMask`` whose ``mask_mod`` reads the mask's metadata tensors), ``reference``
(``multimodal_attention_reference``, eager, materialises the scores).

Prebuilt objects (dense mask, block mask) are built by the provider's first, untimed call (the
harness always makes one: compilation / warm-up) and cached on the ``ctx`` input, so timed calls
never include them; the ``attention_mask`` op times their construction on its own.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from bench.cases import mm
from bench.cases.common import elem_size, missing
from bench.harness import Case, Provider

FAMILY = "attention"
OP_FWD, OP_BWD, OP_MASK = "attention_fwd", "attention_fwd_bwd", "attention_mask"
FLEX_BLOCK = 128  # create_block_mask's default BLOCK_SIZE
DEFAULT_TILE = (128, 64)  # mmkernels' Triton forward tile (bf16, D <= 128) when the kernel module does not say
CPU_TILE = (64, 128)  # the C++ kernel's BM x BN (mmkernels/csrc/attention.cpp; it classifies tiles itself, inside its forward)
BWD_FLOP_FACTOR = 2.5  # forward + backward = 2.5 x forward (the backward recomputes QK^T and does 4 products)

# (mask, B, H, S, D) per device kind and profile
GPU_CASES = {
    "full": [
        ("blip2_itg:32+32", 128, 12, 64, 64),
        ("blip2_itg:32+128", 128, 12, 160, 64),
        ("instructblip:32+128", 128, 12, 160, 64),
        ("beit3_cap:197+64", 32, 16, 261, 64),
        ("llava:576", 8, 32, 2048, 128),
        ("packed:500-3000", 1, 16, 16384, 128),
        ("full", 64, 16, 257, 88),
        ("causal", 4, 16, 4096, 128),
        ("causal", 2, 16, 8192, 128),
    ],
    "quick": [
        ("blip2_itg:32+128", 128, 12, 160, 64),
        ("llava:576", 8, 32, 2048, 128),
        ("causal", 2, 16, 8192, 128),
    ],
}
CPU_CASES = {
    "full": [
        ("blip2_itg:32+32", 8, 12, 64, 64),
        ("blip2_itg:32+128", 8, 12, 160, 64),
        ("instructblip:32+128", 8, 12, 160, 64),
        ("beit3_cap:197+64", 2, 16, 261, 64),
        ("llava:576", 1, 8, 1024, 64),
        ("packed:100-400", 1, 8, 1024, 64),
        ("full", 2, 16, 257, 88),
        ("causal", 1, 8, 256, 64),
        ("causal", 1, 8, 512, 64),
        ("causal", 1, 8, 1024, 64),  # CPU target: no slower than sdpa_dense at S = 1024
    ],
    "quick": [
        ("blip2_itg:32+128", 8, 12, 160, 64),
        ("causal", 1, 8, 1024, 64),
    ],
}
# pytest bench/: every layout once, tiny (the same on either device)
PYTEST_CASES = [
    ("blip2_itg:4+12", 2, 2, 16, 16),
    ("instructblip:4+12", 2, 2, 16, 16),
    ("beit3_cap:9+7", 2, 2, 16, 16),
    ("llava:10", 2, 2, 32, 16),
    ("packed:5-15", 1, 2, 48, 16),
    ("full", 1, 2, 24, 88),
    ("causal", 1, 2, 32, 16),
]


# --------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------


def _split(params: str, sep: str) -> tuple:
    a, b = params.split(sep)
    return int(a), int(b)


def _pad_lengths(batch: int, n: int) -> torch.Tensor:
    """Lengths in [n/2, n] (seed 0), the first sample full: a padded batch of captions/instructions."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(n // 2, 1), n + 1, (batch,), generator=g, dtype=torch.int32)
    lengths[0] = n
    return lengths


def doc_lengths(seq_len: int, lo: int, hi: int) -> list:
    """Document lengths drawn in [lo, hi] (seed 0) until they fill ``seq_len``; the last is cut to fit."""
    g = torch.Generator().manual_seed(0)
    out, total = [], 0
    while total < seq_len:
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        n = min(n, seq_len - total)
        out.append(n)
        total += n
    return out


def build_mask(kind: str, B: int, S: int, device: str = "cpu"):
    """The :class:`MultimodalMask` of layout ``kind`` (``None`` for ``full``) on ``device``."""
    from mmkernels.attention.mask import MultimodalMask

    name, _, params = kind.partition(":")
    if name == "full":
        return None
    if name == "causal":
        return MultimodalMask.causal(B, S, device=device)
    if name in ("blip2_itg", "instructblip", "beit3_cap"):
        first, n = _split(params, "+")
        if first + n != S:
            raise ValueError(f"mask {kind!r} has {first + n} tokens but S = {S}")
        lengths = _pad_lengths(B, n)
        if name == "blip2_itg":
            m = MultimodalMask.blip2(first, lengths, n, objective="itg")
        elif name == "instructblip":
            m = MultimodalMask.instructblip(first, lengths, n)
        else:
            m = MultimodalMask.beit3_captioning(first, lengths, n)
        return m.to(device)
    if name == "llava":
        n_img = int(params)
        if n_img >= S:
            raise ValueError(f"mask {kind!r}: {n_img} image tokens leave no text in S = {S}")
        mod = torch.zeros(B, S, dtype=torch.int32)
        mod[:, :n_img] = 1
        return MultimodalMask.image_spans_in_causal(mod, image_modality=1).to(device)
    if name == "packed":
        if B != 1:
            raise ValueError(f"mask {kind!r} packs documents into one row: B must be 1, got {B}")
        lo, hi = _split(params, "-")
        cu = torch.tensor([0] + doc_lengths(S, lo, hi), dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return MultimodalMask.packed(cu, causal=True, seq_len=S).to(device)
    raise ValueError(f"unknown mask layout {kind!r}")


def mask_mod_for(mask):
    """A FlexAttention ``mask_mod`` that evaluates the MultimodalMask rule from its metadata tensors
    (the same rule as ``MultimodalMask.to_dense``)."""
    from mmkernels.attention.mask import CAUSAL, FULL, SPAN

    q_mod, k_mod, q_seg, k_seg = mask.q_mod, mask.k_mod, mask.q_seg, mask.k_seg
    q_pos, k_pos, q_run, k_run = mask.q_pos, mask.k_pos, mask.q_run, mask.k_run
    # [NM, NM], indexed by two tensors: no Python int in the traced expression (torch.compile
    # turns a captured int into a SymInt once it has seen two masks, which vmap cannot multiply)
    rules = mask.rules.to(torch.int32).reshape(mask.num_modalities, mask.num_modalities)

    def mask_mod(b, h, q_idx, kv_idx):
        qs = q_seg[b, q_idx]
        rule = rules[q_mod[b, q_idx], k_mod[b, kv_idx]]
        causal = k_pos[b, kv_idx] <= q_pos[b, q_idx]
        same_run = q_run[b, q_idx] == k_run[b, kv_idx]
        vis = (rule == FULL) | ((rule == CAUSAL) & causal) | ((rule == SPAN) & (causal | same_run))
        return (qs >= 0) & (qs == k_seg[b, kv_idx]) & vis

    return mask_mod


def visible_per_row(mask, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """int64 ``[B, Sq]``: how many keys each query row sees, evaluated from the metadata in chunks
    of query rows (never the whole ``B x Sq x Sk`` mask at once)."""
    b, sq, sk = mask.shape
    mod = mask_mod_for(mask)
    dev = mask.device
    bi = torch.arange(b, device=dev)[:, None, None]
    ki = torch.arange(sk, device=dev)[None, None, :]
    rows = max(1, chunk_elems // max(b * sk, 1))
    out = []
    for i in range(0, sq, rows):
        qi = torch.arange(i, min(i + rows, sq), device=dev)[None, :, None]
        out.append(mod(bi, 0, qi, ki).sum(-1))
    return torch.cat(out, dim=1)


@functools.lru_cache(maxsize=None)
def visible_pairs(kind: str, B: int, S: int) -> int:
    """Visible (query, key) pairs of the layout over the batch, analytic for the layouts above
    (the tests check each against ``to_dense``); counted from the metadata for any other."""
    name, _, params = kind.partition(":")
    if name == "full":
        return B * S * S
    if name == "causal":
        return B * S * (S + 1) // 2
    if name == "packed":
        lo, hi = _split(params, "-")
        return sum(n * (n + 1) // 2 for n in doc_lengths(S, lo, hi))
    if name == "llava":  # image rows see the whole image run; text row i sees keys 0..i
        n_img = int(params)
        return B * (n_img * n_img + (S * (S + 1) - n_img * (n_img + 1)) // 2)
    if name in ("blip2_itg", "beit3_cap", "instructblip"):
        first, n = _split(params, "+")
        total = 0
        for L in _pad_lengths(B, n).tolist():
            if name == "instructblip":  # queries and real instruction tokens all see each other
                total += (first + L) ** 2
            else:  # first part sees itself; text row i sees the first part and text 0..i
                total += first * first + L * first + L * (L + 1) // 2
        return total
    return int(visible_per_row(build_mask(kind, B, S)).sum())


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


class AttnContext:
    """The non-tensor input of a case: the mask and what providers prebuild from it (cached)."""

    def __init__(self, kind: str, mask, device: str):
        self.kind = kind
        self.mask = mask
        self.device = device
        self._dense = None
        self._block = {}

    def dense(self):
        """The ``[B, 1, S, S]`` boolean mask for SDPA (``None`` for full attention)."""
        if self.mask is not None and self._dense is None:
            self._dense = self.mask.to_dense()
        return self._dense

    def block_mask(self, compiled: bool):
        if self.mask is None:
            return None
        if compiled not in self._block:
            self._block[compiled] = flex_block_mask(self.mask, compiled)
        return self._block[compiled]


def _dims(case: Case) -> tuple:
    s = case.shape
    return s["mask"], s["B"], s["H"], s["S"], s["D"]


def make_attention_inputs(case: Case) -> dict:
    kind, B, H, S, D = _dims(case)
    dev, dt = case.device, case.torch_dtype
    g = torch.Generator(device=dev).manual_seed(case.seed)
    grad = case.mode == "fwd+bwd"
    q, k, v = (torch.randn(B, H, S, D, generator=g, device=dev).to(dt).requires_grad_(grad) for _ in range(3))
    mask = build_mask(kind, B, S, dev)
    inputs = {"q": q, "k": k, "v": v, "ctx": AttnContext(kind, mask, dev)}
    if grad:
        dout = torch.randn(B, H, S, D, generator=g, device=dev)
        if mask is not None:  # rows that see nothing (padding): their output is ignored
            dout *= (visible_per_row(mask) > 0)[:, None, :, None].to(dout.dtype)
        inputs["dout"] = dout.to(dt)
    return inputs


def make_mask_inputs(case: Case) -> dict:
    kind, B, _H, S, _D = _dims(case)
    return {"ctx": AttnContext(kind, build_mask(kind, B, S, case.device), case.device)}


def _loss(out: torch.Tensor, dout: Optional[torch.Tensor]):
    if dout is None:
        return out
    return (out * dout).sum(dtype=torch.promote_types(out.dtype, torch.float32))


# --------------------------------------------------------------------------
# Providers: attention
# --------------------------------------------------------------------------


def attn_mmkernels(q, k, v, ctx, dout=None):
    import mmkernels

    return _loss(mmkernels.multimodal_attention(q, k, v, ctx.mask), dout)


def attn_reference(q, k, v, ctx, dout=None):
    from mmkernels.attention.reference import multimodal_attention_reference

    return _loss(multimodal_attention_reference(q, k, v, ctx.mask), dout)


def attn_sdpa_dense(q, k, v, ctx, dout=None):
    return _loss(F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.dense()), dout)


def attn_sdpa_flash(q, k, v, ctx, dout=None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return _loss(out, dout)


_FLEX: dict = {}
RECOMPILE_LIMIT = 64  # one process on CUDA runs every case: each shape (and each mask_mod) recompiles


def _allow_recompiles() -> None:
    """Dynamo's default limit (8 recompiles of one function) would silently send later cases to
    eager flex_attention; raise it so that every case is compiled."""
    import torch._dynamo.config as dcfg

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dcfg, name) and getattr(dcfg, name) < RECOMPILE_LIMIT:
            setattr(dcfg, name, RECOMPILE_LIMIT)


def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "fn" not in _FLEX:
        _allow_recompiles()
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def flex_block_mask(mask, compiled: bool):
    """``create_block_mask`` for ``mask`` (head-independent: ``H=None``), compiled or eager."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, sq, sk = mask.shape
    if compiled:
        _allow_recompiles()
    return create_block_mask(mask_mod_for(mask), b, None, sq, sk, device=mask.device, BLOCK_SIZE=FLEX_BLOCK,
                             _compile=compiled)


def attn_flex(q, k, v, ctx, dout=None, *, compiled=True):
    block = ctx.block_mask(compiled)
    if compiled:
        out = _flex_fn(True)(q, k, v, block_mask=block)
    else:
        with warnings.catch_warnings():  # "flex_attention called without torch.compile()" (the smoke profile)
            warnings.simplefilter("ignore")
            out = _flex_fn(False)(q, k, v, block_mask=block)
    return _loss(out, dout)


# --------------------------------------------------------------------------
# Providers: mask construction (attention_mask)
# --------------------------------------------------------------------------


def kernel_tile(device: str, dtype: torch.dtype, D: int) -> tuple:
    """(BLOCK_M, BLOCK_N) of mmkernels' forward kernel: the Triton heuristic on CUDA when
    importable (else DEFAULT_TILE); the C++ kernel's blocks on CPU."""
    if str(device).startswith("cuda"):
        try:
            from mmkernels.attention import kernels

            prec = "ieee" if dtype == torch.float32 else "tf32"
            cfg = kernels.heuristic_config("fwd", dtype, D, prec)
            return int(cfg.BLOCK_M), int(cfg.BLOCK_N)
        except Exception:
            pass
        return DEFAULT_TILE
    return CPU_TILE


def mask_mmkernels(ctx, tile=DEFAULT_TILE):
    return ctx.mask.tile_map(*tile)


def mask_flex(ctx, *, compiled=True):
    return flex_block_mask(ctx.mask, compiled).kv_num_blocks


def mask_dense(ctx):
    return ctx.mask.to_dense()


# --------------------------------------------------------------------------
# Availability checks and memory estimates
# --------------------------------------------------------------------------


def check_mmkernels(case: Case) -> Optional[str]:
    return missing("mmkernels", "multimodal_attention")


def check_flash(case: Case) -> Optional[str]:
    if case.shape["mask"] != "causal":
        return "SDPA's flash backend takes no mask: plain causal layouts only"
    return None


def check_flex(case: Case) -> Optional[str]:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception as exc:
        return f"torch.nn.attention.flex_attention not importable ({type(exc).__name__})"
    if case.mode == "fwd+bwd" and not case.device.startswith("cuda"):
        return "flex_attention backward is not implemented on CPU (NotImplementedError)"
    return None


def est_tiled(case: Case) -> int:
    """O(B*H*S*D): output, lse, gradients' fp32 scratch; plus the O(B*S) metadata."""
    _k, B, H, S, D = _dims(case)
    return 8 * B * H * S * D * 4 + 64 * B * S


def est_dense_mask(case: Case) -> int:
    """``to_dense`` builds several [B, S, S] byte/bool temporaries."""
    _k, B, _H, S, _D = _dims(case)
    return 8 * B * S * S


def est_reference(case: Case) -> int:
    """fp32 scores, masked scores, exp, probabilities [B, H, S, S] (x2 with backward), the dense mask."""
    _k, B, H, S, _D = _dims(case)
    n = 4 if case.mode == "fwd" else 8
    return n * B * H * S * S * 4 + est_dense_mask(case) + est_tiled(case)


def est_sdpa_dense(case: Case) -> int:
    """CUDA: the efficient backend with the mask converted to an additive [B, 1, S, S] bias; CPU: the
    math path's [B, H, S, S] scores (x2 with backward)."""
    _k, B, H, S, _D = _dims(case)
    if case.device.startswith("cuda"):
        return 4 * B * S * S * elem_size(case) + est_tiled(case)
    n = 3 if case.mode == "fwd" else 6
    return n * B * H * S * S * 4 + est_tiled(case)


def est_flex(case: Case) -> int:
    _k, B, _H, S, _D = _dims(case)
    nb = math.ceil(S / FLEX_BLOCK)
    return est_tiled(case) + 16 * B * nb * nb * 4


# --------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------


def attention_providers(profile: str) -> tuple:
    compiled = profile != "pytest"
    flex_note = (
        "torch.compile(flex_attention) with a prebuilt BlockMask (create_block_mask, BLOCK_SIZE 128, from a "
        "mask_mod reading the MultimodalMask metadata; build time in attention_mask)"
        if compiled
        else "flex_attention eager (no torch.compile: pytest smoke profile), prebuilt BlockMask"
    )
    return (
        Provider("mmkernels", attn_mmkernels, check=check_mmkernels, mem_estimate=est_tiled,
                 note="mmkernels.multimodal_attention(q, k, v, mask)"),
        Provider("sdpa_dense", attn_sdpa_dense, mem_estimate=est_sdpa_dense,
                 note="F.scaled_dot_product_attention with attn_mask = mask.to_dense() (bool [B, 1, S, S], built "
                      "before the timed calls; None for full attention)"),
        Provider("sdpa_flash", attn_sdpa_flash, check=check_flash, mem_estimate=est_tiled,
                 note="F.scaled_dot_product_attention(is_causal=True) under sdpa_kernel(SDPBackend.FLASH_ATTENTION)"),
        Provider("flex", functools.partial(attn_flex, compiled=compiled), check=check_flex, mem_estimate=est_flex,
                 note=flex_note),
        Provider("reference", attn_reference, mem_estimate=est_reference,
                 note="mmkernels.attention.reference.multimodal_attention_reference (eager, fp32 scores [B, H, S, S])"),
    )


def mask_providers(profile: str, tile: tuple) -> tuple:
    compiled = profile != "pytest"
    return (
        Provider("mmkernels", functools.partial(mask_mmkernels, tile=tile), mem_estimate=est_dense_mask,
                 note=f"mask.tile_map({tile[0]}, {tile[1]}): the tile classes the kernel reads (its block size)"),
        Provider("flex", functools.partial(mask_flex, compiled=compiled), check=check_flex,
                 mem_estimate=est_dense_mask,
                 note=f"create_block_mask(mask_mod, B, None, S, S, BLOCK_SIZE={FLEX_BLOCK}, _compile={compiled})"),
        Provider("dense", mask_dense, mem_estimate=est_dense_mask,
                 note="mask.to_dense(): the bool [B, 1, S, S] mask SDPA needs"),
    )


def attention_case(kind: str, B: int, H: int, S: int, D: int, dtype: str, device: str, mode: str,
                   profile: str = "full") -> Case:
    vis = visible_pairs(kind, B, S)
    fwd = 4.0 * vis * D * H
    return Case(
        family=FAMILY,
        op=OP_FWD if mode == "fwd" else OP_BWD,
        shape={"mask": kind, "B": B, "H": H, "S": S, "D": D},
        dtype=dtype,
        device=device,
        make_inputs=make_attention_inputs,
        providers=attention_providers(profile),
        mode=mode,
        flops=fwd if mode == "fwd" else BWD_FLOP_FACTOR * fwd,
        flops_formula="4*visible*D*H" if mode == "fwd" else "2.5*4*visible*D*H",
        x="S",
        note=f"visible pairs {vis} ({100.0 * vis / (B * S * S):.1f}% of B*S^2)",
    )


def mask_case(kind: str, B: int, H: int, S: int, D: int, dtype: str, device: str, profile: str = "full") -> Case:
    tile = kernel_tile(device, torch.bfloat16 if dtype == "bfloat16" else torch.float32, D)
    return Case(
        family=FAMILY,
        op=OP_MASK,
        shape={"mask": kind, "B": B, "H": H, "S": S, "D": D},
        dtype=dtype,
        device=device,
        make_inputs=make_mask_inputs,
        providers=mask_providers(profile, tile),
        mode="fwd",
        x="S",
    )


def _table(device: str, profile: str) -> list:
    if profile == "pytest":
        return list(PYTEST_CASES)
    table = GPU_CASES if device.startswith("cuda") else CPU_CASES
    return list(table.get(profile, table["full"]))


def cases(device: str, profile: str, overrides: Optional[dict] = None) -> list:
    """``overrides["S"]`` replaces the sequence lengths of the plain causal cases (the model layouts
    keep their shapes)."""
    overrides = overrides or {}
    gpu = device.startswith("cuda")
    dtype = "bfloat16" if gpu else "float32"
    rows = _table(device, profile)
    if overrides.get("S"):
        causal = [r for r in rows if r[0] == "causal"] or [("causal", 1, 8, 0, 64)]
        _k, B, H, _S, D = causal[0]
        rows = [r for r in rows if r[0] != "causal"] + [("causal", B, H, S, D) for S in overrides["S"]]
    out = []
    for mode in ("fwd", "fwd+bwd"):
        for kind, B, H, S, D in rows:
            out.append(attention_case(kind, B, H, S, D, dtype, device, mode, profile))
    for kind, B, H, S, D in rows:
        if kind != "full":
            out.append(mask_case(kind, B, H, S, D, dtype, device, profile))
    # the torch.mm peak rate (GPU: 8192^3, for "% mm"); none on CPU
    return mm.probes_for(device, profile, [], dtype) + out


def notes(device: str, profile: str) -> list:
    gpu = device.startswith("cuda")
    rows = _table(device, profile)
    dens = []
    for kind, B, _H, S, _D in rows:
        dens.append(f"{kind} S={S}: {100.0 * visible_pairs(kind, B, S) / (B * S * S):.1f}%")
    lines = [
        "attention: q, k, v [B, H, S, D] random normal, self-attention (Sq = Sk = S, Hq = Hkv = H); attention_fwd is "
        "one forward under no_grad, attention_fwd_bwd is forward + backward of sum(out * dout) with gradients for "
        "q, k, v (dout zero on rows that see no key). Dense and block masks are built by each provider's untimed "
        "first call; attention_mask times building them (mmkernels tile map vs FlexAttention create_block_mask vs "
        "dense): mmkernels there / mmkernels in attention_fwd = the metadata cost as a share of the forward.",
        "attention: FLOPs count visible work only: forward 4*visible*D*H (QK^T and PV over visible pairs, summed "
        "over the batch), forward + backward 2.5x that. Visible share of B*S^2: " + "; ".join(dens) + ".",
        "attention: mask layouts: blip2_itg:NQ+T (BLIP-2 Q-Former ITG), instructblip:NQ+T, beit3_cap:NI+T (text "
        "lengths drawn in [T/2, T], seed 0, rest padding), llava:NI (NI bidirectional image tokens then causal "
        "text), packed:LO-HI (documents of LO..HI tokens, seed 0, causal), full (EVA ViT-g/14, head dim 88, "
        "no mask), causal.",
    ]
    if gpu:
        lines.append("attention: GPU run in bf16; flex is torch.compile(flex_attention) (dynamic=False) with a "
                     "prebuilt BlockMask; sdpa_flash only on plain causal.")
    else:
        lines.append("attention: CPU run in fp32 at small sizes (S <= 1024; the GPU cases are GPU-only); target: "
                     "mmkernels no slower than sdpa_dense at S = 1024 and extra memory growing with S, not S^2; "
                     "flex forward only (its backward raises NotImplementedError on CPU). The C++ kernel "
                     f"classifies its {CPU_TILE[0]}x{CPU_TILE[1]} tiles itself inside the forward; attention_mask's "
                     "mmkernels row is mask.tile_map at those blocks (the same classification, in PyTorch ops).")
    return lines
