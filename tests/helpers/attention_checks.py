"""Checks the attention and cross-attention tests share: the saved ``lse`` and the five outputs of a
forward + backward against the float64 reference (and the eager rule for 16-bit dtypes)."""
from __future__ import annotations

import torch

from mmkernels.testing.numerics import assert_close


def check_lse(lse, ref, dtype, name="lse"):
    """``lse`` (rows that see no key: any negative infinity) against the reference, in ``dtype``."""
    inf_a, inf_r = torch.isinf(lse), torch.isinf(ref)
    assert torch.equal(inf_a, inf_r), f"{name}: -inf pattern differs from the reference"
    if inf_a.any():
        assert bool((lse[inf_a] < 0).all())
    assert_close(lse[~inf_a], ref[~inf_a], dtype, name=name)


def check_lse_fp32(lse, ref):
    """A Triton kernel's fp32 ``lse`` against the reference: the same ``-inf`` rows, fp32 accuracy."""
    assert lse.dtype == torch.float32
    lse, ref = lse.double().cpu(), ref.double().cpu()
    assert not torch.isnan(lse).any()
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(lse), inf), "lse: -inf pattern differs from the reference"
    assert bool((lse[inf] == float("-inf")).all())
    # lse is computed in fp32 from the dtype's values: fp32 accuracy, widened for long dot products
    assert_close(lse[~inf], ref[~inf], torch.float32, scale=10.0, name="lse")


def check_outputs(outputs, ref, eager, dtype):
    """``outputs = (out, lse, dq, dk, dv)`` against ``ref`` (the float64 reference's five) and, when
    given, ``eager`` (the reference computed in ``dtype``: the 2x-eager-error rule)."""
    check_lse(outputs[1], ref[1], dtype)
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        if name != "lse":
            assert_close(outputs[i], ref[i], dtype, eager=None if eager is None else eager[i], name=name)
