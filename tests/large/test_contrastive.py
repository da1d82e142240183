"""InfoNCE past 2**31 elements: keys ``[M, D]`` with ``M * D > 2**31`` (a large key queue).

Eight queries against M = 2**21 + 4096 keys of D = 1024 keep the FLOPs small; targets include
keys whose rows start past flat offset 2**31 - 1. The keys repeat every 4099 rows
(``tests.large.memory.uniform``), so the float64 truth of the whole ``[8, M]`` similarity
comes from the 4099 distinct rows and how often each occurs: per-query losses, the query
gradient, and the key gradient of probe rows at the start, middle and end.

The cpu backend runs the forward on float32 keys: it computes 16-bit inputs on float32 copies
(five times the keys' bytes with the backward), and its backward allocates the key gradient
even when only the queries need one (16 GiB with float32 keys). The reference backend runs
forward and backward on bf16 keys.
"""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.testing.numerics import assert_close
from tests.large.memory import INT32_MAX, PERIOD, fold_rows, probe_rows, require_memory, uniform

pytestmark = pytest.mark.slow

N, D = 8, 1024
M = (INT32_MAX + 1) // D + 4096
SCALE = 2.0


def _inputs(dtype, requires_grad):
    q = uniform(N, D, seed=0, dtype=dtype).requires_grad_(requires_grad)
    k = uniform(M, D, seed=1, low=-0.1, high=0.1, dtype=dtype).requires_grad_(requires_grad)
    targets = torch.tensor([0, 1, M // 2, M - 1, M - 2, M - 4096, 7, (INT32_MAX + 1) // D])
    return q, k, targets


def _truth(q, k, targets):
    """float64 ``(per-query loss [N], softmax weight of each distinct key row [N, PERIOD], lse [N])``."""
    kp = k.detach()[:PERIOD].double()
    s = SCALE * q.detach().double() @ kp.T  # [N, PERIOD]: the similarity of every key row j is s[:, j % PERIOD]
    count = fold_rows(torch.ones(M, 1))[:, 0]
    lse = torch.logsumexp(s + count.log(), 1)
    pos = SCALE * (q.detach().double() * k.detach()[targets].double()).sum(1)
    return lse - pos, torch.exp(s - lse[:, None]), lse


def test_infonce_cpu_forward():
    require_memory(int(1.2 * M * D * 4), f"infonce_loss over {M * D} key elements")
    q, k, targets = _inputs(torch.float32, False)
    with mmkernels.backend("cpu"):
        loss = mmkernels.infonce_loss(q, k, SCALE, targets=targets, reduction="none")
    assert_close(loss, _truth(q, k, targets)[0], name="per-query loss")


def test_infonce_reference_backward():
    require_memory(int(2.4 * M * D * 2), f"infonce_loss backward over {M * D} key elements")
    q, k, targets = _inputs(torch.bfloat16, True)
    with mmkernels.backend("reference"):
        loss = mmkernels.infonce_loss(q, k, SCALE, targets=targets)
        loss.backward()
    per_query, p, _ = _truth(q, k, targets)
    assert_close(loss, per_query.mean(), torch.bfloat16, name="loss")
    # dL/dq_i = SCALE / N * (sum_j p_ij k_j - k_{t_i}), the sum over every key via the period
    count = fold_rows(torch.ones(M, 1))[:, 0]
    kp = k.detach()[:PERIOD].double()
    dq = SCALE / N * ((p * count) @ kp - k.detach()[targets].double())
    assert_close(q.grad, dq, name="dq")
    for rows in probe_rows(M, D):
        j = torch.arange(rows.start, rows.stop)
        w = p[:, j % PERIOD] - (targets[:, None] == j[None, :]).double()  # [N, rows]
        assert_close(k.grad[rows], SCALE / N * w.T @ q.detach().double(), name=f"dk[{rows.start}:{rows.stop}]")
