"""Multimodal attention past 2**31 elements: keys/values ``[B, H, Sk, D]`` with ``B*H*Sk*D > 2**31``.

Few queries over short sequences keep the FLOPs small: Sq = 4, Sk = 577, D = 64, B = 3640,
H = 16 (2**31 + 3.2M elements), float32, no mask. ``k`` and ``v`` are one tensor; the last
batch's rows start past flat offset 2**31 - 1. The output at the first, a middle and the last
batch is checked against the float64 reference on those batches alone.

Forward only, in float32: the cpu backend computes 16-bit inputs on float32 copies of k and v
(four times their bytes in the forward, eight in the backward), and the backward's k and v
gradients are two more 8 GiB copies; neither fits beside the inputs in 12 GiB.
"""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.attention.reference import multimodal_attention_reference
from mmkernels.testing.numerics import assert_close
from tests.large.memory import INT32_MAX, require_memory, uniform

pytestmark = pytest.mark.slow

B, H, SQ, SK, D = 3640, 16, 4, 577, 64
KV_BYTES = B * H * SK * D * 4
PROBES = (0, B // 2, B - 1)


@pytest.mark.parametrize("backend", ("cpu", "reference"))
def test_multimodal_attention_forward(backend):
    assert (B - 1) * H * SK * D > INT32_MAX
    require_memory(int(1.15 * KV_BYTES), f"multimodal_attention over {B * H * SK * D} key elements")
    q = uniform(B, H, SQ, D, seed=0, dtype=torch.float32)
    kv = uniform(B, H, SK, D, seed=1, dtype=torch.float32)
    with mmkernels.backend(backend):
        out = mmkernels.multimodal_attention(q, kv, kv)
    for b in PROBES:
        kvs = kv[b:b + 1].double()
        ref = multimodal_attention_reference(q[b:b + 1].double(), kvs, kvs)
        assert_close(out[b:b + 1], ref, name=f"out[{b}]")
