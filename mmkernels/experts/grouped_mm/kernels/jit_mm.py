"""Triton grouped GEMM of the modality experts with its fused epilogues (bias, activation,
swiglu, activation backward): ``grouped_mm_kernel``, launched by ``launch``.
"""

import triton
import triton.language as tl


@triton.jit
def round_bf16(x):
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
        # s (1 + 2 h sigmoid(-z) beta (1 + 3 kappa h^2)), s = sigmoid(z), z = 2 beta (h + kappa h^3):
        # both sigmoids from one exp(-|z|), so 1 - s (or 1 - tanh^2) is never formed by cancellation
        h2 = h * h
        z = 1.5957691216057308 * (h + 0.044715 * h2 * h)
        e = tl.exp(-tl.abs(z))
        r = 1.0 / (1.0 + e)
        s = tl.where(z >= 0.0, r, e * r)
        sm = tl.where(z >= 0.0, e * r, r)
        out = s * (1.0 + 2.0 * h * sm * (0.7978845608028654 * (1.0 + 0.134145 * h2)))
    elif ACT == 3:
        s = tl.sigmoid(h)
        out = s * (1.0 + h * (1.0 - s))
    elif ACT == 4:
        out = tl.where(h > 0.0, 1.0, 0.0)
    else:
        out = tl.full(h.shape, 1.0, tl.float32)
    return out


@triton.jit
def grouped_mm_kernel(
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

    Grid ``((cdiv(T, BLOCK_M) + E) * cdiv(N, OUT_N),)`` (``OUT_N`` = ``BLOCK_N``, half of it for
    the swiglu forward: ``mm_output_columns``). The slots of expert ``e`` are
    ``offsets[e] .. offsets[e+1]-1``. The row tiles of all experts are numbered one after the
    other (an expert with ``n`` slots has ``cdiv(n, BLOCK_M)`` of them; their total is at most
    ``cdiv(T, BLOCK_M) + E - 1``); program ``m`` finds its expert by scanning ``offsets``
    (``E <= 8``, a constexpr) and returns when it has no tile. The flat program id maps to
    (row tile, column tile) in groups of ``GROUP_M`` row tiles, column tiles fastest inside a
    group (L2 reuse of the A rows). The input row is read through ``perm`` (``GATHER``: row
    ``perm[s]`` of a token-order tensor) or directly (slot ``s`` of a sorted-order tensor); the
    output row likewise (``SCATTER``). ``B_e`` is read from a weight ``[E, *, *]`` with explicit
    strides, so one kernel computes ``x @ W_e^T`` (forward) and ``dy @ W_e`` (backward ``dx``).

    Epilogues (constexpr ``ACT``/``STORE_H``/``ACT_BWD``): bias add; gelu (erf) / gelu_tanh /
    silu / relu, storing the pre-activation ``h`` as well when asked; swiglu with one B tile of
    ``BLOCK_N / 2`` gate columns ``n`` and the matching up columns ``N + n`` (one MMA; the
    accumulator's halves are gate and up; output ``silu(gate) * up``, ``h`` gets both halves);
    and the activation's backward: ``dh = da * act'(h)`` reading ``h``, for swiglu both halves
    of ``dh [T, 2F]`` from a ``da [T, F]`` tile. The epilogue may run on 2 or 4 column slices of
    the tile in turn (``EPI_SPLIT``, ``MMConfig.epilogue_split``): fewer registers live at once,
    so the activation launches take 128 x 128 tiles at two programs per SM.

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
    # the weight columns of GROUP_M tiles; plain row-major order re-reads a wide A once per
    # wave of column tiles
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
        # EVEN (the tiles divide N and K): only the row mask, loop-invariant (masks cost issue
        # slots in every step)
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
    # temporaries (activation, h loads, 64-bit row addresses) then live for a slice at a time,
    # so 128 x 128 tiles with an activation keep two programs per SM
    if DUAL:
        acc, acc_up = _split_columns(acc, BLOCK_M, BLOCK_N)  # gate, up: [BLOCK_M, OUT_N]
    else:
        acc_up = acc  # unread by the epilogue
    bias_row = bias_ptr + expert.to(tl.int64) * stride_biase
    if EPI_SPLIT == 1:
        _mm_epilogue(acc, acc_up, col0, row_ok, slot64, dst, bias_row, out_ptr, h_ptr, N,
                     stride_biasn, stride_om, stride_on, stride_hm, stride_hn, HAS_BIAS, ACT,
                     STORE_H, ACT_BWD, DUAL, DOT_UPCAST, OUT_N)
    elif EPI_SPLIT == 2:
        _mm_epilogue_halves(acc, acc_up, col0, row_ok, slot64, dst, bias_row, out_ptr, h_ptr, N,
                            stride_biasn, stride_om, stride_on, stride_hm, stride_hn, HAS_BIAS,
                            ACT, STORE_H, ACT_BWD, DUAL, DOT_UPCAST, BLOCK_M, OUT_N)
    else:  # four slices: each half of the tile in two halves
        tl.static_assert(EPI_SPLIT == 4, "EPI_SPLIT: 1, 2 or 4")
        HALF: tl.constexpr = OUT_N // 2
        c0, c1 = _split_columns(acc, BLOCK_M, OUT_N)
        u0, u1 = c0, c1
        if DUAL:
            u0, u1 = _split_columns(acc_up, BLOCK_M, OUT_N)
        _mm_epilogue_halves(c0, u0, col0, row_ok, slot64, dst, bias_row, out_ptr, h_ptr, N,
                            stride_biasn, stride_om, stride_on, stride_hm, stride_hn, HAS_BIAS,
                            ACT, STORE_H, ACT_BWD, DUAL, DOT_UPCAST, BLOCK_M, HALF)
        _mm_epilogue_halves(c1, u1, col0 + HALF, row_ok, slot64, dst, bias_row, out_ptr, h_ptr,
                            N, stride_biasn, stride_om, stride_on, stride_hm, stride_hn, HAS_BIAS,
                            ACT, STORE_H, ACT_BWD, DUAL, DOT_UPCAST, BLOCK_M, HALF)


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
            hv = round_bf16(hv)
        tl.store(h_ptrs, hv.to(h_ptr.dtype.element_ty), mask=msk)
        if DUAL:
            hu = acc_up
            if DOT_UPCAST:
                hu = round_bf16(hu)
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
                dgate = round_bf16(dgate)
                dup = round_bf16(dup)
            tl.store(out_ptrs, dgate.to(out_ptr.dtype.element_ty), mask=msk)
            tl.store(out_ptrs + N * stride_on, dup.to(out_ptr.dtype.element_ty), mask=msk)
        else:
            hv = tl.load(h_ptrs, mask=msk, other=0.0).to(tl.float32)
            dh = acc * _act_grad(hv, ACT)
            if DOT_UPCAST:
                dh = round_bf16(dh)
            tl.store(out_ptrs, dh.to(out_ptr.dtype.element_ty), mask=msk)
    else:
        if DUAL:
            res = acc * tl.sigmoid(acc) * acc_up
        else:
            res = _act_fwd(acc, ACT)
        if DOT_UPCAST:
            res = round_bf16(res)
        tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=msk)
