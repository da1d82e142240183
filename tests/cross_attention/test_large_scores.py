"""Cross-attention at large scores (|scale * q.k| from ~1 to hundreds) on the cpu and triton backends.

The backward recomputes P = exp(s - m) / l from the row max m and the row sum l that the forward
saved apart; a single rounded lse = m + log l would turn its rounding (half an ulp of |lse|) into
a relative error of every P, far above eager PyTorch's error at such scores. Outputs and
dq/dk/dv are compared with the float64 reference under the eager rule (at most 2x the error of
the reference evaluated in the input dtype).
"""
import pytest
import torch

from mmkernels.cross_attention.ops import cross_attention_fwd
from mmkernels.cross_attention.reference import cross_attention_reference
from mmkernels.testing.numerics import assert_close
from tests.helpers.backends import require_backend

pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

SEED = torch.tensor([398764591, 1478610112], dtype=torch.int64)
_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _inputs(b, h, lq, lk, d, dtype, max_score, scale, seed):
    """q, k, v, dout in ``dtype``, q rescaled so that max |scale * q k^T| is ``max_score``."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for n in (lq, lk, lk, lq))
    q = q * (max_score / (scale * q @ k.transpose(-1, -2)).abs().amax())
    return tuple(t.to(dtype) for t in (q, k, v, dout))


def _padding(b, lk, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, lk, generator=g) < 0.8
    m[:, 0] = True
    return m


def _reference(q, k, v, dout, mask, scale, p, seed, dtype):
    """(out, dq, dk, dv) of the reference evaluated in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = cross_attention_reference(*leaves, mask, scale=scale, dropout_p=p, seed=seed)
    return (out.detach(), *torch.autograd.grad(out, leaves, dout.to(dtype)))


def check_case(backend, dtype, max_score, *, b=2, h=2, lq=33, lk=80, d=64, masked=False, p=0.0, seed=0):
    """Forward and backward through the registered op against the float64 reference and eager."""
    require_backend(backend, "cross-attention", "cross_attention_fwd", "mmkernels.cross_attention.kernels")
    scale = d ** -0.5
    q, k, v, dout = _inputs(b, h, lq, lk, d, dtype, max_score, scale, seed)
    mask = _padding(b, lk, seed) if masked else None
    sd = SEED if p > 0 else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = cross_attention_fwd(*leaves, mask, sd, scale, p, backend)[0]
    got = (out.detach(), *torch.autograd.grad(out, leaves, dout))
    ref = _reference(q, k, v, dout, mask, scale, p, sd, torch.float64)
    eager = _reference(q, k, v, dout, mask, scale, p, sd, dtype)
    assert all(bool(torch.isfinite(t).all()) for t in eager), "eager must stay finite for the rule"
    for name, a, r, e in zip(("out", "dq", "dk", "dv"), got, ref, eager):
        assert_close(a, r, dtype, eager=e, name=f"{backend} {name} at scores {max_score}")


@pytest.mark.parametrize("max_score", [1.0, 30.0, 300.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_IDS.get)
def test_cpu_scores(dtype, max_score):
    check_case("cpu", dtype, max_score, masked=True, p=0.1)


def test_cpu_fp16_dropout_scores_586():
    """fp16 with attention dropout at scores in the hundreds (dq was the worst gradient)."""
    check_case("cpu", torch.float16, 586.0, p=0.1, seed=3)


def test_cpu_long_keys_online_softmax():
    """Lk > 1024: several key blocks, the row max moves between them (online rescaling)."""
    check_case("cpu", torch.float32, 120.0, b=1, h=2, lq=9, lk=1100, d=32, masked=True, p=0.1, seed=4)


# 16-bit inputs stop at scores in the tens here: beyond, dk is bounded by delta = rowsum(dO * O)
# with O rounded to the input dtype (a nearly one-hot P makes dP - delta cancel), not by P
@pytest.mark.parametrize("dtype,max_score", [(torch.float32, 1.0), (torch.float32, 30.0), (torch.float32, 300.0),
                                             (torch.bfloat16, 1.0), (torch.bfloat16, 34.0),
                                             (torch.float16, 1.0), (torch.float16, 34.0)],
                         ids=lambda x: _IDS.get(x, str(x)))
def test_triton_scores(dtype, max_score):
    check_case("triton", dtype, max_score, masked=True, p=0.1 if dtype != torch.float32 else 0.0)


def test_triton_fp32_scores_73():
    """fp32 without mask or dropout (dv was the worst gradient)."""
    check_case("triton", torch.float32, 73.0, seed=5)


def test_triton_several_query_blocks():
    """Lq larger than the backward's query block: the statistics are read per query block."""
    from mmkernels.cross_attention import kernels as K
    require_backend("triton", "cross-attention", "cross_attention_fwd", "mmkernels.cross_attention.kernels")
    b, h, lq, lk, d, scale, p = 1, 2, 40, 48, 32, 32 ** -0.5, 0.1
    q, k, v, dout = _inputs(b, h, lq, lk, d, torch.float32, 150.0, scale, 6)
    mask = _padding(b, lk, 6)
    cfg = K.XAttnConfig(16, 16, 4, 1)
    out, _, m, l = K.cross_attention_fwd_triton(q, k, v, mask, SEED, scale, p, config=cfg)
    grads = K.cross_attention_bwd_triton(q, k, v, out, m, l, dout, mask, SEED, scale, p, config=cfg)
    ref = _reference(q, k, v, dout, mask, scale, p, SEED, torch.float64)
    eager = _reference(q, k, v, dout, mask, scale, p, SEED, torch.float32)
    for name, a, r, e in zip(("out", "dq", "dk", "dv"), (out, *grads), ref, eager):
        assert_close(a, r, torch.float32, eager=e, name=name)
