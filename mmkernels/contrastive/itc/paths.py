"""The ``itc`` unit's paths built from PyTorch's own ops, beside the kernels.

* ``"blockwise"``: the similarities in blocks of rows, each block one GEMM (``torch.mm``, cuBLAS on
  CUDA) of ``[rows * Q, D] x [D, M * P]`` into a buffer sized by the option ``memory_budget``,
  the max over token pairs, the soft-target statistics and the gradients in torch ops on the
  block. A backend of the registered ops ``mmkernels::itc_rows`` / ``itc_grads`` /
  ``itc_negatives`` (``backend="blockwise"``), so it shares their autograd and ``torch.compile``
  support. Memory: O((N + M) * D) plus one block.
* ``"materialized"``: the objective as the papers' code computes it (the whole ``N x M`` logits,
  ``[N, M, Q * P]`` products, targets, autograd; ``reference.itc_rows_reference``), eligible only
  where those tensors fit ``memory_budget``.
"""
from __future__ import annotations

import torch

from ... import _dispatch
from ..ops import stats_dtype
from ..paths import BLOCKWISE, MATERIALIZED, _Operands, block_rows
from . import random as itc_random

PATHS = (BLOCKWISE, MATERIALIZED)


def materialized_bytes(n: int, m: int, tokens: int, dtype: torch.dtype, *, teacher: bool) -> int:
    """Bytes of the ``N x M`` tensors the materialized path holds at its peak (fwd + bwd): the
    ``[N, M, tokens]`` products, their permuted copy and the gradient scattered back into them
    (3 per token pair, with one token pair the product alone), and the logits, log-softmax,
    targets, their product and the gradients of logits and log-softmax (6); the teacher's
    products, logits and softmax (3 more, the token pairs counted again)."""
    nm = int(n) * int(m)
    per = (3 * tokens if tokens > 1 else 1) + 6
    if teacher:
        per += (2 * tokens if tokens > 1 else 1) + 2
    return per * nm * torch.empty((), dtype=dtype).element_size()


def eligibility(q: torch.Tensor, k: torch.Tensor, *, teacher: bool,
                m: int | None = None) -> dict[str, str | None]:
    """``{path: None if it can run this call, else why not}`` for ``q [N, Q, D]`` against ``m``
    keys of ``k``'s token count (default ``len(k)``)."""
    n, m = q.shape[0], k.shape[0] if m is None else m
    tokens = q.shape[1] * k.shape[1]
    budget = _dispatch.memory_budget()
    need = materialized_bytes(n, m, tokens, q.dtype, teacher=teacher)
    why = None
    if need > budget:
        why = (f"its {n} x {m} x {tokens} similarities need {need / 2**20:.1f} MiB, over "
               f"memory_budget {budget / 2**20:.1f} MiB")
    return {BLOCKWISE: None, MATERIALIZED: why}


class TokenOperands:
    """``q [N, Q, D]`` and the keys ``[k; kq]`` (each ``[*, P, D]``, ``kq`` a queue or None) as the
    block GEMMs take them (``contrastive.paths._Operands`` per key segment on the flattened
    ``[N * Q, D]``, ``[M * P, D]``; nothing is concatenated), and the max over token pairs."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, kq: torch.Tensor | None = None, *,
                 exact: bool = False):
        self.n, self.qt, self.d = q.shape
        self.pt = k.shape[1]
        segments = [k] if kq is None else [k, kq]
        self.sizes = [s.shape[0] for s in segments]
        self.m = sum(self.sizes)
        q2 = q.reshape(self.n * self.qt, self.d)
        self.ops = [_Operands(q2, s.reshape(s.shape[0] * self.pt, s.shape[2]), exact=exact)
                    for s in segments]
        self.sd = self.ops[0].sd

    def _product(self, r0: int, r1: int) -> torch.Tensor:
        if len(self.ops) == 1:
            return self.ops[0].product(r0 * self.qt, r1 * self.qt)
        out = torch.empty((r1 - r0) * self.qt, self.m * self.pt, dtype=self.sd, device=self.ops[0].q.device)
        c0 = 0
        for ops, size in zip(self.ops, self.sizes):
            c1 = c0 + size * self.pt
            out[:, c0:c1] = ops.product(r0 * self.qt, r1 * self.qt)
            c0 = c1
        return out

    def similarity(self, r0: int, r1: int):
        """``(S [rows, M], idx)`` in the statistics dtype: the max over token pairs of rows
        ``r0:r1``, and the flat index ``a * P + b`` of the first maximal pair ``[rows, M]`` int64
        (None for one token pair)."""
        prod = self._product(r0, r1)
        if self.qt == 1 and self.pt == 1:
            return prod, None
        b = r1 - r0
        pairs = prod.view(b, self.qt, self.m, self.pt).permute(0, 2, 1, 3).reshape(b, self.m, -1)
        out = pairs.max(-1)
        return out.values, out.indices

    def grad_products(self, dS: torch.Tensor, idx, r0: int, r1: int, dq: torch.Tensor,
                      dk_acc: torch.Tensor | None) -> None:
        """``dq[r0:r1]`` and ``dk_acc += ...`` (the first key segment's gradient) for one block's
        ``dS = scale * dL`` ``[rows, M]`` routed through the arg-max token pairs ``idx`` (``dq
        [N, Q, D]``, ``dk_acc [len(k) * P, D]`` in the statistics dtype, or None)."""
        b = r1 - r0
        if idx is not None:
            full = torch.zeros(b, self.m, self.qt * self.pt, dtype=dS.dtype, device=dS.device)
            full.scatter_(2, idx[..., None], dS[..., None])
            dS = full.view(b, self.m, self.qt, self.pt).permute(0, 2, 1, 3).reshape(b * self.qt, -1)
        rows = slice(r0 * self.qt, r1 * self.qt)
        acc = None
        c0 = 0
        for n_seg, (ops, size) in enumerate(zip(self.ops, self.sizes)):
            c1 = c0 + size * self.pt
            G = dS[:, c0:c1]
            G = G.to(ops.q.dtype) if ops.rounded else G
            k = ops.k if G.dtype == ops.k.dtype else ops.k.to(G.dtype)
            part = torch.mm(G, k)
            acc = part if acc is None else acc.add_(part)
            if n_seg == 0 and dk_acc is not None:
                qrows = ops.q[rows]
                qr = qrows if G.dtype == qrows.dtype else qrows.to(G.dtype)
                dk_acc.add_(torch.mm(G.t(), qr).to(dk_acc.dtype))
            c0 = c1
        dq.view(-1, self.d)[rows] = acc.to(dq.dtype)


def _rows_per_block(q, k, m: int, teacher: bool) -> int:
    """Rows per block for ``m`` keys: the products of the token pairs and their permuted copy,
    and about six ``[rows, m]`` temporaries, twice with a teacher, within ``memory_budget``."""
    sd = torch.empty((), dtype=stats_dtype(q.dtype)).element_size()
    tokens = q.shape[1] * k.shape[1]
    per_logit = (3 * tokens + 6) * sd * (2 if teacher else 1)
    return block_rows(q.shape[0], m, per_logit)


def _teacher(k, kq, tq, tk, alpha: float, exact: bool):
    """The teacher's operands: ``tq`` against ``tk``, or against the keys ``[k; kq]``."""
    if alpha == 0.0:
        return None
    if tk is None:
        return TokenOperands(tq, k, kq, exact=exact)
    return TokenOperands(tq, tk, exact=exact)


def _targets_parts(TL, tlse, pos, cnt, alpha: float, eps: float, m: int):
    """``T`` of one block (the statistics dtype) from its teacher logits and positives."""
    T = torch.zeros_like(pos, dtype=cnt.dtype)
    if alpha != 1.0:
        T = T + pos.to(cnt.dtype) * ((1.0 - alpha) / cnt)[:, None]
    if alpha != 0.0:
        T = T + alpha * torch.exp(TL - tlse[:, None])
    return (1.0 - eps) * T + eps / m


def blockwise_itc_rows(q, k, kq, tq, tk, scale, tscale, row_ids, col_ids, alpha, eps, *, exact=False):
    """``(loss, lse, tlse, count)`` of ``ops.itc_rows`` from row blocks of the similarities."""
    N, M = q.shape[0], col_ids.shape[0]
    dev, sd = q.device, stats_dtype(q.dtype)
    loss, lse, tlse, cnt = (torch.zeros(N, dtype=sd, device=dev) for _ in range(4))
    scale = scale.detach().to(device=dev, dtype=sd).reshape(())
    tscale = tscale.detach().to(device=dev, dtype=sd).reshape(())
    ops = TokenOperands(q, k, kq, exact=exact)
    tops = _teacher(k, kq, tq, tk, alpha, exact)
    B = _rows_per_block(q, k, M, tops is not None)
    for r0 in range(0, N, B):
        r1 = min(N, r0 + B)
        L = ops.similarity(r0, r1)[0] * scale
        pos = row_ids[r0:r1, None] == col_ids[None, :]
        c = pos.sum(1).to(sd)
        lse[r0:r1] = l_i = torch.logsumexp(L, 1)
        cnt[r0:r1] = c
        fit = torch.zeros_like(l_i)
        if alpha != 1.0:
            fit = fit + (1.0 - alpha) * torch.where(pos, L, torch.zeros_like(L)).sum(1) / c
        if tops is not None:
            TL = tops.similarity(r0, r1)[0] * tscale
            tlse[r0:r1] = t_i = torch.logsumexp(TL, 1)
            fit = fit + alpha * (torch.exp(TL - t_i[:, None]) * L).sum(1)
        row = l_i - (1.0 - eps) * fit
        if eps:
            row = row - (eps / M) * L.sum(1)
        loss[r0:r1] = row
    return loss, lse, tlse, cnt


def blockwise_itc_grads(g, q, k, kq, tq, tk, scale, tscale, row_ids, col_ids, lse, tlse, cnt, alpha, eps,
                        need_dk, *, exact=False):
    """``(dq, dk, dscale)`` of ``ops.itc_grads`` from row blocks of the similarities."""
    N, M = q.shape[0], col_ids.shape[0]
    dev, sd = q.device, stats_dtype(q.dtype)
    dq = torch.zeros_like(q)
    dk_acc = torch.zeros(k.shape[0] * k.shape[1], k.shape[2], dtype=sd, device=dev) if need_dk else None
    ds = torch.zeros((), dtype=sd, device=dev)
    scale = scale.detach().to(device=dev, dtype=sd).reshape(())
    tscale = tscale.detach().to(device=dev, dtype=sd).reshape(())
    g = g.to(device=dev, dtype=sd)
    ops = TokenOperands(q, k, kq, exact=exact)
    tops = _teacher(k, kq, tq, tk, alpha, exact)
    B = _rows_per_block(q, k, M, tops is not None)
    for r0 in range(0, N, B):
        r1 = min(N, r0 + B)
        S, idx = ops.similarity(r0, r1)
        pos = row_ids[r0:r1, None] == col_ids[None, :]
        TL = None if tops is None else tops.similarity(r0, r1)[0] * tscale
        T = _targets_parts(TL, tlse[r0:r1], pos, cnt[r0:r1], alpha, eps, M)
        dL = (torch.exp(S * scale - lse[r0:r1, None]) - T) * g[r0:r1, None]
        ds += (dL * S).sum()
        ops.grad_products(dL * scale, idx, r0, r1, dq, dk_acc)
    dk = dk_acc.view(k.shape).to(k.dtype) if need_dk else k.new_empty(0)
    return dq, dk, ds


def blockwise_itc_negatives(q, k, scale, row_ids, col_ids, seed, *, exact=False):
    """``[N]`` int64 of ``ops.itc_negatives`` from row blocks of the similarities."""
    N, M = q.shape[0], k.shape[0]
    dev, sd = q.device, stats_dtype(q.dtype)
    out = torch.empty(N, dtype=torch.int64, device=dev)
    scale = scale.detach().to(device=dev, dtype=sd).reshape(())
    ops = TokenOperands(q, k, exact=exact)
    B = _rows_per_block(q, k, M, False)
    cols = torch.arange(M, device=dev)
    for r0 in range(0, N, B):
        r1 = min(N, r0 + B)
        L = (ops.similarity(r0, r1)[0] * scale).to(torch.float32)
        key = L + itc_random.gumbel(seed, torch.arange(r0, r1, device=dev)[:, None], cols[None, :])
        key = key.masked_fill(row_ids[r0:r1, None] == col_ids[None, :], float("-inf"))
        best = key.max(1)
        out[r0:r1] = torch.where(best.values == float("-inf"), torch.full_like(best.indices, -1),
                                 best.indices)
    return out


def materialized_itc_rows(q, k, kq, tq, tk, scale, tscale, row_ids, col_ids, alpha: float, eps: float):
    """Per-row losses ``[N]`` as the papers' code computes them (the keys concatenated with the
    queue, the features' dtype, autograd)."""
    from .reference import itc_rows_reference
    dt = q.dtype
    if kq is not None:
        k = torch.cat([k, kq], 0)
    return itc_rows_reference(q, k, scale.to(dt), row_ids, col_ids, teacher_q=tq, teacher_k=tk,
                              teacher_scale=tscale.to(dt), alpha=alpha, label_smoothing=eps)
