"""The tile map of a :class:`MultimodalMask` in one Triton launch: :func:`tile_map_triton` gives
the int8 ``[B, ceil(Sq/block_m), ceil(Sk/block_n)]`` map of :meth:`MultimodalMask.tile_map`, from
the same summaries with the same conservative rules.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import check_device
from .mask import BLOCKED, CAUSAL, FULL, SPAN, TILE_EMPTY, TILE_FULL, TILE_PARTIAL

MAX_MODALITIES = 31  # modality sets are int32 bit masks
TN_CHUNK = 16        # key tiles per program

_I32_MAX = tl.constexpr(2147483647)  # kernels may only read constexpr globals
_I32_MIN = tl.constexpr(-2147483648)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _summary(mod_ptrs, seg_ptrs, pos_ptrs, run_ptrs, ok, AXIS: tl.constexpr):
    """Min/max of segment, valid segment (>= 0), position and run ids, and the modalities present
    (an int32 bit mask), reduced along ``AXIS``; rows where ``ok`` is false are neutral."""
    seg = tl.load(seg_ptrs, mask=ok, other=0)
    pos = tl.load(pos_ptrs, mask=ok, other=0)
    run = tl.load(run_ptrs, mask=ok, other=0)
    mod = tl.load(mod_ptrs, mask=ok, other=0)
    valid = ok & (seg >= 0)
    return (tl.min(tl.where(ok, seg, _I32_MAX), AXIS), tl.max(tl.where(ok, seg, _I32_MIN), AXIS),
            tl.min(tl.where(valid, seg, _I32_MAX), AXIS), tl.max(tl.where(valid, seg, -1), AXIS),
            tl.min(tl.where(ok, pos, _I32_MAX), AXIS), tl.max(tl.where(ok, pos, _I32_MIN), AXIS),
            tl.min(tl.where(ok, run, _I32_MAX), AXIS), tl.max(tl.where(ok, run, _I32_MIN), AXIS),
            tl.reduce(tl.where(ok, 1 << mod, 0), AXIS, _or))


@triton.jit(do_not_specialize=["Sq", "Sk", "n_tn"])
def _tile_map_kernel(
    out_ptr, qmod_ptr, kmod_ptr, qseg_ptr, kseg_ptr, qpos_ptr, kpos_ptr, qrun_ptr, krun_ptr,
    rules_ptr, Sq, Sk, n_tn,
    stride_qb, stride_kb, stride_ob, stride_om,
    NM: tl.constexpr,  # the rule table's size: the loops below unroll
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TN: tl.constexpr,
    R_BLOCKED: tl.constexpr, R_FULL: tl.constexpr, R_CAUSAL: tl.constexpr, R_SPAN: tl.constexpr,
    T_EMPTY: tl.constexpr, T_FULL: tl.constexpr, T_PARTIAL: tl.constexpr,
):
    """Program ``(tm, chunk, b)`` summarises query tile ``tm`` of sample ``b`` (min/max of segment,
    valid segment, position and run ids; the set of modalities present as a bit mask) and then
    ``TN`` key tiles at once (a ``[TN, BLOCK_N]`` block of key metadata reduced along its rows).
    Which rules occur among a tile pair's modality pairs comes from bit masks: for each rule
    ``r``, the key modalities that some present query modality reaches with ``r``. Rows past the
    end of the sequence are neutral (they change no minimum, maximum or presence).
    """
    tm = tl.program_id(0)
    chunk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    # ---- query tile summary (scalars)
    rows = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < Sq
    qo = b * stride_qb + rows
    (q_seg_min, q_seg_max, q_vseg_min, q_vseg_max, q_pos_min, q_pos_max, q_run_min, q_run_max,
     q_bits) = _summary(qmod_ptr + qo, qseg_ptr + qo, qpos_ptr + qo, qrun_ptr + qo, r_ok, 0)

    # ---- for each rule kind, the key modalities reached from a present query modality
    reach_blocked = q_bits * 0
    reach_full = q_bits * 0
    reach_causal = q_bits * 0
    reach_span = q_bits * 0
    for mq in tl.static_range(NM):
        on = (q_bits >> mq) & 1
        for mk in tl.static_range(NM):
            rule = tl.load(rules_ptr + mq * NM + mk).to(tl.int32)
            bit = on << mk
            reach_blocked |= tl.where(rule == R_BLOCKED, bit, 0)
            reach_full |= tl.where(rule == R_FULL, bit, 0)
            reach_causal |= tl.where(rule == R_CAUSAL, bit, 0)
            reach_span |= tl.where(rule == R_SPAN, bit, 0)

    # ---- TN key tiles at once: [TN, BLOCK_N] metadata reduced along axis 1
    tn = chunk * TN + tl.arange(0, TN)
    cols = tn[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    c_ok = cols < Sk
    ko = b * stride_kb + cols
    (k_seg_min, k_seg_max, k_vseg_min, k_vseg_max, k_pos_min, k_pos_max, k_run_min, k_run_max,
     k_bits) = _summary(kmod_ptr + ko, kseg_ptr + ko, kpos_ptr + ko, krun_ptr + ko, c_ok, 1)

    # ---- the classification of MultimodalMask.tile_map
    seg_none = (q_vseg_max < k_vseg_min) | (k_vseg_max < q_vseg_min)
    seg_all = (q_seg_min == q_seg_max) & (k_seg_min == k_seg_max) & (q_seg_min == k_seg_min) & (q_seg_min >= 0)
    causal_all = k_pos_max <= q_pos_min
    causal_none = k_pos_min > q_pos_max
    run_all = (q_run_min == q_run_max) & (k_run_min == k_run_max) & (q_run_min == k_run_min)
    run_none = (q_run_max < k_run_min) | (k_run_max < q_run_min)
    has_blocked = (reach_blocked & k_bits) != 0
    has_full = (reach_full & k_bits) != 0
    has_causal = (reach_causal & k_bits) != 0
    has_span = (reach_span & k_bits) != 0
    span_none = causal_none & run_none
    span_all = causal_all | run_all
    empty = seg_none | ((~has_full) & ((~has_causal) | causal_none) & ((~has_span) | span_none))
    full = seg_all & (~has_blocked) & ((~has_causal) | causal_all) & ((~has_span) | span_all)
    kind = tl.where(empty, T_EMPTY, tl.where(full, T_FULL, T_PARTIAL)).to(tl.int8)
    tl.store(out_ptr + b * stride_ob + tm.to(tl.int64) * stride_om + tn, kind, mask=tn < n_tn)


def _tn_chunk(block_n: int, n_tn: int) -> int:
    """Key tiles per program: TN_CHUNK, fewer for wide tiles (at most 4096 keys) or short rows."""
    return max(1, min(TN_CHUNK, 4096 // block_n, triton.next_power_of_2(n_tn)))


def tile_map_triton(meta: list[torch.Tensor], block_m: int, block_n: int) -> torch.Tensor:
    """int8 ``[B, ceil(Sq/block_m), ceil(Sk/block_n)]``: :meth:`MultimodalMask.tile_map` in one launch.

    ``meta`` is :meth:`MultimodalMask.metadata` (``[B, S]`` int32 fields, contiguous rows, and
    the int8 ``[NM, NM]`` rules), on a CUDA device (or CPU tensors under ``TRITON_INTERPRET=1``).
    ``block_m``/``block_n`` must be powers of two. No host synchronisation. The torch version of
    the map takes many small launches, whose host time can exceed the attention kernel's.
    """
    q_mod, k_mod, q_seg, k_seg, q_pos, k_pos, q_run, k_run, rules = meta
    check_device(q_mod)
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk < 1 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two, got {blk}")
    nm = rules.shape[0]
    if nm > MAX_MODALITIES:
        raise ValueError(f"tile_map_triton supports at most {MAX_MODALITIES} modalities, got {nm}")
    b, sq = q_mod.shape
    sk = k_mod.shape[1]
    n_tm, n_tn = triton.cdiv(sq, block_m), triton.cdiv(sk, block_n)
    out = torch.empty((b, n_tm, n_tn), dtype=torch.int8, device=q_mod.device)
    fields = [t.contiguous() for t in (q_mod, k_mod, q_seg, k_seg, q_pos, k_pos, q_run, k_run)]
    tn_chunk = _tn_chunk(block_n, n_tn)
    grid = (n_tm, triton.cdiv(n_tn, tn_chunk), b)
    _tile_map_kernel[grid](
        out, *fields, rules.contiguous(), sq, sk, n_tn,
        fields[0].stride(0), fields[1].stride(0), out.stride(0), out.stride(1),
        NM=nm, BLOCK_M=block_m, BLOCK_N=block_n, TN=tn_chunk,
        R_BLOCKED=BLOCKED, R_FULL=FULL, R_CAUSAL=CAUSAL, R_SPAN=SPAN,
        T_EMPTY=TILE_EMPTY, T_FULL=TILE_FULL, T_PARTIAL=TILE_PARTIAL,
        num_warps=4)
    return out


def compile_specs(nm: int, block_m: int, block_n: int):
    """(kernel, signature, constexprs, divisible_by_16) of a tile-map launch for the sm_90 compile
    tier (mmkernels.testing.sm90): ``[B, 4096]`` metadata, ``nm`` modalities."""
    from ..testing.sm90 import launch_signature
    s = 4096
    n_tn = triton.cdiv(s, block_n)
    ptrs = {"out_ptr": "*i8", **{f"{side}{f}_ptr": "*i32" for f in ("mod", "seg", "pos", "run")
                                 for side in ("q", "k")}, "rules_ptr": "*i8"}
    ptrs = {name: ptrs[name] for name in ("out_ptr", "qmod_ptr", "kmod_ptr", "qseg_ptr", "kseg_ptr",
                                          "qpos_ptr", "kpos_ptr", "qrun_ptr", "krun_ptr", "rules_ptr")}
    ints = {"Sq": s, "Sk": s, "n_tn": n_tn, "stride_qb": s, "stride_kb": s,
            "stride_ob": triton.cdiv(s, block_m) * n_tn, "stride_om": n_tn}
    constexprs = {"NM": nm, "BLOCK_M": block_m, "BLOCK_N": block_n, "TN": _tn_chunk(block_n, n_tn),
                  "R_BLOCKED": BLOCKED, "R_FULL": FULL, "R_CAUSAL": CAUSAL, "R_SPAN": SPAN,
                  "T_EMPTY": TILE_EMPTY, "T_FULL": TILE_FULL, "T_PARTIAL": TILE_PARTIAL}
    return (_tile_map_kernel, *launch_signature(ptrs, ints, constexprs))
