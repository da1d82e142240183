"""Cross-attention past 2**31 elements: keys/values ``[B, H, Lk, D]`` with ``B*H*Lk*D > 2**31``.

Q-Former shapes with many (batch, head) pairs: Lq = 4 queries over Lk = 577 image tokens
(ViT-L/14), D = 64, B = 3640, H = 16 (2**31 + 3.2M elements) (bf16). ``k`` and ``v`` are one tensor (the values equal
the keys), so the inputs cost one copy; the pairs of the last batch start past flat offset
2**31 - 1. Output and the gradients of q, k and v at the first, a middle
and the last batch are checked against the float64 reference on those batches alone. The
backward's k and v gradients are two more copies of the keys: the test holds three (about 12
GiB). The reference backend upcasts 16-bit k and v to float32 (two 8 GiB copies): it runs
the forward on float32 keys (twice the bytes, no copy).
"""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.cross_attention.reference import cross_attention_reference
from mmkernels.testing.numerics import assert_close
from tests.large.memory import INT32_MAX, require_memory, uniform

pytestmark = pytest.mark.slow

B, H, LQ, LK, D = 3640, 16, 4, 577, 64
KV_BYTES = B * H * LK * D * 2
PROBES = (0, B // 2, B - 1)


def test_cross_attention_cpu():
    assert (B - 1) * H * LK * D > INT32_MAX
    require_memory(int(3.2 * KV_BYTES), f"cross_attention backward over {B * H * LK * D} key elements")
    q = uniform(B, H, LQ, D, seed=0).requires_grad_()
    kv = uniform(B, H, LK, D, seed=1).requires_grad_()
    dout = uniform(B, H, LQ, D, seed=2)
    with mmkernels.backend("cpu"):
        out = mmkernels.cross_attention(q, kv, kv)
        out.backward(dout)  # kv.grad = dk + dv
    for b in PROBES:
        qs = q.detach()[b:b + 1].double().requires_grad_()
        ks = kv.detach()[b:b + 1].double().requires_grad_()
        ref = cross_attention_reference(qs, ks, ks)
        ref.backward(dout[b:b + 1].double())
        assert_close(out[b:b + 1], ref, name=f"out[{b}]")
        assert_close(q.grad[b:b + 1], qs.grad, name=f"dq[{b}]")
        assert_close(kv.grad[b:b + 1], ks.grad, name=f"dk + dv[{b}]")


def test_cross_attention_reference_forward():
    """The reference backend's forward on float32 keys of 2**31 + 3.2M elements (no upcast copy)."""
    require_memory(int(2.2 * KV_BYTES), f"cross_attention over {B * H * LK * D} key elements")
    q = uniform(B, H, LQ, D, seed=0, dtype=torch.float32)
    kv = uniform(B, H, LK, D, seed=1, dtype=torch.float32)
    with mmkernels.backend("reference"):
        out = mmkernels.cross_attention(q, kv, kv)
    for b in PROBES:
        kvs = kv[b:b + 1].double()
        assert_close(out[b:b + 1], cross_attention_reference(q[b:b + 1].double(), kvs, kvs), name=f"out[{b}]")
