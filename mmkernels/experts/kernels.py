"""Triton kernels for modality experts: routing and grouped GEMMs (issue 4; contract: ``ops.py``).

The four contract functions ``linear_fwd_triton``, ``linear_bwd_triton``, ``ffn_fwd_triton``,
``ffn_bwd_triton``; the routing kernels (``route_triton``, ``route_split_triton``) live in
``route_kernels`` and are re-exported here.

Grouped GEMM (``_grouped_mm_kernel``), grid ``((cdiv(T, BLOCK_M) + E) * cdiv(N, OUT_N),)``
    (``OUT_N`` = ``BLOCK_N``, half of it for the swiglu forward: ``mm_output_columns``)
    For each expert ``e`` and each slot ``s`` of its range ``offsets[e] .. offsets[e+1]-1``:
    ``out_row = epilogue(in_row @ B_e)``.  The row tiles of all experts are numbered one
    after the other (an expert with ``n`` slots has ``cdiv(n, BLOCK_M)`` of them; their total
    is at most ``cdiv(T, BLOCK_M) + E - 1``); program ``m`` finds its expert by scanning
    ``offsets`` (``E <= 8``, a constexpr) and returns when it has no tile.  The flat program
    id maps to (row tile, column tile) in groups of ``GROUP_M`` row tiles, column tiles
    fastest inside a group (L2 reuse of the A rows).  The input row is
    read through ``perm`` (``GATHER``: row ``perm[s]`` of a token-order tensor) or directly
    (slot ``s`` of a sorted-order tensor); the output row likewise (``SCATTER``).  ``B_e`` is
    read from a weight ``[E, *, *]`` with explicit strides, so one kernel computes
    ``x @ W_e^T`` (forward) and ``dy @ W_e`` (backward ``dx``).  Epilogues (constexpr
    ``ACT``/``STORE_H``/``ACT_BWD``): bias add; gelu (erf) / gelu_tanh / silu / relu, storing
    the pre-activation ``h`` as well when asked; swiglu with one B tile of ``BLOCK_N / 2`` gate
    columns ``n`` and the matching up columns ``N + n`` (one MMA; the accumulator's halves are
    gate and up; output ``silu(gate) * up``, ``h`` gets both halves); and the activation's backward: ``dh = da * act'(h)`` reading ``h``, for swiglu
    both halves of ``dh [T, 2F]`` from a ``da [T, F]`` tile.  The epilogue may run on 2 or 4
    column slices of the tile in turn (``EPI_SPLIT``, ``MMConfig.epilogue_split``): fewer
    registers live at once, so the activation launches take 128 x 128 tiles at two programs
    per SM.

Grouped weight gradient (``_grouped_wgrad_kernel``), grid ``(E * tiles_n * tiles_k,)``
    ``dW_e[n, k] = sum_{s in e} A[s, n] X[s, k]`` with ``A`` and ``X`` each read through
    ``perm`` or directly; each program loops over its expert's slots in ``BLOCK_T`` chunks
    (bounds loaded from ``offsets``).  The programs with ``k``-tile 0 also write the bias
    gradient ``db_e[n] = sum_s A[s, n]`` (16-bit inputs: a 16-column MMA of the A tile against
    ones; fp32: a row sum).  Experts with no tokens get zeros.  When those ``E * tiles_n *
    tiles_k`` programs cannot fill the GPU, a second grid axis cuts each expert's tokens into
    equal chunks summed with fp32 atomics (``auto_wgrad_chunk``).

Launches (``KERNEL_KINDS``): linear forward = one grouped GEMM (gather x, scatter y); linear
backward = one grouped GEMM for dx (gather dy, ``W_e`` not transposed, scatter) plus one
weight-gradient launch (dy and x gathered).  FFN forward = ``x -> (h, a)`` in sorted order
(gather, activation epilogue, h stored) then ``a -> y`` (scatter).  FFN backward =
``dh = (dy @ W_out_e) * act'(h)`` (gather, sorted dh), ``dx = dh @ W_in_e`` (scatter), and the
weight gradients ``dW_out = dy^T a``, ``dW_in = dh^T x`` with their bias gradients.

Tiles come from ``heuristic_config`` (dtype, precision, output width, alignment; no
autotuning), each checked by the sm_90a compile tier, with ``launch_options`` (the weight
gradient's register cap: two programs per SM).  Widths and row strides go to the
kernels divided by ``ALIGN``, the largest power of two <= 16 dividing them all, and are
multiplied back by the constexpr inside, so Triton sees 16-byte aligned rows for widths such
as 88 or 200; widths with no such alignment (97) take smaller tiles (scalar loads need more
registers).

All accumulation is fp32 with ``tl.dot`` (tensor cores for bf16/fp16; fp32 uses tf32 only
when ``torch.backends.cuda.matmul.allow_tf32`` is set, see mmkernels._triton).  Every row
offset ``row * stride`` is int64.  x, dy and the weights may have any strides.  Under
``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (bf16 products are upcast there and
bf16 results rounded to nearest even by hand, as the interpreter's cast truncates:
``DOT_UPCAST``).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._triton import check_device, dot_upcast, input_precision
from .route_kernels import (ROUTE_BLOCK, ROUTE_WARPS, SPLIT_BLOCK, _route_kernel,  # noqa: F401
                            _route_split_kernel, route_split_triton, route_triton)
from .routing import MAX_EXPERTS

# activation codes (constexpr ACT of the grouped GEMM)
ACT_NONE, ACT_GELU, ACT_GELU_TANH, ACT_SILU, ACT_RELU, ACT_SWIGLU = 0, 1, 2, 3, 4, 5
ACT_CODES = {"none": ACT_NONE, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH, "silu": ACT_SILU,
             "relu": ACT_RELU, "swiglu": ACT_SWIGLU}
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu", "swiglu")


class MMConfig(NamedTuple):
    BLOCK_M: int  # slots per tile
    BLOCK_N: int  # output columns per tile
    BLOCK_K: int  # reduction step
    num_warps: int
    num_stages: int
    maxnreg: int = 0  # register cap per thread (ptxas .maxnreg; 0: none), see launch_options
    epilogue_split: int = 1  # the epilogue runs on 1, 2 or 4 column slices in turn (registers)


class WGradConfig(NamedTuple):
    BLOCK_N: int  # rows of dW per tile
    BLOCK_K: int  # columns of dW per tile
    BLOCK_T: int  # slots per reduction step
    num_warps: int
    num_stages: int


# the launches the four contract functions make (one compile-tier entry each)
KERNEL_KINDS = (
    "route",
    "linear_fwd",      # x (gather) @ W^T + b -> y (scatter)
    "linear_bwd_dx",   # dy (gather) @ W -> dx (scatter)
    "ffn_fwd_in",      # x (gather) @ W_in^T + b_in -> h, a = act(h) (sorted)
    "ffn_fwd_out",     # a (sorted) @ W_out^T + b_out -> y (scatter)
    "ffn_bwd_dh",      # dy (gather) @ W_out -> da; dh = da * act'(h) (sorted)
    "ffn_bwd_dx",      # dh (sorted) @ W_in -> dx (scatter)
    "wgrad_linear",    # dW = dy(gather)^T x(gather), db = sum dy
    "wgrad_ffn_out",   # dW_out = dy(gather)^T a(sorted), db_out = sum dy
    "wgrad_ffn_in",    # dW_in = dh(sorted)^T x(gather), db_in = sum dh
)
MM_KINDS = ("linear_fwd", "linear_bwd_dx", "ffn_fwd_in", "ffn_fwd_out", "ffn_bwd_dh", "ffn_bwd_dx")
WGRAD_KINDS = ("wgrad_linear", "wgrad_ffn_out", "wgrad_ffn_in")
# kind -> (GATHER, SCATTER, STORE_H, ACT_BWD, weight used as W^T (forward) or W (backward))
_MM_FLAGS = {
    "linear_fwd": (True, True, False, False, True),
    "linear_bwd_dx": (True, True, False, False, False),
    "ffn_fwd_in": (True, False, True, False, True),
    "ffn_fwd_out": (False, True, False, False, True),
    "ffn_bwd_dh": (True, False, False, True, False),
    "ffn_bwd_dx": (False, True, False, False, False),
}
# kind -> (GATHER_A, GATHER_X)
_WGRAD_FLAGS = {
    "wgrad_linear": (True, True),
    "wgrad_ffn_out": (True, False),
    "wgrad_ffn_in": (False, True),
}


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


@triton.jit
def _round_bf16(x):
    """fp32 -> the fp32 value of its round-to-nearest-even bfloat16 (exact bit arithmetic).

    Interpreter only (constexpr DOT_UPCAST): its fp32 -> bfloat16 cast truncates, so results
    are rounded to nearest even first (then the truncating cast is exact); on a GPU the cast
    itself rounds to nearest even.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _tanh(u):
    # 1 - 2 / (exp(2u) + 1): exact limits +-1 for large |u| (exp overflows to inf or goes to 0)
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _act_fwd(h, ACT: tl.constexpr):
    """act(h) in fp32 for the single-input activations."""
    if ACT == 1:  # gelu (erf)
        out = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 2:  # gelu (tanh approximation)
        t = _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
        out = 0.5 * h * (1.0 + t)
    elif ACT == 3:  # silu
        out = h * tl.sigmoid(h)
    elif ACT == 4:  # relu
        out = tl.maximum(h, 0.0)
    else:
        out = h
    return out


@triton.jit
def _act_grad(h, ACT: tl.constexpr):
    """act'(h) in fp32 for the single-input activations."""
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        out = cdf + h * (0.3989422804014327 * tl.exp(-0.5 * h * h))
    elif ACT == 2:
        h2 = h * h
        t = _tanh(0.7978845608028654 * (h + 0.044715 * h2 * h))
        out = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * (0.7978845608028654 * (1.0 + 0.134145 * h2))
    elif ACT == 3:
        s = tl.sigmoid(h)
        out = s * (1.0 + h * (1.0 - s))
    elif ACT == 4:
        out = tl.where(h > 0.0, 1.0, 0.0)
    else:
        out = tl.full(h.shape, 1.0, tl.float32)
    return out


@triton.jit
def _grouped_mm_kernel(
    a_ptr, b_ptr, bias_ptr, out_ptr, h_ptr, perm_ptr, offsets_ptr,
    N, K,
    stride_am, stride_ak,
    stride_be, stride_bk, stride_bn,
    stride_biase, stride_biasn,
    stride_om, stride_on,
    stride_hm, stride_hn,
    E: tl.constexpr,
    GATHER: tl.constexpr,
    SCATTER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    STORE_H: tl.constexpr,
    ACT_BWD: tl.constexpr,
    B_TRANS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    ALIGN: tl.constexpr,
    EVEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EPI_SPLIT: tl.constexpr,
):
    """out[dst(s), n] = epilogue(sum_k A[src(s), k] * B_e[k, n]) for the slots s of each expert e.

    ``B_e[k, n] = b_ptr[e * stride_be + k * stride_bk + n * stride_bn]``.  SWIGLU (ACT 5):
    forward reads the gate at ``B_e[:, n]`` and the up projection at ``B_e[:, N + n]`` (bias,
    h likewise); backward (ACT_BWD) writes the gate half of dh at column n and the up half at
    ``N + n`` of ``out``.  ``h`` is in sorted order (row = slot).

    ``N``, ``K`` and the row strides (``stride_am``, ``stride_be``, the weight's row stride:
    ``stride_bn`` when ``B_TRANS`` (B = W^T) else ``stride_bk``, ``stride_biase``,
    ``stride_om``, ``stride_hm``) arrive divided by ``ALIGN`` (a power of two dividing them
    all) and are multiplied back here: Triton then knows rows are aligned (vector loads,
    async copies) when the widths are not multiples of 16 (88, 200, ...).
    """
    # grouped launch order: GROUP_M row tiles walk every column tile before the next group, so
    # the programs resident together share their A rows (read once from HBM, then from L2) and
    # the weight columns of GROUP_M tiles; plain row-major order re-reads a wide A (93 MB for
    # the VLMo FFN's a [T, 3072]) once per wave of column tiles
    pid = tl.program_id(0)
    DUAL: tl.constexpr = (ACT == 5) and (not ACT_BWD)
    # output columns per program: the swiglu forward's B tile pairs OUT_N gate columns with the
    # OUT_N matching up columns (one n = BLOCK_N wgmma, not two of BLOCK_N / 2)
    OUT_N: tl.constexpr = BLOCK_N // 2 if DUAL else BLOCK_N
    num_pid_n = tl.cdiv(N * ALIGN, OUT_N)
    num_pid_m = tl.num_programs(0) // num_pid_n
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    # which expert, which of its row tiles: scan the E + 1 offsets
    expert = -1
    row0 = 0
    row_end = 0
    tiles_before = 0
    for e in tl.static_range(E):
        lo = tl.load(offsets_ptr + e)
        hi = tl.load(offsets_ptr + e + 1)
        nt = (hi - lo + BLOCK_M - 1) // BLOCK_M
        hit = (pid_m >= tiles_before) & (pid_m < tiles_before + nt)
        expert = tl.where(hit, e, expert)
        row0 = tl.where(hit, lo + (pid_m - tiles_before) * BLOCK_M, row0)
        row_end = tl.where(hit, hi, row_end)
        tiles_before += nt
    if expert < 0:
        return
    N = N * ALIGN
    K = K * ALIGN
    stride_am = tl.cast(stride_am, tl.int64) * ALIGN
    stride_be = tl.cast(stride_be, tl.int64) * ALIGN
    if B_TRANS:
        stride_bk = tl.cast(stride_bk, tl.int64)
        stride_bn = tl.cast(stride_bn, tl.int64) * ALIGN
    else:
        stride_bk = tl.cast(stride_bk, tl.int64) * ALIGN
        stride_bn = tl.cast(stride_bn, tl.int64)
    stride_biase = tl.cast(stride_biase, tl.int64) * ALIGN
    stride_om = tl.cast(stride_om, tl.int64) * ALIGN
    stride_hm = tl.cast(stride_hm, tl.int64) * ALIGN

    rows = row0 + tl.arange(0, BLOCK_M)  # slots
    row_ok = rows < row_end
    if GATHER or SCATTER:
        tok = tl.load(perm_ptr + rows, mask=row_ok, other=0)
    if GATHER:
        src = tok.to(tl.int64)
    else:
        src = rows.to(tl.int64)
    if SCATTER:
        dst = tok.to(tl.int64)
    else:
        dst = rows.to(tl.int64)
    slot64 = rows.to(tl.int64)

    col0 = pid_n * OUT_N
    if DUAL:  # B columns: gate n .. n + OUT_N - 1, then up N + n .. N + n + OUT_N - 1
        jj = tl.arange(0, BLOCK_N)
        cols = col0 + jj % OUT_N
        col_ok = cols < N
        cols64 = cols.to(tl.int64) + (jj // OUT_N).to(tl.int64) * N
    else:
        cols = col0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        cols64 = cols.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_k64 = offs_k.to(tl.int64)

    a_ptrs = a_ptr + src[:, None] * stride_am + offs_k64[None, :] * stride_ak
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + offs_k64[:, None] * stride_bk \
        + cols64[None, :] * stride_bn

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # EVEN (the tiles divide N and K): only the row mask, loop-invariant (masks are issue
        # slots: sm_90a bf16 128 x 64 x 64, 105 SASS instructions a step masked, 96 not)
        if EVEN:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs)
        else:
            k_ok = (k0 + offs_k) < K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_UPCAST:  # interpreter only: its tl.dot mishandles bfloat16
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # the epilogue in EPI_SPLIT column slices of the accumulator, one after the other: its
    # temporaries (activation, h loads, 64-bit row addresses) then live for a slice at a time
    # (sm_90a bf16 128 x 128 gelu: 184 registers in one piece, 116 in four; the backward's
    # act' 255 -> 120), so 128 x 128 tiles with an activation keep two programs per SM
    if DUAL:
        acc, acc_up = _split_columns(acc, BLOCK_M, BLOCK_N)  # gate, up: [BLOCK_M, OUT_N]
    else:
        acc_up = acc  # unread by the epilogue
    bias_row = bias_ptr + expert.to(tl.int64) * stride_biase
    SUB: tl.constexpr = OUT_N // EPI_SPLIT
    if EPI_SPLIT == 1:
        _mm_epilogue(acc, acc_up, col0, row_ok, slot64, dst, bias_row, out_ptr, h_ptr, N,
                     stride_biasn, stride_om, stride_on, stride_hm, stride_hn, HAS_BIAS, ACT,
                     STORE_H, ACT_BWD, DUAL, DOT_UPCAST, SUB)
    else:
        tl.static_assert((EPI_SPLIT == 2) or (EPI_SPLIT == 4), "EPI_SPLIT: 1, 2 or 4")
        c0, c1 = _split_columns(acc, BLOCK_M, OUT_N)
        u0, u1 = c0, c1
        if DUAL:
            u0, u1 = _split_columns(acc_up, BLOCK_M, OUT_N)
        if EPI_SPLIT == 2:
            _mm_epilogue(c0, u0, col0, row_ok, slot64, dst, bias_row, out_ptr, h_ptr, N,
                         stride_biasn, stride_om, stride_on, stride_hm, stride_hn, HAS_BIAS, ACT,
                         STORE_H, ACT_BWD, DUAL, DOT_UPCAST, SUB)
            _mm_epilogue(c1, u1, col0 + SUB, row_ok, slot64, dst, bias_row, out_ptr, h_ptr, N,
                         stride_biasn, stride_om, stride_on, stride_hm, stride_hn, HAS_BIAS, ACT,
                         STORE_H, ACT_BWD, DUAL, DOT_UPCAST, SUB)
        else:
            _mm_epilogue_halves(c0, u0, col0, row_ok, slot64, dst, bias_row, out_ptr, h_ptr, N,
                                stride_biasn, stride_om, stride_on, stride_hm, stride_hn, HAS_BIAS,
                                ACT, STORE_H, ACT_BWD, DUAL, DOT_UPCAST, BLOCK_M, OUT_N // 2)
            _mm_epilogue_halves(c1, u1, col0 + 2 * SUB, row_ok, slot64, dst, bias_row, out_ptr,
                                h_ptr, N, stride_biasn, stride_om, stride_on, stride_hm, stride_hn,
                                HAS_BIAS, ACT, STORE_H, ACT_BWD, DUAL, DOT_UPCAST, BLOCK_M,
                                OUT_N // 2)


@triton.jit
def _split_columns(x, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """``x [BLOCK_M, WIDTH]`` -> its column halves ``x[:, :WIDTH/2]``, ``x[:, WIDTH/2:]``."""
    return tl.split(tl.permute(tl.reshape(x, [BLOCK_M, 2, WIDTH // 2]), (0, 2, 1)))


@triton.jit
def _mm_epilogue_halves(acc, acc_up, col0, row_ok, slot64, dst, bias_row, out_ptr, h_ptr, N,
                        stride_biasn, stride_om, stride_on, stride_hm, stride_hn,
                        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_H: tl.constexpr,
                        ACT_BWD: tl.constexpr, DUAL: tl.constexpr, DOT_UPCAST: tl.constexpr,
                        BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """``_mm_epilogue`` of the slice ``acc [BLOCK_M, WIDTH]`` (columns ``col0 ..``) in two halves."""
    HALF: tl.constexpr = WIDTH // 2
    c0, c1 = _split_columns(acc, BLOCK_M, WIDTH)
    u0, u1 = c0, c1
    if DUAL:
        u0, u1 = _split_columns(acc_up, BLOCK_M, WIDTH)
    _mm_epilogue(c0, u0, col0, row_ok, slot64, dst, bias_row, out_ptr, h_ptr, N, stride_biasn,
                 stride_om, stride_on, stride_hm, stride_hn, HAS_BIAS, ACT, STORE_H, ACT_BWD,
                 DUAL, DOT_UPCAST, HALF)
    _mm_epilogue(c1, u1, col0 + HALF, row_ok, slot64, dst, bias_row, out_ptr, h_ptr, N,
                 stride_biasn, stride_om, stride_on, stride_hm, stride_hn, HAS_BIAS, ACT, STORE_H,
                 ACT_BWD, DUAL, DOT_UPCAST, HALF)


@triton.jit
def _mm_epilogue(acc, acc_up, col0, row_ok, slot64, dst, bias_row, out_ptr, h_ptr, N,
                 stride_biasn, stride_om, stride_on, stride_hm, stride_hn,
                 HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_H: tl.constexpr,
                 ACT_BWD: tl.constexpr, DUAL: tl.constexpr, DOT_UPCAST: tl.constexpr,
                 WIDTH: tl.constexpr):
    """The grouped GEMM's epilogue for the output columns ``col0 .. col0 + WIDTH - 1``.

    ``acc`` (and, for the swiglu forward, ``acc_up``): fp32 ``[BLOCK_M, WIDTH]`` sums of those
    columns; ``row_ok``, ``slot64`` (slot = row of ``h``), ``dst`` (output row): ``[BLOCK_M]``;
    ``bias_row``: the expert's bias. Adds the bias, stores ``h`` (``STORE_H``), then the
    activation (forward) or ``da * act'(h)`` (``ACT_BWD``), masked to the valid rows and
    columns ``< N``; swiglu reaches its up half at column offset ``N``.
    """
    cols64 = (col0 + tl.arange(0, WIDTH)).to(tl.int64)
    col_ok = cols64 < N
    msk = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_row + cols64 * stride_biasn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if DUAL:
            acc_up += tl.load(bias_row + (N + cols64) * stride_biasn, mask=col_ok,
                              other=0.0).to(tl.float32)[None, :]
    h_ptrs = h_ptr + slot64[:, None] * stride_hm + cols64[None, :] * stride_hn
    up_h = N * stride_hn
    if STORE_H:
        hv = acc
        if DOT_UPCAST:
            hv = _round_bf16(hv)
        tl.store(h_ptrs, hv.to(h_ptr.dtype.element_ty), mask=msk)
        if DUAL:
            hu = acc_up
            if DOT_UPCAST:
                hu = _round_bf16(hu)
            tl.store(h_ptrs + up_h, hu.to(h_ptr.dtype.element_ty), mask=msk)
    out_ptrs = out_ptr + dst[:, None] * stride_om + cols64[None, :] * stride_on
    if ACT_BWD:
        if ACT == 5:  # swiglu: da -> (d gate, d up)
            g = tl.load(h_ptrs, mask=msk, other=0.0).to(tl.float32)
            u = tl.load(h_ptrs + up_h, mask=msk, other=0.0).to(tl.float32)
            sg = tl.sigmoid(g)
            dgate = acc * u * (sg * (1.0 + g * (1.0 - sg)))
            dup = acc * (g * sg)
            if DOT_UPCAST:
                dgate = _round_bf16(dgate)
                dup = _round_bf16(dup)
            tl.store(out_ptrs, dgate.to(out_ptr.dtype.element_ty), mask=msk)
            tl.store(out_ptrs + N * stride_on, dup.to(out_ptr.dtype.element_ty), mask=msk)
        else:
            hv = tl.load(h_ptrs, mask=msk, other=0.0).to(tl.float32)
            dh = acc * _act_grad(hv, ACT)
            if DOT_UPCAST:
                dh = _round_bf16(dh)
            tl.store(out_ptrs, dh.to(out_ptr.dtype.element_ty), mask=msk)
    else:
        if DUAL:
            res = acc * tl.sigmoid(acc) * acc_up
        else:
            res = _act_fwd(acc, ACT)
        if DOT_UPCAST:
            res = _round_bf16(res)
        tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _wgrad_load(a_ptr, x_ptr, perm_ptr, t0, hi, ns64, n_ok, ks64, k_ok,
                stride_am, stride_an, stride_xm, stride_xk,
                GATHER_A: tl.constexpr, GATHER_X: tl.constexpr, MASK_T: tl.constexpr,
                EVEN: tl.constexpr, ROW32: tl.constexpr, BLOCK_T: tl.constexpr):
    """One reduction step's tiles: ``(A^T [BLOCK_N, BLOCK_T], X [BLOCK_T, BLOCK_K])`` for the
    slots ``t0 ..`` (rows read through ``perm`` where gathered). Masks only what may fall
    outside: slots ``>= hi`` when ``MASK_T`` (the last, partial step), dW rows/columns unless
    ``EVEN`` (the tile divides N and K). Row offsets in int32 when ``ROW32`` (sm_90a, bf16
    128 x 128 x 64: 108 loop instructions against 143 with int64 offsets, which take five
    instructions a gathered row)."""
    slots = t0 + tl.arange(0, BLOCK_T)
    t_ok = slots < hi
    if GATHER_A or GATHER_X:
        if MASK_T:
            tok = tl.load(perm_ptr + slots, mask=t_ok, other=0)
        else:
            tok = tl.load(perm_ptr + slots)
    if GATHER_A:
        ra = tok
    else:
        ra = slots
    if GATHER_X:
        rx = tok
    else:
        rx = slots
    if not ROW32:
        ra = ra.to(tl.int64)
        rx = rx.to(tl.int64)
    a_ptrs = a_ptr + ra[None, :] * stride_am + ns64[:, None] * stride_an
    x_ptrs = x_ptr + rx[:, None] * stride_xm + ks64[None, :] * stride_xk
    if MASK_T:
        if EVEN:
            at = tl.load(a_ptrs, mask=t_ok[None, :], other=0.0)
            xt = tl.load(x_ptrs, mask=t_ok[:, None], other=0.0)
        else:
            at = tl.load(a_ptrs, mask=n_ok[:, None] & t_ok[None, :], other=0.0)
            xt = tl.load(x_ptrs, mask=t_ok[:, None] & k_ok[None, :], other=0.0)
    else:
        if EVEN:
            at = tl.load(a_ptrs)
            xt = tl.load(x_ptrs)
        else:
            at = tl.load(a_ptrs, mask=n_ok[:, None], other=0.0)
            xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
    return at, xt


@triton.jit
def _wgrad_mma(at, xt, acc, dbacc, dbacc2, WITH_DB: tl.constexpr, DB_BY_DOT: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``acc += A^T X``; with ``WITH_DB`` the row sums of ``A^T``: into ``dbacc2 [BLOCK_N, 16]``
    by an MMA against ones (``DB_BY_DOT``), else into ``dbacc [BLOCK_N, BLOCK_T]`` elementwise
    (summed over its columns once, after the loop)."""
    if DOT_UPCAST:
        at = at.to(tl.float32)
        xt = xt.to(tl.float32)
    acc = tl.dot(at, xt, acc, input_precision=INPUT_PRECISION)
    if WITH_DB:
        if DB_BY_DOT:
            dbacc2 = tl.dot(at, tl.full([at.shape[1], 16], 1.0, at.dtype), dbacc2,
                            input_precision=INPUT_PRECISION)
        else:
            dbacc += at.to(tl.float32)
    return acc, dbacc, dbacc2


@triton.jit
def _wgrad_accumulate(a_ptr, x_ptr, perm_ptr, lo, hi, ns64, n_ok, ks64, k_ok,
                      stride_am, stride_an, stride_xm, stride_xk,
                      GATHER_A: tl.constexpr, GATHER_X: tl.constexpr, WITH_DB: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, EVEN: tl.constexpr,
                      ROW32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_T: tl.constexpr):
    """The reduction of one dW tile over slots ``lo .. hi-1``: ``(acc [BLOCK_N, BLOCK_K],
    db [BLOCK_N])`` in fp32, ``db`` zeros unless ``WITH_DB``.

    The loop runs over the full ``BLOCK_T`` steps with no slot mask (and no row/column masks
    when ``EVEN``); a partial last step follows it, masked. Masks are issue overhead: sm_90a,
    bf16 128 x 128 x 64, int64 row offsets, the loop is 143 SASS instructions unmasked against
    218 masked (108 unmasked with ``ROW32``).

    ``db`` for 16-bit inputs is a second, 16-column MMA of the same A tile against ones (exact
    products, fp32 sums; column 0 is kept). A row sum of the tile in the loop costs a cross-warp
    reduction through shared memory every step instead (a 390-instruction loop against 218
    without db and 231 with the MMA, masked). fp32 keeps the row sum: under tf32 the MMA would
    round A to 10 mantissa bits.
    """
    DB_BY_DOT: tl.constexpr = a_ptr.dtype.element_ty != tl.float32
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    # db partials (only WITH_DB): fp32 inputs sum A^T elementwise (a per-step row sum broke
    # Triton 3.6's sm_90 TritonGPUOptimizeThreadLocality pass once the loop had a masked tail)
    dbacc = tl.zeros([BLOCK_N, BLOCK_T], tl.float32)
    dbacc2 = tl.zeros([BLOCK_N, 16], tl.float32)
    full_hi = lo + (hi - lo) // BLOCK_T * BLOCK_T
    for t0 in range(lo, full_hi, BLOCK_T):
        at, xt = _wgrad_load(a_ptr, x_ptr, perm_ptr, t0, hi, ns64, n_ok, ks64, k_ok,
                             stride_am, stride_an, stride_xm, stride_xk, GATHER_A, GATHER_X,
                             False, EVEN, ROW32, BLOCK_T)
        acc, dbacc, dbacc2 = _wgrad_mma(at, xt, acc, dbacc, dbacc2, WITH_DB, DB_BY_DOT,
                                        INPUT_PRECISION, DOT_UPCAST)
    if full_hi < hi:
        at, xt = _wgrad_load(a_ptr, x_ptr, perm_ptr, full_hi, hi, ns64, n_ok, ks64, k_ok,
                             stride_am, stride_an, stride_xm, stride_xk, GATHER_A, GATHER_X,
                             True, EVEN, ROW32, BLOCK_T)
        acc, dbacc, dbacc2 = _wgrad_mma(at, xt, acc, dbacc, dbacc2, WITH_DB, DB_BY_DOT,
                                        INPUT_PRECISION, DOT_UPCAST)
    if DB_BY_DOT:  # every column of dbacc2 holds the row sums: keep column 0 exactly
        db = tl.sum(tl.where(tl.arange(0, 16)[None, :] == 0, dbacc2, 0.0), 1)
    else:
        db = tl.sum(dbacc, 1)
    return acc, db


@triton.jit
def _wgrad_store(dw_ptr, db_ptr, e64, ns64, n_ok, ks64, k_ok, stride_we, stride_wn, stride_wk,
                 stride_dbe, stride_dbn, acc, dbacc, db_ok, WITH_DB: tl.constexpr,
                 ATOMIC: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Write one dW tile ``acc [BLOCK_N, BLOCK_K]`` and, ``WITH_DB``, the rows ``db_ok`` of
    ``dbacc [BLOCK_N]``: fp32 atomics (``ATOMIC``) or a store in the buffers' dtype."""
    dw_ptrs = dw_ptr + e64 * stride_we + ns64[:, None] * stride_wn + ks64[None, :] * stride_wk
    db_ptrs = db_ptr + e64 * stride_dbe + ns64 * stride_dbn
    if ATOMIC:
        tl.atomic_add(dw_ptrs, acc, mask=n_ok[:, None] & k_ok[None, :])
        if WITH_DB:
            tl.atomic_add(db_ptrs, dbacc, mask=db_ok)
    else:
        if DOT_UPCAST:
            acc = _round_bf16(acc)
            dbacc = _round_bf16(dbacc)
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])
        if WITH_DB:
            tl.store(db_ptrs, dbacc.to(db_ptr.dtype.element_ty), mask=db_ok)


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr, x_ptr, dw_ptr, db_ptr, perm_ptr, offsets_ptr,
    N, K, chunk,
    stride_am, stride_an,
    stride_xm, stride_xk,
    stride_we, stride_wn, stride_wk,
    stride_dbe, stride_dbn,
    E: tl.constexpr,
    GATHER_A: tl.constexpr,
    GATHER_X: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    ALIGN: tl.constexpr,
    ATOMIC: tl.constexpr,
    EVEN: tl.constexpr,
    ROW32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """dW[e, n, k] = sum_{s of e} A[ra(s), n] X[rx(s), k]; db[e, n] = sum_s A[ra(s), n] (k-tile 0).

    ``N``, ``K``, ``stride_am``, ``stride_xm``, ``stride_we``, ``stride_wn`` and ``stride_dbe``
    arrive divided by ``ALIGN`` (see ``_grouped_mm_kernel``). With ``ATOMIC``, program
    ``(pid, c)`` sums chunk ``c`` of its expert's slots (``cdiv(n_e, chunk)`` equal chunks of at
    most ``chunk``) into fp32 ``dw``/``db`` buffers (zeroed by the caller); without it there is
    one chunk per expert (``chunk >= T``) and the tile is stored.
    """
    N = N * ALIGN
    K = K * ALIGN
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_k = tl.cdiv(K, BLOCK_K)
    per_e = tiles_n * tiles_k
    e = pid // per_e
    r = pid % per_e
    pn = r // tiles_k
    pk = r % tiles_k
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    if ATOMIC:
        # the expert's tokens in as many chunks as ``chunk`` asks for, made equal (whole
        # BLOCK_T steps, so only the last chunk has a partial step): 12608 tokens at chunk 4160
        # become 4 x 3152, not 3 x 4160 + 128 (the launch's last wave is its slowest chunk)
        n_chunks = tl.cdiv(hi - lo, chunk)
        per = tl.cdiv(tl.cdiv(hi - lo, tl.maximum(n_chunks, 1)), BLOCK_T) * BLOCK_T
        lo = lo + tl.program_id(1) * per
        hi = tl.minimum(hi, lo + per)
        if lo >= hi:  # past this expert's last chunk (the grid covers the largest possible expert)
            return
    if ROW32:  # every element offset of a and x fits in int32 (the launcher checked)
        stride_am = stride_am * ALIGN
        stride_xm = stride_xm * ALIGN
    else:
        stride_am = tl.cast(stride_am, tl.int64) * ALIGN
        stride_xm = tl.cast(stride_xm, tl.int64) * ALIGN
    stride_we = tl.cast(stride_we, tl.int64) * ALIGN
    stride_wn = tl.cast(stride_wn, tl.int64) * ALIGN
    stride_dbe = tl.cast(stride_dbe, tl.int64) * ALIGN

    ns = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    ns64 = ns.to(tl.int64)
    ks = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    ks64 = ks.to(tl.int64)

    # every program computes db when there is a bias; the k-tile 0 ones store it. (A loop of
    # its own for those programs, two loops under a branch, took 162 registers against 112 with
    # the fp32 atomics in the sm_90a compile: one program per SM instead of two. The 16-column
    # db MMA costs the others 1/8 more tensor-core work instead.)
    acc, dbacc = _wgrad_accumulate(
        a_ptr, x_ptr, perm_ptr, lo, hi, ns64, n_ok, ks64, k_ok, stride_am, stride_an, stride_xm,
        stride_xk, GATHER_A, GATHER_X, HAS_BIAS, INPUT_PRECISION, DOT_UPCAST, EVEN, ROW32,
        BLOCK_N, BLOCK_K, BLOCK_T)
    _wgrad_store(dw_ptr, db_ptr, e.to(tl.int64), ns64, n_ok, ks64, k_ok, stride_we,
                 stride_wn, stride_wk, stride_dbe, stride_dbn, acc, dbacc, n_ok & (pk == 0),
                 HAS_BIAS, ATOMIC, DOT_UPCAST)


# ---------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MM_GROUP_M = 8  # row tiles per launch-order group of the grouped GEMM (see _grouped_mm_kernel)


REGISTERS_PER_SM = 65536  # 32-bit registers of one SM (every NVIDIA GPU since Kepler)
RESIDENT_PROGRAMS = 2  # 8-warp programs of one launch meant to share an SM (latency hiding)


def launch_options(kind: str, config) -> dict:
    """Compile options of launch ``kind`` beyond its tile config (passed at launch and by the
    compile tier alike).

    A grouped-GEMM config may carry a register cap (``MMConfig.maxnreg``: two 8-warp programs
    per SM at 128, e.g. 128 x 128 tiles with an activation epilogue that would take 184-255).
    The weight gradient's 8-warp tiles are sized for two programs per SM; with bias and fp32
    atomics ptxas chose 130 registers (sm_90a, bf16 128 x 128 x 64), which leaves one. A cap of
    ``REGISTERS_PER_SM / (2 x threads)`` = 128 keeps two, with no spills (the compile tier checks).
    """
    if getattr(config, "maxnreg", 0):
        return {"maxnreg": config.maxnreg}
    if kind in WGRAD_KINDS:
        cap = REGISTERS_PER_SM // (RESIDENT_PROGRAMS * config.num_warps * 32)
        if cap < 255:
            return {"maxnreg": cap}
    return {}


def input_precisions(dtype: torch.dtype) -> tuple[str, ...]:
    """Values of INPUT_PRECISION the launchers can pass for this dtype."""
    return ("ieee", "tf32") if dtype == torch.float32 else ("tf32",)


def align_of(*values: int) -> int:
    """The largest power of two <= 16 dividing every value (0 counts as divisible)."""
    al = 16
    while al > 1 and any(int(v) % al for v in values):
        al //= 2
    return al


def is_aligned(dtype: torch.dtype, align: int) -> bool:
    """Rows of ``align``-divisible widths are 16-byte aligned (vector loads, async copies)."""
    return align * dtype.itemsize >= 16


def heuristic_config(kind: str, dtype: torch.dtype, input_precision: str, swiglu: bool = False,
                     N: int = 4096, aligned: bool = True):
    """The tile configuration of launch ``kind`` (an entry of KERNEL_KINDS but "route").

    ``swiglu``: the swiglu launches of ffn_fwd_in (a B tile of gate and up columns, half as
    many output columns: ``mm_output_columns``) and ffn_bwd_dh (two h tiles and two outputs in
    the epilogue); they take the same tiles as the other activations.  ``N``: the output width
    of a grouped GEMM
    (columns of dW for the weight gradient); narrow outputs (<= 64) take 64-wide tiles.
    ``aligned``: widths and row strides give 16-byte aligned rows (``is_aligned``); when not
    (odd widths such as 97), loads are scalar and need many more registers, so the tiles shrink.
    Chosen from the sm_90a compile reports (tests/test_sm90_experts.py): no spills, shared
    memory within 227 KB, wgmma for 16-bit inputs and for fp32 with tf32.
    """
    fma = dtype == torch.float32 and input_precision == "ieee"
    tf32 = dtype == torch.float32 and not fma
    narrow = N <= 64
    if kind in WGRAD_KINDS:
        # The reduction runs over tokens gathered through perm: each step's row addresses come
        # from a load made in the loop, and Triton's software pipeliner spends stages on that
        # index load. Below 5 stages every cp.async.wait_group drains all copies (no load
        # overlaps the math: the H200's 82 TFLOP/s); at 5 the loads of the next two steps stay
        # in flight (the compile tier asserts it: sm90.assert_pipelined).
        if fma:
            return WGradConfig(32, 64, 16, 4, 2)
        if tf32:
            return WGradConfig(64, 64, 32, 4, 5)
        if not aligned:
            return WGradConfig(64, 64, 32, 4, 2)
        return WGradConfig(64 if narrow else 128, 128, 64, 8, 5)
    if kind not in MM_KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}")
    if fma:
        return MMConfig(32, 64, 16, 4, 2)
    if not aligned:
        return MMConfig(64, 32, 32, 4, 2)
    if tf32:
        return MMConfig(64, 64, 32, 4, 3)
    if narrow:
        return MMConfig(128, 64, 64, 8, 3)
    if kind in ("ffn_fwd_in", "ffn_bwd_dh"):
        # an activation epilogue over a whole 128 x 128 tile took 184 (gelu forward) to 255
        # registers (act' backward), one program per SM; over four 128 x 32 slices in turn,
        # 107-124 for every activation, no spills: two per SM, and wgmma n = 128 (the B tile
        # reused twice as often as at the 128 x 64 tiles these launches took before). The
        # swiglu forward's 128-wide B tile pairs 64 gate with 64 up columns: 118 registers.
        return MMConfig(128, 128, 64, 8, 3, 0, 4)
    return MMConfig(128, 128, 64, 8, 3)


def candidate_configs(kind: str, dtype: torch.dtype | None = None,
                      input_precision: str | None = None, swiglu: bool | None = None,
                      aligned: bool | None = None) -> list:
    """Every configuration the launchers can pick for ``kind`` (deduplicated)."""
    dtypes = _DTYPES if dtype is None else (dtype,)
    out: list = []
    for dt in dtypes:
        for prec in (input_precisions(dt) if input_precision is None else (input_precision,)):
            for du in ((False, True) if swiglu is None else (swiglu,)):
                for al in ((True, False) if aligned is None else (aligned,)):
                    for n in (64, 4096):
                        c = heuristic_config(kind, dt, prec, du, n, al)
                        if c not in out:
                            out.append(c)
    return out


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------


def _check(x: torch.Tensor, offsets: torch.Tensor):
    check_device(x)
    if x.dtype not in _DTYPES:
        raise TypeError(f"the triton experts kernels take float32/bfloat16/float16, got {x.dtype}")
    E = offsets.numel() - 1
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"the triton experts kernels take 1..{MAX_EXPERTS} experts, got {E}")
    return E


CONFIGS_ENV = "MMKERNELS_EXPERTS_CONFIGS"


def config_overrides() -> dict:
    """``MMKERNELS_EXPERTS_CONFIGS``: tile configs replacing the heuristic's, per launch kind.

    ``"kind=v,v,v,v,v;kind=..."``: a grouped-GEMM kind (``MM_KINDS``) takes
    ``BLOCK_M,BLOCK_N,BLOCK_K,warps,stages[,maxnreg[,epilogue_split]]`` (``maxnreg`` 0: no
    cap; ``epilogue_split`` 1, 2 or 4), a weight-gradient kind (``WGRAD_KINDS``)
    ``BLOCK_N,BLOCK_K,BLOCK_T,warps,stages``. It applies to every dtype and width of that kind
    (the sm_90a compile tier checks only the heuristic's configs): meant for the output of
    ``python -m bench.tune_gpu --env-out``, on the GPU it was measured on. Unset or empty: ``{}``.
    """
    return dict(_parse_config_overrides(os.environ.get(CONFIGS_ENV, "").strip()))


@functools.lru_cache(maxsize=8)
def _parse_config_overrides(raw: str) -> tuple:
    """``config_overrides``'s parse of one setting, cached: every launch asks (seven per FFN
    forward and backward), the setting rarely changes. ``((kind, config), ...)``."""
    out: dict = {}
    for item in filter(None, (p.strip() for p in raw.split(";"))):
        kind, sep, values = item.partition("=")
        kind = kind.strip()
        if not sep or kind not in MM_KINDS + WGRAD_KINDS:
            raise ValueError(f"{CONFIGS_ENV}: {item!r} is not kind=values with a kind of "
                             f"{MM_KINDS + WGRAD_KINDS}")
        try:
            nums = [int(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"{CONFIGS_ENV}: {item!r}: the values must be integers") from None
        # grouped GEMMs: an optional register cap, then an optional epilogue split
        n_max = 5 if kind in WGRAD_KINDS else 7
        if (not 5 <= len(nums) <= n_max or any(v <= 0 or v & (v - 1) for v in nums[:4])
                or nums[4] <= 0 or any(v and not 24 <= v <= 255 for v in nums[5:6])
                or any(v not in (1, 2, 4) or nums[1] // v < 16 for v in nums[6:])):
            raise ValueError(f"{CONFIGS_ENV}: {item!r}: need 5 values (grouped GEMMs: 5 to 7), "
                             f"three block sizes and the warps powers of two, stages >= 1, a "
                             f"register cap 0 (none) or in [24, 255], an epilogue split of 1, 2 "
                             f"or 4 leaving slices of >= 16 columns")
        out[kind] = (WGradConfig if kind in WGRAD_KINDS else MMConfig)(*nums)
    return tuple(out.items())


def _pick(kind, dtype, prec, swiglu, N, align, config):
    """The launch's config: ``config`` (one, or a dict by kind), else ``MMKERNELS_EXPERTS_CONFIGS``,
    else ``heuristic_config``."""
    if isinstance(config, dict):
        config = config.get(kind)
    if config is None:
        config = config_overrides().get(kind)
    if config is None:
        return heuristic_config(kind, dtype, prec, swiglu, N, is_aligned(dtype, align))
    return config


def mm_output_columns(cfg: MMConfig, act: int, act_bwd: bool) -> int:
    """Output columns one grouped-GEMM program writes: ``BLOCK_N``, but half of it for the swiglu
    forward, whose B tile holds ``BLOCK_N / 2`` gate columns and the matching up columns."""
    return cfg.BLOCK_N // 2 if act == ACT_SWIGLU and not act_bwd else cfg.BLOCK_N


def _grouped_mm(kind, a, weight, w_strides, bias, out, h, perm, offsets, N, K, act, *, config=None):
    """Launch ``_grouped_mm_kernel`` for ``kind``; ``w_strides`` = (stride_e, stride_k, stride_n) of B."""
    gather, scatter, store_h, act_bwd, b_trans = _MM_FLAGS[kind]
    E = offsets.numel() - 1
    T = a.shape[0]
    dtype = a.dtype
    prec = input_precision(dtype)
    has_bias = bias is not None
    bias_t = bias if has_bias else out
    bias_st = (bias.stride(0), bias.stride(1)) if has_bias else (0, 0)
    h_t = h if h is not None else out
    h_st = (h.stride(0), h.stride(1)) if h is not None else (0, 0)
    sbe, sbk, sbn = w_strides
    # N, K and the row strides go in divided by ALIGN (the kernel multiplies back)
    al = align_of(N, K, a.stride(0), sbe, sbn if b_trans else sbk, bias_st[0], out.stride(0),
                  h_st[0])
    cfg = _pick(kind, dtype, prec, act == ACT_SWIGLU, N, al, config)
    if b_trans:
        sbn //= al
    else:
        sbk //= al
    out_n = mm_output_columns(cfg, act, act_bwd)
    grid = ((triton.cdiv(T, cfg.BLOCK_M) + E) * triton.cdiv(N, out_n),)
    _grouped_mm_kernel[grid](
        a, weight, bias_t, out, h_t, perm, offsets, N // al, K // al,
        a.stride(0) // al, a.stride(1), sbe // al, sbk, sbn, bias_st[0] // al, bias_st[1],
        out.stride(0) // al, out.stride(1), h_st[0] // al, h_st[1],
        E=E, GATHER=gather, SCATTER=scatter, HAS_BIAS=has_bias, ACT=act, STORE_H=store_h,
        ACT_BWD=act_bwd, B_TRANS=b_trans, INPUT_PRECISION=prec, DOT_UPCAST=dot_upcast(dtype),
        ALIGN=al, EVEN=N % out_n == 0 and K % cfg.BLOCK_K == 0, BLOCK_M=cfg.BLOCK_M,
        BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=MM_GROUP_M, EPI_SPLIT=cfg.epilogue_split,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(kind, cfg))


WGRAD_CHUNK_ENV = "MMKERNELS_EXPERTS_WGRAD_CHUNK"
# the automatic token chunking aims at this many weight-gradient programs per SM, and never
# makes a chunk shorter than WGRAD_MIN_CHUNK tokens (each chunk adds one fp32 tile of atomics)
WGRAD_PROGRAMS_PER_SM = 4
WGRAD_MIN_CHUNK = 512


def wgrad_chunk_setting() -> int | None:
    """``MMKERNELS_EXPERTS_WGRAD_CHUNK``: ``None`` for ``auto`` (the default, see
    :func:`auto_wgrad_chunk`), ``0`` for one program per expert and tile (no atomics), or a
    positive token count per weight-gradient program."""
    raw = os.environ.get(WGRAD_CHUNK_ENV, "auto").strip()
    if raw.lower() == "auto":
        return None
    try:
        chunk = int(raw)
    except ValueError:
        raise ValueError(f"{WGRAD_CHUNK_ENV} must be 'auto' or a token count, got {raw!r}") from None
    if chunk < 0:
        raise ValueError(f"{WGRAD_CHUNK_ENV} must be >= 0, got {chunk}")
    return chunk


def auto_wgrad_chunk(T: int, E: int, expert_tiles: int, block_t: int, sm_count: int,
                     deterministic: bool) -> int:
    """Tokens per weight-gradient program when ``MMKERNELS_EXPERTS_WGRAD_CHUNK`` is ``auto``.

    ``T``: tokens; ``E``: experts; ``expert_tiles``: dW tiles of one expert
    (``cdiv(N, BLOCK_N) * cdiv(K, BLOCK_K)``); ``block_t``: tokens per reduction step;
    ``sm_count``: the GPU's multiprocessors (0: unknown, e.g. the interpreter).

    Without chunks, each program owns one dW tile and walks all of its expert's tokens. When
    the ``E * expert_tiles`` programs are fewer than ``WGRAD_PROGRAMS_PER_SM`` per SM, the
    experts' token counts decide the time: VLMo's image expert holds 5x the text expert's
    tokens, so its programs run 5x longer while the SMs that ran text tiles idle (dW_in of the
    VLMo FFN: 288 tiles on 132 SMs, 82 TFLOP/s on the H200). Then the tokens are cut into
    chunks giving about that many programs per SM (``T * expert_tiles / chunk`` of them),
    summed with fp32 atomics. Returns 0 (no chunks) when the grid has the waves to balance
    itself, when chunks would be shorter than ``WGRAD_MIN_CHUNK`` or cover every token, when
    the SM count is unknown, and under ``torch.use_deterministic_algorithms`` (atomics sum in
    a run-dependent order).
    """
    if deterministic or sm_count <= 0 or T <= 0:
        return 0
    target = WGRAD_PROGRAMS_PER_SM * sm_count
    if E * expert_tiles >= target:
        return 0
    chunk = -(-T * expert_tiles // target)
    chunk = -(-chunk // block_t) * block_t
    if chunk < WGRAD_MIN_CHUNK or chunk >= T:
        return 0
    return chunk


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (0 for any other device, e.g. the interpreter's CPU)."""
    if device.type != "cuda":
        return 0
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def wgrad_chunk(T: int, E: int, expert_tiles: int, block_t: int, device: torch.device) -> int:
    """Tokens per weight-gradient program for this launch (0: one program per expert and tile)."""
    setting = wgrad_chunk_setting()
    if setting is None:
        return auto_wgrad_chunk(T, E, expert_tiles, block_t, sm_count(device),
                                torch.are_deterministic_algorithms_enabled())
    return setting


def offsets_fit_int32(*tensors: torch.Tensor) -> bool:
    """Every element offset of every tensor (sum of (size - 1) * stride) is below 2**31."""
    return all(sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 0) < 2 ** 31
               for t in tensors)


def _grouped_wgrad(kind, a, x, dw, db, perm, offsets, *, config=None):
    """Launch ``_grouped_wgrad_kernel``: dw [E, N, K] (and db [E, N]) from a [T, N], x [T, K]."""
    gather_a, gather_x = _WGRAD_FLAGS[kind]
    E, N, K = dw.shape
    T = a.shape[0]
    prec = input_precision(a.dtype)
    has_bias = db is not None
    # widths and row strides of the given outputs and of the contiguous fp32 buffers the
    # chunked path sums into: one ALIGN for both, so the tiles do not depend on the path
    al = align_of(N, K, a.stride(0), x.stride(0), dw.stride(0), dw.stride(1),
                  db.stride(0) if has_bias else 0, N * K)
    cfg = _pick(kind, a.dtype, prec, False, N, al, config)
    chunk = wgrad_chunk(T, E, triton.cdiv(N, cfg.BLOCK_N) * triton.cdiv(K, cfg.BLOCK_K), cfg.BLOCK_T,
                        a.device)
    atomic = 0 < chunk < T
    # atomics accumulate in fp32 buffers (contiguous), converted to the gradients' dtype after
    dw_k = torch.zeros(dw.shape, dtype=torch.float32, device=dw.device) if atomic else dw
    db_k = (torch.zeros(db.shape, dtype=torch.float32, device=db.device) if atomic else db) if has_bias else None
    db_t = db_k if has_bias else dw_k
    db_st = (db_k.stride(0), db_k.stride(1)) if has_bias else (0, 0)
    swe, swn, swk = dw_k.stride()
    if atomic:
        chunk = triton.cdiv(chunk, cfg.BLOCK_T) * cfg.BLOCK_T
    else:
        chunk = max(T, 1)
    grid = (E * triton.cdiv(N, cfg.BLOCK_N) * triton.cdiv(K, cfg.BLOCK_K), triton.cdiv(max(T, 1), chunk))
    _grouped_wgrad_kernel[grid](
        a, x, dw_k, db_t, perm, offsets, N // al, K // al, chunk,
        a.stride(0) // al, a.stride(1), x.stride(0) // al, x.stride(1),
        swe // al, swn // al, swk, db_st[0] // al, db_st[1],
        E=E, GATHER_A=gather_a, GATHER_X=gather_x, HAS_BIAS=has_bias,
        INPUT_PRECISION=prec, DOT_UPCAST=dot_upcast(a.dtype), ALIGN=al, ATOMIC=atomic,
        EVEN=N % cfg.BLOCK_N == 0 and K % cfg.BLOCK_K == 0, ROW32=offsets_fit_int32(a, x),
        BLOCK_N=cfg.BLOCK_N,
        BLOCK_K=cfg.BLOCK_K, BLOCK_T=cfg.BLOCK_T, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **launch_options(kind, cfg))
    if atomic:
        dw.copy_(dw_k)
        if has_bias:
            db.copy_(db_k)


def _wt(w: torch.Tensor):
    """B = W_e^T of ``w [E, N, K]``: (stride_e, stride_k, stride_n)."""
    return (w.stride(0), w.stride(2), w.stride(1))


def _w(w: torch.Tensor):
    """B = W_e of ``w [E, K, N]``: (stride_e, stride_k, stride_n)."""
    return (w.stride(0), w.stride(1), w.stride(2))


def _empty(ref: torch.Tensor):
    return torch.empty(0, dtype=ref.dtype, device=ref.device)


def _act_code(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return ACT_CODES[activation]


def linear_fwd_triton(x, perm, offsets, weight, bias=None, *, config=None):
    """``y [T, Hout]`` (token order): ``y[t] = x[t] @ weight[e(t)]^T + bias[e(t)]``.

    ``config``: an :class:`MMConfig` (or dict kind -> config) forcing the tiles (tests).
    """
    _check(x, offsets)
    T, Hin = x.shape
    Hout = weight.shape[1]
    y = torch.empty((T, Hout), dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    _grouped_mm("linear_fwd", x, weight, _wt(weight), bias, y, None, perm, offsets, Hout, Hin,
                ACT_NONE, config=config)
    return y


def linear_bwd_triton(dy, x, perm, offsets, weight, bias, needs_dx, needs_dw, *, config=None):
    """``(dx [T, Hin] | empty(0), dw [E, Hout, Hin] | empty(0), db [E, Hout] | empty(0))``.

    ``db`` is computed with ``dw`` (``needs_dw``) when ``bias`` is given.
    """
    _check(x, offsets)
    T, Hin = x.shape
    E, Hout = weight.shape[0], weight.shape[1]
    dev = x.device
    dx, dw, db = _empty(x), _empty(weight), _empty(weight)
    if needs_dx:
        dx = torch.empty((T, Hin), dtype=x.dtype, device=dev)
        if T > 0:
            _grouped_mm("linear_bwd_dx", dy, weight, _w(weight), None, dx, None, perm, offsets,
                        Hin, Hout, ACT_NONE, config=config)
    if needs_dw:
        dw = torch.empty((E, Hout, Hin), dtype=weight.dtype, device=dev)
        if bias is not None:
            db = torch.empty((E, Hout), dtype=bias.dtype, device=dev)
        _grouped_wgrad("wgrad_linear", dy, x, dw, db if bias is not None else None, perm, offsets,
                       config=config)
    return dx, dw, db


def ffn_fwd_triton(x, perm, offsets, w_in, b_in, w_out, b_out, activation, *, config=None):
    """``(y [T, Hout] token order, h [T, Fi] sorted, a [T, F] sorted)``."""
    _check(x, offsets)
    act = _act_code(activation)
    T, Hin = x.shape
    Fi = w_in.shape[1]
    F = w_out.shape[2]
    Hout = w_out.shape[1]
    dev = x.device
    y = torch.empty((T, Hout), dtype=x.dtype, device=dev)
    h = torch.empty((T, Fi), dtype=x.dtype, device=dev)
    a = torch.empty((T, F), dtype=x.dtype, device=dev)
    if T == 0:
        return y, h, a
    _grouped_mm("ffn_fwd_in", x, w_in, _wt(w_in), b_in, a, h, perm, offsets, F, Hin, act,
                config=config)
    _grouped_mm("ffn_fwd_out", a, w_out, _wt(w_out), b_out, y, None, perm, offsets, Hout, F,
                ACT_NONE, config=config)
    return y, h, a


def ffn_bwd_triton(dy, x, perm, offsets, w_in, b_in, w_out, b_out, h, a, activation, *, config=None):
    """``(dx [T, Hin], dw_in [E, Fi, Hin], db_in [E, Fi] | empty(0), dw_out [E, Hout, F],
    db_out [E, Hout] | empty(0))`` (bias gradients when the bias is given)."""
    _check(x, offsets)
    act = _act_code(activation)
    T, Hin = x.shape
    E, Fi = w_in.shape[0], w_in.shape[1]
    Hout, F = w_out.shape[1], w_out.shape[2]
    dev = x.device
    dx = torch.empty((T, Hin), dtype=x.dtype, device=dev)
    dw_in = torch.empty((E, Fi, Hin), dtype=w_in.dtype, device=dev)
    dw_out = torch.empty((E, Hout, F), dtype=w_out.dtype, device=dev)
    db_in = torch.empty((E, Fi), dtype=b_in.dtype, device=dev) if b_in is not None else None
    db_out = torch.empty((E, Hout), dtype=b_out.dtype, device=dev) if b_out is not None else None
    dh = torch.empty((T, Fi), dtype=x.dtype, device=dev)
    if T > 0:
        # dh = (dy @ W_out_e) * act'(h), in sorted order
        _grouped_mm("ffn_bwd_dh", dy, w_out, _w(w_out), None, dh, h, perm, offsets, F, Hout, act,
                    config=config)
        _grouped_mm("ffn_bwd_dx", dh, w_in, _w(w_in), None, dx, None, perm, offsets, Hin, Fi,
                    ACT_NONE, config=config)
    _grouped_wgrad("wgrad_ffn_out", dy, a, dw_out, db_out, perm, offsets, config=config)
    _grouped_wgrad("wgrad_ffn_in", dh, x, dw_in, db_in, perm, offsets, config=config)
    return (dx, dw_in, db_in if db_in is not None else _empty(w_in), dw_out,
            db_out if db_out is not None else _empty(w_out))


# ---------------------------------------------------------------------------
# Compile tier support: the exact specialisation a launch would produce
# ---------------------------------------------------------------------------

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


def compile_specs(kind: str, dtype: torch.dtype, input_precision: str, config=None,
                  activation: str | None = None, has_bias: bool = False, E: int = 2,
                  sizes: tuple[int, int, int] = (4096, 1024, 4096), atomic: bool = False,
                  row32: bool = True):
    """(kernel, signature, constexprs, divisible_by_16) for mmkernels.testing.sm90.

    Describes launch ``kind`` with contiguous tensors and 16-byte aligned buffers, as Triton
    would specialise it (ints equal to 1 become constexprs, ints divisible by 16 get the
    divisibility hint).  ``sizes = (T, H, F)``: tokens, model width (Hin = Hout) and FFN width
    (pass widths that are not multiples of 16 to compile the unaligned specialisation).
    ``activation``: for ffn_fwd_in / ffn_bwd_dh (else no activation); ``config``: MMConfig or
    WGradConfig (unused for "route"); ``atomic``: the token-chunked weight gradient
    (``MMKERNELS_EXPERTS_WGRAD_CHUNK``), fp32 atomics into fp32 buffers; ``row32``: the weight
    gradient's int32 row offsets (False: int64, for inputs past 2**31 elements).
    """
    from ..testing.sm90 import launch_signature
    ptr = _PTR[dtype]
    T, H, F = sizes
    if kind == "route":
        sig = {"ids_ptr": "*i64", "perm_ptr": "*i32", "offsets_ptr": "*i32"}
        constexprs = {"E": E, "E_PAD": max(2, triton.next_power_of_2(E)), "BLOCK": ROUTE_BLOCK}
        return (_route_kernel, *launch_signature(sig, {"T": T}, constexprs))
    if kind == "route_split":  # VLMo-like: 64 samples of 237 tokens split at 40
        sig = {"perm_ptr": "*i32", "offsets_ptr": "*i32"}
        return (_route_split_kernel,
                *launch_signature(sig, {"B": 64, "S": 237, "P": 40}, {"BLOCK": SPLIT_BLOCK}))
    if kind in MM_KINDS:
        gather, scatter, store_h, act_bwd, transposed = _MM_FLAGS[kind]
        act = ACT_NONE if activation is None else ACT_CODES[activation]
        swiglu = act == ACT_SWIGLU
        Fi = 2 * F if swiglu else F
        # (A width K, output width N, weight [E, rows, cols], out width, h width)
        shapes = {
            "linear_fwd": (H, H, (H, H), H, 0),
            "linear_bwd_dx": (H, H, (H, H), H, 0),
            "ffn_fwd_in": (H, F, (Fi, H), F, Fi),
            "ffn_fwd_out": (F, H, (H, F), H, 0),
            "ffn_bwd_dh": (H, F, (H, F), Fi, Fi),
            "ffn_bwd_dx": (Fi, H, (Fi, H), H, 0),
        }
        K, N, (wr, wc), out_w, h_w = shapes[kind]
        if transposed:  # B = W^T: k runs along the weight's columns
            w_st = (wr * wc, 1, wc)
        else:
            w_st = (wr * wc, wc, 1)
        hb = has_bias and kind in ("linear_fwd", "ffn_fwd_in", "ffn_fwd_out")
        bias_w = wr if hb else 0
        al = align_of(N, K, K, w_st[0], w_st[2] if transposed else w_st[1], bias_w, out_w, h_w)
        w_st = (w_st[0] // al, w_st[1] // (1 if transposed else al), w_st[2] // (al if transposed else 1))
        sig = {"a_ptr": ptr, "b_ptr": ptr, "bias_ptr": ptr, "out_ptr": ptr, "h_ptr": ptr,
               "perm_ptr": "*i32", "offsets_ptr": "*i32"}
        ints = {"N": N // al, "K": K // al, "stride_am": K // al, "stride_ak": 1,
                "stride_be": w_st[0], "stride_bk": w_st[1], "stride_bn": w_st[2],
                "stride_biase": bias_w // al, "stride_biasn": 1 if hb else 0,
                "stride_om": out_w // al, "stride_on": 1,
                "stride_hm": h_w // al, "stride_hn": 1 if h_w else 0}
        constexprs = {"E": E, "GATHER": gather, "SCATTER": scatter, "HAS_BIAS": hb, "ACT": act,
                      "STORE_H": store_h, "ACT_BWD": act_bwd, "B_TRANS": transposed,
                      "INPUT_PRECISION": input_precision, "DOT_UPCAST": False, "ALIGN": al,
                      "EVEN": (N % mm_output_columns(config, act, act_bwd) == 0
                               and K % config.BLOCK_K == 0),
                      "BLOCK_M": config.BLOCK_M, "BLOCK_N": config.BLOCK_N,
                      "BLOCK_K": config.BLOCK_K, "GROUP_M": MM_GROUP_M,
                      "EPI_SPLIT": config.epilogue_split}
        return (_grouped_mm_kernel, *launch_signature(sig, ints, constexprs))
    if kind in WGRAD_KINDS:
        gather_a, gather_x = _WGRAD_FLAGS[kind]
        # (N = A width, K = X width)
        N, K = {"wgrad_linear": (H, H), "wgrad_ffn_out": (H, F), "wgrad_ffn_in": (F, H)}[kind]
        out_ptr = "*fp32" if atomic else ptr
        sig = {"a_ptr": ptr, "x_ptr": ptr, "dw_ptr": out_ptr, "db_ptr": out_ptr, "perm_ptr": "*i32",
               "offsets_ptr": "*i32"}
        al = align_of(N, K)
        ints = {"N": N // al, "K": K // al, "chunk": 2048 if atomic else T,
                "stride_am": N // al, "stride_an": 1,
                "stride_xm": K // al, "stride_xk": 1,
                "stride_we": N * K // al, "stride_wn": K // al, "stride_wk": 1,
                "stride_dbe": N // al if has_bias else 0, "stride_dbn": 1 if has_bias else 0}
        constexprs = {"E": E, "GATHER_A": gather_a, "GATHER_X": gather_x, "HAS_BIAS": bool(has_bias),
                      "INPUT_PRECISION": input_precision, "DOT_UPCAST": False, "ALIGN": al,
                      "ATOMIC": bool(atomic), "EVEN": N % config.BLOCK_N == 0 and K % config.BLOCK_K == 0,
                      "ROW32": row32,
                      "BLOCK_N": config.BLOCK_N, "BLOCK_K": config.BLOCK_K,
                      "BLOCK_T": config.BLOCK_T}
        return (_grouped_wgrad_kernel, *launch_signature(sig, ints, constexprs))
    raise ValueError(f"unknown kernel kind {kind!r}")
