"""The SigLIP unit's paths built from PyTorch's own ops, beside the kernels.

* ``"blockwise"``: the logits in blocks of rows, each block one GEMM (``torch.mm``, cuBLAS on
  CUDA) into a float32 ``[rows, M]`` buffer sized by the option ``memory_budget``, the sigmoid
  arithmetic in torch ops on the block. A backend of the registered ops
  ``mmkernels::siglip_rows`` / ``siglip_grads`` (``backend="blockwise"``), so it shares their
  autograd and ``torch.compile`` support. Memory: O((N + M) * D) plus one block.
* ``"materialized"``: OpenCLIP's ``SigLipLoss`` computation (the ``N x M`` logits and signs in
  the features' dtype, autograd); eligible only where those tensors fit ``memory_budget``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import _dispatch
from ..ops import stats_dtype
from ..paths import BLOCKWISE, MATERIALIZED, _Operands, block_rows

PATHS = (BLOCKWISE, MATERIALIZED)

#: float32 temporaries per logit of a blockwise block: the product and one elementwise result
_BLOCK_TEMPS = 2


def materialized_bytes(n: int, m: int, dtype: torch.dtype) -> int:
    """Bytes of the ``N x M`` tensors the materialized path holds at its peak (fwd + bwd): the
    product, the logits, the signs, their product, the log-sigmoid and, backward, its gradient
    and the logits' gradient: 7 tensors in the features' dtype."""
    return 7 * int(n) * int(m) * torch.empty((), dtype=dtype).element_size()


def eligibility(q: torch.Tensor, k: torch.Tensor) -> dict[str, str | None]:
    """``{path: None if it can run this call, else why not}`` for the PyTorch-op paths."""
    n, m = q.shape[0], k.shape[0]
    budget = _dispatch.memory_budget()
    need = materialized_bytes(n, m, q.dtype)
    why = None
    if need > budget:
        why = (f"its {n} x {m} logits need {need / 2**20:.1f} MiB, over memory_budget "
               f"{budget / 2**20:.1f} MiB")
    return {BLOCKWISE: None, MATERIALIZED: why}


def _rows_per_block(q: torch.Tensor, m: int, rows: int | None) -> int:
    sd = torch.empty((), dtype=stats_dtype(q.dtype)).element_size()
    return rows or block_rows(q.shape[0], m, _BLOCK_TEMPS * sd)


def _flip_positives(L: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-z * L`` in place for one block: each row's positive (``targets[i] >= 0``) negated, the
    negatives kept, so ``softplus`` of the result is the per-element loss."""
    has = targets >= 0
    idx = targets.clamp_min(0)[:, None]
    vals = L.gather(1, idx)
    L.scatter_(1, idx, torch.where(has[:, None], -vals, vals))
    return L


def blockwise_siglip_rows(q, k, scale, bias, targets, *, rows: int | None = None):
    """``row_loss [N]`` of ``ops.siglip_rows`` from row blocks of the logits."""
    N, M = q.shape[0], k.shape[0]
    dev, sd = q.device, stats_dtype(q.dtype)
    out = torch.zeros(N, dtype=sd, device=dev)
    if N == 0 or M == 0:
        return out
    scale = scale.detach().to(device=dev, dtype=sd).reshape(())
    bias = bias.detach().to(device=dev, dtype=sd).reshape(())
    # softplus(x) is taken as x beyond the threshold: exp(-20) is below float32's resolution
    # there, exp(-40) below float64's
    threshold = 40.0 if sd == torch.float64 else 20.0
    ops = _Operands(q, k)
    B = _rows_per_block(q, M, rows)
    buf = torch.empty(min(B, N), M, dtype=sd, device=dev)
    for r0 in range(0, N, B):
        r1 = min(N, r0 + B)
        L = ops.product(r0, r1, out=buf[: r1 - r0]).mul_(scale).add_(bias)
        out[r0:r1] = F.softplus(_flip_positives(L, targets[r0:r1]), threshold=threshold).sum(1)
    return out


def blockwise_siglip_fwd_bwd(q, k, scale, bias, targets, *, exact: bool = False):
    """``(row_loss, dq, dk, dscale, dbias)`` for ``g_row = 1`` from one pass over the blocks."""
    n = q.shape[0]
    g = torch.ones(n, dtype=stats_dtype(q.dtype), device=q.device)
    row_loss = torch.zeros_like(g)
    return (row_loss, *blockwise_siglip_grads(q, k, scale, bias, targets, g, row_loss=row_loss,
                                              exact=exact))


def blockwise_siglip_grads(q, k, scale, bias, targets, g_row, *, rows: int | None = None,
                           exact: bool = False, row_loss: torch.Tensor | None = None):
    """``(dq, dk, dscale, dbias)`` of ``ops.siglip_grads`` from row blocks of the logits.

    Per block: ``S`` (a GEMM), ``G = g * (sigmoid(L) - onehot(targets))``, then ``dq = scale *
    G @ k`` and ``dk += scale * G.T @ q`` (GEMMs); ``dscale`` and ``dbias`` are sums over G.
    ``exact``: fp32 products for bf16 features on the CPU too (``contrastive.paths._Operands``).
    ``row_loss``: a ``[N]`` buffer that also receives each row's loss from the same logits.
    """
    N, D = q.shape
    M = k.shape[0]
    dev, sd = q.device, stats_dtype(q.dtype)
    dq = torch.zeros(N, D, dtype=q.dtype, device=dev)
    dk_acc = torch.zeros(M, D, dtype=sd, device=dev)
    ds = torch.zeros((), dtype=sd, device=dev)
    db = torch.zeros((), dtype=sd, device=dev)
    if N == 0 or M == 0:
        return dq, dk_acc.to(k.dtype), ds, db
    scale = scale.detach().to(device=dev, dtype=sd).reshape(())
    bias = bias.detach().to(device=dev, dtype=sd).reshape(())
    g_row = g_row.to(device=dev, dtype=sd)
    ops = _Operands(q, k, exact=exact)
    B = _rows_per_block(q, M, rows)
    buf = torch.empty(min(B, N), M, dtype=sd, device=dev)
    for r0 in range(0, N, B):
        r1 = min(N, r0 + B)
        t = targets[r0:r1]
        has = t >= 0
        idx = t.clamp_min(0)[:, None]
        g = g_row[r0:r1]
        S = ops.product(r0, r1, out=buf[: r1 - r0])
        if row_loss is not None:
            L = _flip_positives(S * scale + bias, t)
            row_loss[r0:r1] = F.softplus(L, threshold=40.0 if sd == torch.float64 else 20.0).sum(1)
            del L
        G = torch.sigmoid(S * scale + bias).mul_(g[:, None])
        # the positive's -g (z = +1: G = -g * sigmoid(-L) = g * (sigmoid(L) - 1))
        G.scatter_add_(1, idx, torch.where(has, -g, torch.zeros_like(g))[:, None])
        db += G.sum()
        ds += torch.sum(S.mul_(G))
        G.mul_(scale)
        ops.grad_products(G, r0, r1, dq, dk_acc)
    return dq, dk_acc.to(k.dtype), ds, db


def materialized_siglip(q, k, scale, bias, targets):
    """Per-row losses ``[N]`` as OpenCLIP's ``SigLipLoss`` computes them: the whole logits and
    signs in the features' dtype, ``-logsigmoid``, autograd."""
    from .reference import siglip_rows_reference
    dt = q.dtype
    return siglip_rows_reference(q, k, scale.to(dt), bias.to(dt), targets)
