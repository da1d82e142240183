"""Triton grouped weight gradient of the modality experts, with the bias gradient:
``grouped_wgrad_kernel``, launched by ``launch``.
"""

import triton
import triton.language as tl

from .jit_mm import round_bf16


@triton.jit
def _wgrad_load(a_ptr, x_ptr, perm_ptr, t0, hi, ns64, n_ok, ks64, k_ok,
                stride_am, stride_an, stride_xm, stride_xk,
                GATHER_A: tl.constexpr, GATHER_X: tl.constexpr, MASK_T: tl.constexpr,
                EVEN: tl.constexpr, ROW32: tl.constexpr, BLOCK_T: tl.constexpr):
    """One reduction step's tiles: ``(A^T [BLOCK_N, BLOCK_T], X [BLOCK_T, BLOCK_K])`` for the
    slots ``t0 ..`` (rows read through ``perm`` where gathered). Masks only what may fall
    outside: slots ``>= hi`` when ``MASK_T`` (the last, partial step), dW rows/columns unless
    ``EVEN`` (the tile divides N and K). Row offsets in int32 when ``ROW32`` (int64 offsets
    take several more instructions per gathered row)."""
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
    when ``EVEN``); a partial last step follows it, masked (masks are issue overhead in every
    step).

    ``db`` for 16-bit inputs is a second, 16-column MMA of the same A tile against ones (exact
    products, fp32 sums; column 0 is kept). A row sum of the tile in the loop costs a cross-warp
    reduction through shared memory every step instead. fp32 keeps the row sum: under tf32 the
    MMA would round A to 10 mantissa bits.
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
            acc = round_bf16(acc)
            dbacc = round_bf16(dbacc)
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])
        if WITH_DB:
            tl.store(db_ptrs, dbacc.to(db_ptr.dtype.element_ty), mask=db_ok)


@triton.jit
def grouped_wgrad_kernel(
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

    Grid ``(E * tiles_n * tiles_k, cdiv(T, chunk))`` (one chunk without ``ATOMIC``).
    ``A`` and ``X`` are each read through ``perm`` or directly (``GATHER_A``, ``GATHER_X``); each
    program loops over its expert's slots in ``BLOCK_T`` steps (bounds loaded from ``offsets``).
    The programs with ``k``-tile 0 also write the bias gradient (16-bit inputs: a 16-column MMA
    of the A tile against ones; fp32: a row sum). Experts with no tokens get zeros. When the
    ``E * tiles_n * tiles_k`` programs cannot fill the GPU, the second grid axis cuts each
    expert's tokens into equal chunks summed with fp32 atomics (``auto_wgrad_chunk``).

    ``N``, ``K``, ``stride_am``, ``stride_xm``, ``stride_we``, ``stride_wn`` and ``stride_dbe``
    arrive divided by ``ALIGN`` (see ``grouped_mm_kernel``). With ``ATOMIC``, program
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
    # its own for those programs, two loops under a branch, needs enough registers to leave one
    # program per SM instead of two; the 16-column db MMA costs the others 1/8 more
    # tensor-core work instead.)
    acc, dbacc = _wgrad_accumulate(
        a_ptr, x_ptr, perm_ptr, lo, hi, ns64, n_ok, ks64, k_ok, stride_am, stride_an, stride_xm,
        stride_xk, GATHER_A, GATHER_X, HAS_BIAS, INPUT_PRECISION, DOT_UPCAST, EVEN, ROW32,
        BLOCK_N, BLOCK_K, BLOCK_T)
    # the db rows to write: those below N in k-tile 0, none in the others. One comparison of
    # the row block against a scalar bound, so the mask is an int1 block from the start (a
    # scalar condition splat into a block mask reaches Triton's interpreter as int32 data,
    # which the masked loads and stores of Triton 3.9's interpreter reject)
    db_ok = ns < tl.where(pk == 0, N, 0)
    _wgrad_store(dw_ptr, db_ptr, e.to(tl.int64), ns64, n_ok, ks64, k_ok, stride_we,
                 stride_wn, stride_wk, stride_dbe, stride_dbn, acc, dbacc, db_ok,
                 HAS_BIAS, ATOMIC, DOT_UPCAST)
