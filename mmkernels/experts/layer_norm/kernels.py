"""Triton kernels of the per-modality LayerNorm (contract: ``ops.py``).

``y[t] = (x[t] - mean[t]) * rstd[t] * weight[e] + bias[e]`` for token ``t`` of expert ``e``,
statistics in fp32 over the whole row (``H`` up to ``MAX_NORM_H``); rows are read and written
through ``perm``, nothing is read on the host (CUDA-graph safe), and ``dw``/``db`` are summed in a
fixed order (deterministic, no atomics).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..._triton import PTR, interpreting
from ..grouped_mm.kernels.jit_mm import round_bf16
from ..routing_kernels import align_of, check_launch, empty_of, is_aligned

MAX_NORM_H = 16384  # widest row a program holds in registers
# backward chunks aimed at: about two waves of two programs per SM on an sm_90 GPU, so the grid
# fills it at the token counts of VLMo/BEiT-3 training, with a partial buffer of about that many
# rows whatever E
BWD_PROGRAMS = 512
# fewest slots a backward chunk walks: its partial row (written and read once) stays small beside
# the rows it reads
BWD_MIN_ROWS = 16
RED_ROWS, RED_COLS, RED_WARPS = 32, 128, 4  # partial-sum reduction tile


class NormConfig(NamedTuple):
    """Launch shape for width H (``norm_config``); the compile tier compiles exactly these."""
    BLOCK_H: int  # next power of two >= H: the whole row in registers (forward)
    fwd_rows: int  # rows of the forward tile (slots per forward program)
    fwd_warps: int
    bwd_split: int  # backward programs per chunk, one per BLOCK_H / bwd_split columns
    bwd_rows: int  # rows of the backward tile (a program walks its chunk in such steps)
    bwd_warps: int

    @property
    def BLOCK_P(self) -> int:
        """Columns of one backward program."""
        return self.BLOCK_H // self.bwd_split


def norm_config(H: int, aligned: bool = True) -> NormConfig:
    """Tiles and warps for rows of width ``H`` (1 .. MAX_NORM_H), chosen from the sm_90a
    compile (tests/experts/test_layer_norm_sm90.py) at aligned and odd widths. ``aligned``: the
    rows are 16-byte aligned (vector loads; ``routing_kernels.is_aligned``), which only the
    backward of rows wider than 4096 looks at.

    Forward: tiles of about 4096 elements, about 16 a thread (32 at BLOCK_H = 16384). Backward,
    which also keeps the fp32 dw and db sums of its columns across the rows it walks: tiles of
    about 2048 elements and 8 a thread (16 a thread spills at wide odd widths). Rows wider than
    4096 are cut into ``bwd_split`` column parts, one program each, which read the whole row
    for dx's two row sums (the parts of a row are read together, the repeats from L2) and keep
    only their part's sums, with 16 warps: parts of 4096, of 2048 for rows without 16-byte
    alignment (scalar loads need an address each, and parts of 4096 spill).
    """
    H = int(H)
    if not 1 <= H <= MAX_NORM_H:
        raise ValueError(f"the triton layer norm takes widths 1..{MAX_NORM_H}, got {H}")
    block_h = max(16, triton.next_power_of_2(H))
    fwd_rows = max(1, min(16, 4096 // block_h))
    fwd_warps = max(4, min(16, fwd_rows * block_h // 512))
    block_p = block_h if block_h <= 4096 else (4096 if aligned else 2048)
    bwd_rows = max(1, min(16, 2048 // block_p))
    # 8 elements a thread; 16 warps for column parts (at 8 warps, odd widths need too many
    # registers: the unrolled row-sum walk keeps several parts' loads in flight)
    bwd_warps = 16 if block_p < block_h else max(4, min(16, bwd_rows * block_p // 256))
    return NormConfig(block_h, fwd_rows, fwd_warps, block_h // block_p, bwd_rows, bwd_warps)


def bwd_rows_per_program(T: int, bwd_rows: int) -> int:
    """Slots of one backward chunk: ``cdiv(T, BWD_PROGRAMS)`` rounded up to whole tiles, at
    least ``BWD_MIN_ROWS`` (and one tile)."""
    r = max(BWD_MIN_ROWS, triton.cdiv(max(T, 1), BWD_PROGRAMS))
    return triton.cdiv(r, bwd_rows) * bwd_rows


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


@triton.jit
def _chunk(offsets_ptr, j, R, E: tl.constexpr):
    """``(e, lo, hi)`` of chunk ``j``: expert ``e``'s slots ``lo .. hi-1``, chunks of ``R``
    slots of every expert numbered one after the other; ``lo == hi`` when ``j`` is past the
    last chunk."""
    expert = 0
    lo = 0
    hi = 0
    before = 0
    start = tl.load(offsets_ptr)
    for e in tl.static_range(E):
        end = tl.load(offsets_ptr + e + 1)
        n = tl.cdiv(end - start, R)
        hit = (j >= before) & (j < before + n)
        first = start + (j - before) * R
        expert = tl.where(hit, e, expert)
        lo = tl.where(hit, first, lo)
        hi = tl.where(hit, tl.minimum(first + R, end), hi)
        before += n
        start = end
    return expert, lo, hi


@triton.jit
def _store(ptrs, v, mask, ROUND: tl.constexpr):
    """Store fp32 ``v`` in the pointers' dtype (rounded to nearest even for bf16 when ``ROUND``)."""
    if ROUND:
        if ptrs.dtype.element_ty == tl.bfloat16:
            v = round_bf16(v)
    tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _ln_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, perm_ptr, offsets_ptr,
                   H, stride_xm, stride_ym, stride_we, stride_be, eps,
                   E: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND: tl.constexpr,
                   ALIGN: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr):
    """Program ``j``: chunk ``j`` (``ROWS`` slots of one expert) -> y, mean, rstd of its tokens.

    Each expert's slots are cut into chunks numbered one after the other (as the grouped GEMM
    numbers its row tiles), so a program sees one expert; it holds whole rows in registers.
    ``H`` and the row strides arrive divided by ``ALIGN``."""
    e, lo, hi = _chunk(offsets_ptr, tl.program_id(0), ROWS, E)
    if lo >= hi:
        return
    H = H * ALIGN
    slots = lo + tl.arange(0, ROWS)
    row_ok = slots < hi
    tok = tl.load(perm_ptr + slots, mask=row_ok, other=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < H
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + tok[:, None] * (stride_xm * ALIGN) + cols[None, :], mask=ok,
                other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / H
    xc = tl.where(col_ok[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / H + eps)
    e64 = e.to(tl.int64)
    w = tl.load(w_ptr + e64 * (stride_we * ALIGN) + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        b = tl.load(b_ptr + e64 * (stride_be * ALIGN) + cols, mask=col_ok, other=0.0).to(tl.float32)
        y += b[None, :]
    _store(y_ptr + tok[:, None] * (stride_ym * ALIGN) + cols[None, :], y, ok, ROUND)
    tl.store(mean_ptr + tok, mean, mask=row_ok)
    tl.store(rstd_ptr + tok, rstd, mask=row_ok)


@triton.jit
def _bwd_rows(dy_ptr, x_ptr, tok, row_ok, mean, rstd, cols, H, stride_dym, stride_xm):
    """``(xhat, dy, mask)`` of the rows ``tok`` at columns ``cols``, fp32 (zeros where masked)."""
    ok = row_ok[:, None] & (cols < H)[None, :]
    x = tl.load(x_ptr + tok[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + tok[:, None] * stride_dym + cols[None, :], mask=ok,
                 other=0.0).to(tl.float32)
    xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
    return xhat, dy, ok


@triton.jit
def _ln_bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, part_ptr, perm_ptr,
                   offsets_ptr, H, R, dw_mask, stride_dym, stride_xm, stride_we, stride_dxm,
                   E: tl.constexpr, NEEDS_DX: tl.constexpr, HAS_DW: tl.constexpr,
                   HAS_DB: tl.constexpr, ROUND: tl.constexpr, ALIGN: tl.constexpr,
                   BLOCK_P: tl.constexpr, SPLIT: tl.constexpr, ROWS: tl.constexpr):
    """Program ``(j, p)``: chunk ``j`` (``R`` slots of one expert, walked ``ROWS`` at a time),
    columns ``p * BLOCK_P ..`` (row part ``p`` of ``SPLIT``) -> those columns of its dx rows
    (``NEEDS_DX``) and, with ``HAS_DW``, of partial row ``j`` of ``sum dy * xhat`` (and of
    ``sum dy``, ``HAS_DB``) in ``part [chunks, 1 + HAS_DB, H]`` fp32. With ``SPLIT > 1`` the
    row sums of dx walk all the row's parts first (the SPLIT programs of a chunk read the same
    rows, from L2 after the first). ``dw_mask`` bit ``e``: expert ``e``'s weight gradient is
    wanted (without ``NEEDS_DX`` the others return at once; the reduction writes their zeros).
    ``H`` and the row strides arrive divided by ``ALIGN``. ``_ln_dw_reduce_kernel`` then sums
    the partial rows per expert in chunk order."""
    j = tl.program_id(0)
    e, lo, hi = _chunk(offsets_ptr, j, R, E)
    if lo >= hi:
        return
    if not NEEDS_DX:
        if ((dw_mask >> e) & 1) == 0:
            return
    H = H * ALIGN
    stride_dym = tl.cast(stride_dym, tl.int64) * ALIGN
    stride_xm = tl.cast(stride_xm, tl.int64) * ALIGN
    stride_dxm = tl.cast(stride_dxm, tl.int64) * ALIGN
    cols = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    col_ok = cols < H
    w_row = w_ptr + e.to(tl.int64) * (stride_we * ALIGN)
    w = tl.load(w_row + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([ROWS, BLOCK_P], tl.float32)
    db_acc = tl.zeros([ROWS, BLOCK_P], tl.float32)
    for s0 in range(lo, hi, ROWS):
        slots = s0 + tl.arange(0, ROWS)
        row_ok = slots < hi
        tok = tl.load(perm_ptr + slots, mask=row_ok, other=0).to(tl.int64)
        mean = tl.load(mean_ptr + tok, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + tok, mask=row_ok, other=0.0)
        if NEEDS_DX and SPLIT > 1:
            # dx's row sums over every part of the rows, before this part's tiles are live
            c1 = tl.zeros([ROWS], tl.float32)
            c2 = tl.zeros([ROWS], tl.float32)
            for q in tl.static_range(SPLIT):
                cq = q * BLOCK_P + tl.arange(0, BLOCK_P)
                xq, dq, _ = _bwd_rows(dy_ptr, x_ptr, tok, row_ok, mean, rstd, cq, H,
                                      stride_dym, stride_xm)
                gq = dq * tl.load(w_row + cq, mask=cq < H, other=0.0).to(tl.float32)[None, :]
                c1 += tl.sum(gq, 1)
                c2 += tl.sum(gq * xq, 1)
        xhat, dy, ok = _bwd_rows(dy_ptr, x_ptr, tok, row_ok, mean, rstd, cols, H, stride_dym,
                                 stride_xm)
        if NEEDS_DX:
            g = dy * w[None, :]
            if SPLIT == 1:
                c1 = tl.sum(g, 1)
                c2 = tl.sum(g * xhat, 1)
            dx = (g - c1[:, None] / H - xhat * (c2 / H)[:, None]) * rstd[:, None]
            _store(dx_ptr + tok[:, None] * stride_dxm + cols[None, :], dx, ok, ROUND)
        if HAS_DW:
            dw_acc += dy * xhat
            if HAS_DB:
                db_acc += dy
    if HAS_DW:
        NB: tl.constexpr = 2 if HAS_DB else 1
        prow = part_ptr + j.to(tl.int64) * (NB * H) + cols
        tl.store(prow, tl.sum(dw_acc, 0), mask=col_ok)
        if HAS_DB:
            tl.store(prow + H, tl.sum(db_acc, 0), mask=col_ok)


@triton.jit
def _ln_dw_reduce_kernel(part_ptr, dw_ptr, db_ptr, offsets_ptr, H, R, dw_mask,
                         E: tl.constexpr, HAS_DB: tl.constexpr, ROUND: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program ``(e, c)``: ``dw[e, cols] = sum`` of expert ``e``'s partial rows (its chunks, in
    order), ``db`` likewise; zeros when bit ``e`` of ``dw_mask`` is off or ``e`` has no tokens.
    ``dw [E, H]`` and ``db [E, H]`` are contiguous."""
    e = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < H
    first = 0
    count = 0
    start = tl.load(offsets_ptr)
    for k in tl.static_range(E):
        end = tl.load(offsets_ptr + k + 1)
        n = tl.cdiv(end - start, R)
        first += tl.where(k < e, n, 0)
        count = tl.where(k == e, n, count)
        start = end
    count = tl.where(((dw_mask >> e) & 1) == 1, count, 0)
    NB: tl.constexpr = 2 if HAS_DB else 1
    dw_acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    db_acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for r0 in range(first, first + count, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = (rows < first + count)[:, None] & col_ok[None, :]
        ptrs = part_ptr + rows.to(tl.int64)[:, None] * (NB * H) + cols[None, :]
        dw_acc += tl.load(ptrs, mask=ok, other=0.0)
        if HAS_DB:
            db_acc += tl.load(ptrs + H, mask=ok, other=0.0)
    out = e.to(tl.int64) * H + cols
    _store(dw_ptr + out, tl.sum(dw_acc, 0), col_ok, ROUND)
    if HAS_DB:
        _store(db_ptr + out, tl.sum(db_acc, 0), col_ok, ROUND)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along its last dimension (any row stride)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _row_stride(t: torch.Tensor) -> int:
    """Row stride of a 2-D ``t`` with unit last stride (0 for a single row: nothing to align)."""
    return t.stride(0) if t.shape[0] > 1 else 0


def _param(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None else _rows(p)


def layer_norm_fwd_triton(x, perm, offsets, weight, bias, eps):
    """``(y [T, H] in x's dtype, token order; mean [T], rstd [T] float32)``.

    ``x [T, H]`` float32/bfloat16/float16, any row stride; ``weight``/``bias`` ``[E, H]``
    (bias may be None) in any float dtype and strides.
    """
    E = check_launch(x, offsets)
    T, H = x.shape
    cfg = norm_config(H)
    dev = x.device
    y = torch.empty((T, H), dtype=x.dtype, device=dev)
    mean = torch.empty(T, dtype=torch.float32, device=dev)
    rstd = torch.empty(T, dtype=torch.float32, device=dev)
    if T == 0:
        return y, mean, rstd
    x, weight, bias = _rows(x), _param(weight), _param(bias)
    has_bias = bias is not None
    sx, sw = _row_stride(x), _row_stride(weight)
    sb = _row_stride(bias) if has_bias else 0
    al = align_of(H, sx, H, sw, sb)
    grid = (triton.cdiv(T, cfg.fwd_rows) + E - 1,)
    _ln_fwd_kernel[grid](x, weight, bias if has_bias else weight, y, mean, rstd, perm, offsets,
                         H // al, sx // al, H // al, sw // al, sb // al, float(eps),
                         E=E, HAS_BIAS=has_bias, ROUND=interpreting(), ALIGN=al,
                         BLOCK_H=cfg.BLOCK_H, ROWS=cfg.fwd_rows, num_warps=cfg.fwd_warps,
                         num_stages=1)
    return y, mean, rstd


def layer_norm_bwd_triton(dy, x, perm, offsets, weight, bias, mean, rstd, needs_dx, dw_experts):
    """``(dx [T, H] in x's dtype | empty(0), dw [E, H] in weight's dtype | empty(0),
    db [E, H] in bias's dtype | empty(0))``.

    ``dw_experts``: E bools, the experts whose weight (and bias) gradient is wanted (zero
    slices for the others and for experts with no tokens); ``dw`` and ``db`` are empty when
    none is, ``db`` also without a bias. ``mean``/``rstd``: the forward's float32 ``[T]``.
    """
    E = check_launch(x, offsets)
    T, H = x.shape
    norm_config(H)  # the width check, before any allocation
    flags = [bool(f) for f in dw_experts]
    if len(flags) != E:
        raise ValueError(f"dw_experts has {len(flags)} flags for {E} experts")
    has_dw = any(flags)
    has_db = has_dw and bias is not None
    dev = x.device
    dx = torch.empty((T, H), dtype=x.dtype, device=dev) if needs_dx else empty_of(x)
    dw = torch.empty((E, H), dtype=weight.dtype, device=dev) if has_dw else empty_of(weight)
    db = torch.empty((E, H), dtype=bias.dtype, device=dev) if has_db else empty_of(weight)
    if T == 0 or not (needs_dx or has_dw):
        dw.zero_()
        db.zero_()
        return dx, dw, db
    dy, x, weight = _rows(dy), _rows(x), _param(weight)
    mask = sum(1 << e for e, f in enumerate(flags) if f)
    nb = 2 if has_db else 1
    sdy, sx, sw = _row_stride(dy), _row_stride(x), _row_stride(weight)
    sdx = _row_stride(dx) if needs_dx else 0
    al = align_of(H, sdy, sx, sw, sdx)
    cfg = norm_config(H, is_aligned(x.dtype, al))
    R = bwd_rows_per_program(T, cfg.bwd_rows)
    chunks = triton.cdiv(T, R) + E - 1
    part = (torch.empty((chunks, nb, H), dtype=torch.float32, device=dev) if has_dw
            else torch.empty(0, dtype=torch.float32, device=dev))
    round_ = interpreting()
    _ln_bwd_kernel[(chunks, cfg.bwd_split)](
        dy, x, weight, mean, rstd, dx if needs_dx else dy, part if has_dw else mean, perm, offsets,
        H // al, R, mask, sdy // al, sx // al, sw // al, sdx // al,
        E=E, NEEDS_DX=bool(needs_dx), HAS_DW=has_dw, HAS_DB=has_db, ROUND=round_, ALIGN=al,
        BLOCK_P=cfg.BLOCK_P, SPLIT=cfg.bwd_split, ROWS=cfg.bwd_rows, num_warps=cfg.bwd_warps,
        num_stages=1)
    if has_dw:
        _ln_dw_reduce_kernel[(E, triton.cdiv(H, RED_COLS))](
            part, dw, db if has_db else dw, offsets, H, R, mask, E=E, HAS_DB=has_db, ROUND=round_,
            BLOCK_R=RED_ROWS, BLOCK_C=RED_COLS, num_warps=RED_WARPS, num_stages=1)
    return dx, dw, db


# ---------------------------------------------------------------------------
# Compile tier support: the exact specialisation a launch would produce
# ---------------------------------------------------------------------------

NORM_KINDS = ("ln_fwd", "ln_bwd", "ln_dw_reduce")


def norm_compile_specs(kind: str, dtype: torch.dtype, H: int, has_bias: bool = True, E: int = 8,
                       T: int = 16384, needs_dx: bool = True, has_dw: bool = True,
                       param_dtype: torch.dtype | None = None):
    """``(kernel, signature, constexprs, divisible_by_16, num_warps, num_stages)`` of launch
    ``kind`` for contiguous ``x``/``dy [T, H]`` of ``dtype`` and parameters ``[E, H]`` of
    ``param_dtype`` (default ``dtype``), every expert's gradient wanted, as Triton would
    specialise it (see ``mmkernels.testing.sm90.launch_signature``); tiles and warps from
    ``norm_config``, exactly as the launchers pick them."""
    from ...testing.sm90 import launch_signature
    ptr = PTR[dtype]
    pptr = PTR[param_dtype or dtype]
    cfg = norm_config(H, is_aligned(dtype, align_of(H)))
    mask = (1 << E) - 1
    if kind == "ln_fwd":
        al = align_of(H)
        sig = {"x_ptr": ptr, "w_ptr": pptr, "b_ptr": pptr, "y_ptr": ptr, "mean_ptr": "*fp32",
               "rstd_ptr": "*fp32", "perm_ptr": "*i32", "offsets_ptr": "*i32"}
        ints = {"H": H // al, "stride_xm": H // al, "stride_ym": H // al, "stride_we": H // al,
                "stride_be": H // al if has_bias else 0}
        constexprs = {"E": E, "HAS_BIAS": bool(has_bias), "ROUND": False, "ALIGN": al,
                      "BLOCK_H": cfg.BLOCK_H, "ROWS": cfg.fwd_rows}
        return (_ln_fwd_kernel, *launch_signature(sig, ints, constexprs, floats=("eps",)),
                cfg.fwd_warps, 1)
    if kind == "ln_bwd":
        al = align_of(H)
        has_db = has_bias and has_dw
        sig = {"dy_ptr": ptr, "x_ptr": ptr, "w_ptr": pptr, "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
               "dx_ptr": ptr, "part_ptr": "*fp32", "perm_ptr": "*i32",
               "offsets_ptr": "*i32"}
        ints = {"H": H // al, "R": bwd_rows_per_program(T, cfg.bwd_rows), "dw_mask": mask,
                "stride_dym": H // al, "stride_xm": H // al, "stride_we": H // al,
                "stride_dxm": H // al if needs_dx else 0}
        constexprs = {"E": E, "NEEDS_DX": bool(needs_dx), "HAS_DW": bool(has_dw),
                      "HAS_DB": bool(has_db), "ROUND": False, "ALIGN": al,
                      "BLOCK_P": cfg.BLOCK_P, "SPLIT": cfg.bwd_split, "ROWS": cfg.bwd_rows}
        return (_ln_bwd_kernel, *launch_signature(sig, ints, constexprs), cfg.bwd_warps, 1)
    if kind == "ln_dw_reduce":
        sig = {"part_ptr": "*fp32", "dw_ptr": pptr, "db_ptr": pptr, "offsets_ptr": "*i32"}
        ints = {"H": H, "R": bwd_rows_per_program(T, cfg.bwd_rows), "dw_mask": mask}
        constexprs = {"E": E, "HAS_DB": bool(has_bias), "ROUND": False, "BLOCK_R": RED_ROWS,
                      "BLOCK_C": RED_COLS}
        return (_ln_dw_reduce_kernel, *launch_signature(sig, ints, constexprs), RED_WARPS, 1)
    raise ValueError(f"unknown layer norm kernel kind {kind!r}")
