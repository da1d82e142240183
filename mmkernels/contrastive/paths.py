"""The contrastive family's paths built from PyTorch's own ops, beside the kernels.

* ``"blockwise"``: the logits ``L = scale * q @ k.T`` in blocks of rows, each block a cuBLAS
  GEMM (``torch.mm``) into an fp32 ``[rows, M]`` buffer sized by the option ``memory_budget``;
  the log-sum-exp / softmax / gradient arithmetic of a block is one light Triton kernel on CUDA
  (``kernels/blockwise.py``) and torch ops on the CPU. It is a backend of the registered ops
  ``mmkernels::contrastive_stats`` / ``contrastive_grads`` (``backend="blockwise"``), so it
  returns exactly their seven statistics and three gradients, and shares their autograd and
  ``torch.compile`` support. Memory: O(N * D) plus one block.
* ``"materialized"``: the whole ``N x M`` logits in the features' dtype, cross-entropies and
  autograd, as OpenCLIP's ``ClipLoss`` computes them; eligible only where its ``N x M`` tensors
  fit within ``memory_budget``.

:func:`shape_class` names a call's case for the dispatch table, :func:`eligibility` says which
of these paths can run it (``mmkernels/_dispatch.py`` chooses).
"""
from __future__ import annotations

import torch

from .. import _backend, _dispatch
from .ops import stats_dtype

BLOCKWISE = "blockwise"
MATERIALIZED = "materialized"
PATHS = (BLOCKWISE, MATERIALIZED)

#: shape classes by the number of logits N * M: up to 2**24 (N = M = 4096), where launch and
#: host overheads weigh; up to 2**28 (16384); beyond, where the products dominate.
SHAPE_CLASSES = ("nm<=2^24", "nm<=2^28", "nm>2^28")
ARITHMETICS = ("torch", "triton")

_NEG_INF = float("-inf")


def shape_class(n: int, m: int, d: int) -> str:
    """The dispatch table's shape class of an ``[n, d] x [m, d]`` problem (by ``n * m``)."""
    nm = int(n) * int(m)
    if nm <= 1 << 24:
        return SHAPE_CLASSES[0]
    if nm <= 1 << 28:
        return SHAPE_CLASSES[1]
    return SHAPE_CLASSES[2]


# ----------------------------------------------------------------------------- memory

def materialized_bytes(n: int, m: int, dtype: torch.dtype, *, symmetric: bool,
                       loss_dtype: torch.dtype | None = None) -> int:
    """Bytes of the ``N x M`` tensors the materialized path holds at its peak (fwd + bwd).

    Symmetric loss: the product, the scaled logits, two log-softmax outputs (rows, columns),
    their two gradients, their sum and the product's gradient, and the product of that with
    the logits for ``dscale``: 9 tensors in the features' dtype. One direction: 6. When the
    cross-entropy runs in float32 on 16-bit logits (autocast), its log-softmax outputs and
    gradients are float32 copies: 4 more (2 for one direction) at 4 bytes.
    """
    nm = int(n) * int(m)
    item = torch.empty((), dtype=dtype).element_size()
    count = 9 if symmetric else 6
    total = count * nm * item
    if loss_dtype is not None and loss_dtype != dtype:
        total += (4 if symmetric else 2) * nm * torch.empty((), dtype=loss_dtype).element_size()
    return total


def block_bytes_per_logit(device: torch.device, dtype: torch.dtype, arith: str) -> int:
    """Bytes one logit of a blockwise block costs, forward or backward, whichever is more.

    Triton arithmetic: the fp32 product block plus ``scale * G`` (input dtype; fp32 for
    fp16, whose GEMMs then run in fp32). Torch arithmetic: the product block plus up to three
    temporaries of the statistics dtype (exponentials, G, their products).
    """
    sd = torch.empty((), dtype=stats_dtype(dtype)).element_size()
    if arith == "triton":
        g = 4 if dtype in (torch.float16, torch.float32) else torch.empty((), dtype=dtype).element_size()
        return sd + g
    return 4 * sd


def block_rows(n: int, m: int, bytes_per_logit: int, budget: int | None = None) -> int:
    """Rows per blockwise block: as many as keep one ``[rows, m]`` block within ``budget``
    bytes (default the option ``memory_budget``), at least 1, at most ``n``."""
    budget = _dispatch.memory_budget() if budget is None else int(budget)
    rows = budget // max(1, int(m) * int(bytes_per_logit))
    return int(max(1, min(max(int(n), 1), rows)))


def default_arith(device: torch.device, dtype: torch.dtype) -> str:
    """The blockwise arithmetic: the light Triton kernels on CUDA (float64 excepted), torch ops
    elsewhere."""
    if device.type == "cuda" and dtype != torch.float64:
        from .. import _backend
        if _backend.TRITON_AVAILABLE:
            return "triton"
    return "torch"


def eligibility(q: torch.Tensor, k: torch.Tensor, *, symmetric: bool,
                loss_dtype: torch.dtype | None = None) -> dict[str, str | None]:
    """``{path: None if it can run this call, else why not}`` for ``blockwise`` and
    ``materialized`` (the kernels are the dispatcher's business)."""
    n, m = q.shape[0], k.shape[0]
    budget = _dispatch.memory_budget()
    need = materialized_bytes(n, m, q.dtype, symmetric=symmetric, loss_dtype=loss_dtype)
    why_mat = None
    if need > budget:
        why_mat = (f"its {n} x {m} logits need {need / 2**20:.1f} MiB, over memory_budget "
                   f"{budget / 2**20:.1f} MiB")
    return {BLOCKWISE: None, MATERIALIZED: why_mat}


# ----------------------------------------------------------------------------- blockwise

_MM_F32: dict[str, bool] = {}


def _mm_has_out_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` on ``device``
    (probed once; nothing is read back, so no host synchronisation)."""
    key = f"{device.type}/{dtype}"
    if key not in _MM_F32:
        ok = False
        if device.type == "cuda":
            a = torch.zeros(16, 16, dtype=dtype, device=device)
            try:
                ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
            except Exception:  # a torch without mm(..., out_dtype=)
                ok = False
        _MM_F32[key] = ok
    return _MM_F32[key]


class _Operands:
    """q and k as the block GEMMs take them, and how a product reaches the statistics dtype.

    float32/float64: as given. 16-bit on CUDA with ``mm(out_dtype=float32)``: as given, fp32
    results. bfloat16 on a CPU with bf16 dot products (``rounded``, ``_backend.cpu_bf16_gemm``):
    as given, the bf16 GEMM (fp32 accumulation, several times faster there) with its result
    rounded to bf16, as eager bf16 code computes its logits; G is rounded to bf16 for the
    backward's GEMMs. Otherwise (fp16 on the CPU, or an older torch) float32 copies
    (O((N + M) * D)), so every product is exact fp32 arithmetic on the rounded inputs.
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, *, exact: bool = False):
        self.sd = stats_dtype(q.dtype)
        # exact: fp32 products always (the Triton kernels' backward on CPU tensors, i.e. the
        # interpreter, computes what they compute on a GPU)
        self.rounded = (q.dtype == torch.bfloat16 and q.device.type == "cpu" and not exact
                        and _backend.cpu_bf16_gemm())
        self.native = q.dtype == self.sd or self.rounded or _mm_has_out_dtype(q.device, q.dtype)
        if self.native:
            self.q, self.k = q, k
        else:
            self.q, self.k = q.to(self.sd), k.to(self.sd)

    def product(self, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """``q[r0:r1] @ k.T`` in the statistics dtype (into ``out`` when given)."""
        a, b = self.q[r0:r1], self.k.t()
        if a.dtype == self.sd:
            return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
        if self.rounded:
            res = torch.mm(a, b)
            return res.to(self.sd) if out is None else out.copy_(res)
        res = torch.mm(a, b, out_dtype=self.sd)
        if out is None:
            return res
        out.copy_(res)
        return out

    def grad_products(self, G: torch.Tensor, r0: int, r1: int, dq: torch.Tensor,
                      dk_acc: torch.Tensor) -> None:
        """``dq[r0:r1] = G @ k`` and ``dk_acc += G.T @ q[r0:r1]`` for one block's ``scale * G``
        (statistics dtype)."""
        if self.rounded:
            Gb = G.to(self.q.dtype)
            torch.mm(Gb, self.k, out=dq[r0:r1]) if dq.dtype == Gb.dtype else dq[r0:r1].copy_(torch.mm(Gb, self.k))
            dk_acc.add_(torch.mm(Gb.t(), self.q[r0:r1]))
            return
        dq[r0:r1] = torch.mm(G, self.k).to(dq.dtype)
        dk_acc.addmm_(G.t(), self.q[r0:r1])


def _shift(m: torch.Tensor) -> torch.Tensor:
    """The maxima where finite, else 0: what the statistics are relative to."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """``x`` with -inf (an empty maximum) replaced by 0, so ``x - max`` never is -inf - -inf."""
    return torch.where(x == _NEG_INF, torch.zeros_like(x), x)


def blockwise_stats(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, targets: torch.Tensor,
                    with_columns: bool, *, arith: str | None = None, rows: int | None = None):
    """The seven statistics of ``ops.contrastive_stats`` from row blocks of the logits (each row
    and column relative to its max).

    ``arith``: ``"torch"`` or ``"triton"`` (default :func:`default_arith`); ``rows`` forces the
    rows per block (default :func:`block_rows` under the option ``memory_budget``).
    """
    arith = arith or default_arith(q.device, q.dtype)
    if arith not in ARITHMETICS:
        raise ValueError(f"blockwise arithmetic must be one of {ARITHMETICS}, got {arith!r}")
    N, M = q.shape[0], k.shape[0]
    dev, sd = q.device, stats_dtype(q.dtype)
    scale = scale.detach().to(device=dev, dtype=sd).reshape(())
    row_lse, row_max, row_sum, pos = (torch.empty(N, dtype=sd, device=dev) for _ in range(4))
    mc = M if with_columns else 0
    col_max = torch.full((mc,), _NEG_INF, dtype=sd, device=dev)
    col_d = torch.zeros(mc, dtype=sd, device=dev)
    col_sum = torch.zeros(mc, dtype=sd, device=dev)
    if N == 0 or M == 0:
        row_lse.fill_(_NEG_INF)
        row_max.fill_(_NEG_INF)
        row_sum.zero_()
        pos.zero_()
        col_lse = torch.where(col_d > 0, col_d.log(), torch.full_like(col_d, _NEG_INF))
        return row_lse, row_max, row_sum, pos, col_lse, col_max, col_sum
    ops = _Operands(q, k, exact=arith == "triton")
    B = rows or block_rows(N, M, block_bytes_per_logit(dev, q.dtype, arith))
    buf = torch.empty(min(B, N), M, dtype=sd, device=dev)
    if arith == "triton":
        from .kernels import blockwise as bk
    col_shift = 0.0  # the shift before any row is merged
    for r0 in range(0, N, B):
        r1 = min(N, r0 + B)
        S = ops.product(r0, r1, out=buf[: r1 - r0])
        if arith == "triton":
            bk.block_stats(S, scale, targets[r0:r1], row_lse[r0:r1], row_max[r0:r1],
                           row_sum[r0:r1], pos[r0:r1], col_max, col_d, col_sum, with_columns,
                           rows_before=r0)
            continue
        L = S.mul_(scale)
        rmax = L.amax(1)
        use = _finite_or_zero(rmax)
        row_max[r0:r1] = rmax
        pos[r0:r1] = L.gather(1, targets[r0:r1, None])[:, 0]
        if with_columns:
            new_max = torch.maximum(col_max, L.amax(0))
            cuse = _finite_or_zero(new_max)
            col_d.mul_(torch.exp(col_max - cuse))
            # the running sum of L - max moves with the max: r0 rows were merged before
            col_sum.add_(col_shift - cuse, alpha=r0)
            col_shift = cuse
            col_max.copy_(new_max)
            shifted = L - cuse[None, :]
            col_d.add_(torch.exp(shifted).sum(0))
            col_sum.add_(shifted.sum(0))
        shifted = L.sub_(use[:, None])
        row_sum[r0:r1] = shifted.sum(1)
        row_lse[r0:r1] = shifted.exp_().sum(1).log()
    col_lse = col_d.log()
    return row_lse, row_max, row_sum, pos, col_lse, col_max, col_sum


def blockwise_grads(q, k, scale, targets, row_max, row_lse, col_max, col_lse, g_row_lse, g_row_sum,
                    g_pos, g_col_lse, g_col_sum, *, arith: str | None = None,
                    rows: int | None = None):
    """``(dq, dk, dscale)`` of ``ops.contrastive_grads`` from row blocks of the logits.

    Per block: the product ``S`` (a GEMM), then ``G`` and ``scale * G`` (one light kernel, or
    torch ops), then ``dq = scale * G @ k`` and ``dk += scale * G.T @ q`` (GEMMs). ``dscale =
    sum(G * S)`` is summed per row inside the same arithmetic, never in another N x M pass.
    """
    arith = arith or default_arith(q.device, q.dtype)
    if arith not in ARITHMETICS:
        raise ValueError(f"blockwise arithmetic must be one of {ARITHMETICS}, got {arith!r}")
    N, D = q.shape
    M = k.shape[0]
    dev, sd = q.device, stats_dtype(q.dtype)
    with_columns = col_lse.numel() > 0
    scale = scale.detach().to(device=dev, dtype=sd).reshape(())
    # incoming gradients are often expanded (stride 0): the light kernels index them
    # contiguously, so make them so (O(N + M))
    row_max, row_lse, g_row_lse, g_row_sum, g_pos = (
        v.to(sd).contiguous() for v in (row_max, row_lse, g_row_lse, g_row_sum, g_pos))
    if with_columns:
        col_max, col_lse, g_col_lse, g_col_sum = (
            v.to(sd).contiguous() for v in (col_max, col_lse, g_col_lse, g_col_sum))
    dq = torch.empty(N, D, dtype=q.dtype, device=dev)
    dk_acc = torch.zeros(M, D, dtype=sd, device=dev)
    if N == 0 or M == 0:
        dq.zero_()
        return dq, dk_acc.to(k.dtype), torch.zeros((), dtype=sd, device=dev)
    ops = _Operands(q, k, exact=arith == "triton")
    B = rows or block_rows(N, M, block_bytes_per_logit(dev, q.dtype, arith))
    buf = torch.empty(min(B, N), M, dtype=sd, device=dev)
    if arith == "triton":
        from .kernels import blockwise as bk
        # scale * G in the input dtype for bf16 (cuBLAS accumulates in fp32); fp32 for fp16,
        # whose small gradients would fall into fp16's subnormal range, and for fp32
        g_dtype = q.dtype if q.dtype == torch.bfloat16 and ops.native and not ops.rounded else sd
        g_buf = torch.empty(min(B, N), M, dtype=g_dtype, device=dev)
        ds_rows = torch.empty(N, dtype=sd, device=dev)
        qg = ops.q if g_dtype == ops.q.dtype else q.to(g_dtype)
        kg = ops.k if g_dtype == ops.k.dtype else k.to(g_dtype)
    else:
        ds = torch.zeros((), dtype=sd, device=dev)
    cols = slice(None) if with_columns else None
    if arith != "triton":
        row_shift = _shift(row_max)
        col_shift = _shift(col_max) if with_columns else None
    for r0 in range(0, N, B):
        r1 = min(N, r0 + B)
        S = ops.product(r0, r1, out=buf[: r1 - r0])
        if arith == "triton":
            G = g_buf[: r1 - r0]
            bk.block_grad(S, G, scale, targets[r0:r1], row_max[r0:r1], row_lse[r0:r1],
                          g_row_lse[r0:r1], g_row_sum[r0:r1], g_pos[r0:r1],
                          col_max if with_columns else None, col_lse if with_columns else None,
                          g_col_lse if with_columns else None,
                          g_col_sum if with_columns else None, ds_rows[r0:r1])
            _dq_dk(G, qg, kg, r0, r1, dq, dk_acc)
            continue
        b = r1 - r0
        L = S * scale
        G = torch.exp((L - row_shift[r0:r1, None]) - row_lse[r0:r1, None]).mul_(g_row_lse[r0:r1, None])
        G.add_(g_row_sum[r0:r1, None])
        G[torch.arange(b, device=dev), targets[r0:r1]] += g_pos[r0:r1]
        if cols is not None:
            G.add_(torch.exp((L - col_shift[None, :]) - col_lse[None, :]).mul_(g_col_lse[None, :]))
            G.add_(g_col_sum[None, :])
        ds += torch.sum(S.mul_(G))
        G.mul_(scale)
        ops.grad_products(G, r0, r1, dq, dk_acc)
    if arith == "triton":
        ds = ds_rows.sum()
    return dq, dk_acc.to(k.dtype), ds


def _dq_dk(G, qg, kg, r0, r1, dq, dk_acc):
    """``dq[r0:r1] = G @ k`` and ``dk += G.T @ q[r0:r1]`` for ``G = scale * G`` of one block."""
    if G.dtype == dk_acc.dtype:
        torch.mm(G, kg, out=dq[r0:r1]) if dq.dtype == G.dtype else dq[r0:r1].copy_(torch.mm(G, kg))
        dk_acc.addmm_(G.t(), qg[r0:r1])
        return
    # bf16 G with fp32 results from cuBLAS
    torch.mm(G, kg, out=dq[r0:r1])
    dk_acc.add_(torch.mm(G.t(), qg[r0:r1], out_dtype=dk_acc.dtype))


# ----------------------------------------------------------------------------- materialized

def materialized_contrastive(image_features, text_features, scale, bias, *, label_smoothing,
                             reduction, return_stats):
    """OpenCLIP's ``ClipLoss`` on one process: one GEMM, two cross-entropies, autograd."""
    from .reference import contrastive_loss_reference
    dt = image_features.dtype
    return contrastive_loss_reference(
        image_features, text_features, scale.to(dt), None if bias is None else bias.to(dt),
        label_smoothing=label_smoothing, reduction=reduction, return_stats=return_stats)


def materialized_infonce(queries, keys, scale, *, targets, label_smoothing, reduction):
    """``F.cross_entropy(scale * queries @ keys.T, targets)`` over the whole logits."""
    from .reference import infonce_loss_reference
    return infonce_loss_reference(queries, keys, scale.to(queries.dtype), targets=targets,
                                  label_smoothing=label_smoothing, reduction=reduction)
