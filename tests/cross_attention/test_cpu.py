"""The C++ CPU cross-attention kernels, called directly, against the float64 reference.

Kernel interface: ``cross_attention_fwd(q, k, v, key_padding_mask, seed, scale, dropout_p) ->
(out, lse, row_max, row_sum)`` and ``cross_attention_bwd(q, k, v, out, row_max, row_sum, dout,
key_padding_mask, seed, scale, dropout_p) -> (dq, dk, dv)``. Dropout uses the reference's seed, so the forward and every gradient
must agree within mmkernels.testing.numerics.assert_close.
"""
import math

import pytest
import torch

from mmkernels import _ext
from mmkernels.cross_attention.reference import cross_attention_reference as reference
from mmkernels.cross_attention.reference import dropout_keep_mask
from mmkernels.testing import cpp
from tests.helpers.attention_checks import check_outputs

C = cpp.kernels()

SEED = torch.tensor([398764591, 1478610112], dtype=torch.int64)


def ref_all(q, k, v, mask, scale, p, seed, dout, dtype):
    """(out, lse, dq, dk, dv) of the reference with inputs in ``dtype`` (autograd)."""
    qr, kr, vr = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = reference(qr, kr, vr, mask, scale=scale, dropout_p=p, seed=seed, return_lse=True)
    dq, dk, dv = torch.autograd.grad(out, (qr, kr, vr), dout.to(dtype))
    return out, lse, dq, dk, dv


def run_case(q, k, v, mask=None, scale=None, p=0.0, seed=None, dseed=0):
    """Forward and backward of the C++ kernels on (q, k, v) as given (any dtype/strides), compared
    with the float64 reference (and, for 16-bit dtypes, the eager rule)."""
    dtype = q.dtype
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if p > 0 and seed is None:
        seed = SEED
    out, lse, m, l = C.cross_attention_fwd(q, k, v, mask, seed, s, p)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    for t in (lse, m, l):
        assert t.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert t.shape == q.shape[:3]
    torch.testing.assert_close(lse, m + l.log())
    g = torch.Generator().manual_seed(dseed + 1)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64).to(dtype)
    dq, dk, dv = C.cross_attention_bwd(q, k, v, out, m, l, dout, mask, seed, s, p)
    assert (dq.dtype, dk.dtype, dv.dtype) == (dtype,) * 3
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dq.is_contiguous() and dk.is_contiguous() and dv.is_contiguous()
    for name, t in (("out", out), ("lse", lse.nan_to_num(neginf=0.0)), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert bool(torch.isfinite(t).all()), f"{name} has non-finite values"

    r = ref_all(q, k, v, mask, s, p, seed, dout, torch.float64)
    e = None if dtype in (torch.float64, torch.float32) else ref_all(q, k, v, mask, s, p, seed, dout, dtype)
    check_outputs((out, lse, dq, dk, dv), r, e, dtype)
    return out, lse, dq, dk, dv


def rand_qkv(b, h, lq, lk, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, lk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, lk, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def padding_mask(b, lk, seed=0, full_row=None):
    """Random key padding (about 30% padded, the first key always kept) and, if asked, one batch row
    whose keys are all padding."""
    g = torch.Generator().manual_seed(seed + 100)
    m = torch.rand(b, lk, generator=g) > 0.3
    m[:, 0] = True
    if full_row is not None:
        m[full_row] = False
    return m


# ----------------------------------------------------------------------------- the shape grid

@pytest.mark.parametrize("d", [64, 88])
@pytest.mark.parametrize("lk", [1, 257, 300])
@pytest.mark.parametrize("lq", [1, 32, 33])
def test_grid_fp64(lq, lk, d):
    q, k, v = rand_qkv(2, 2, lq, lk, d, seed=lq * 1000 + lk + d)
    run_case(q, k, v)
    run_case(q, k, v, padding_mask(2, lk, seed=lk, full_row=1))


@pytest.mark.parametrize("d", [64, 88])
@pytest.mark.parametrize("lk", [1, 257, 300])
@pytest.mark.parametrize("lq", [1, 32, 33])
def test_grid_fp32(lq, lk, d):
    q, k, v = rand_qkv(2, 2, lq, lk, d, dtype=torch.float32, seed=lq * 1000 + lk + d)
    run_case(q, k, v)
    run_case(q, k, v, padding_mask(2, lk, seed=lk, full_row=0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lq,lk,d", [(1, 257, 64), (32, 257, 64), (33, 300, 88), (32, 1, 88)])
def test_half_dtypes(dtype, lq, lk, d):
    q, k, v = rand_qkv(2, 3, lq, lk, d, dtype=dtype, seed=lq + lk)
    run_case(q, k, v)
    run_case(q, k, v, padding_mask(2, lk, seed=3, full_row=1))
    run_case(q, k, v, padding_mask(2, lk, seed=4), p=0.1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lq,lk,d", [(300, 257, 64), (256, 257, 96), (32, 300, 128), (33, 1100, 64)])
def test_large_shapes(dtype, lq, lk, d):
    """Several query blocks (Lq 256, 300), head dims 96 and 128, and Lk past one key block (1100:
    online softmax over blocks, a fully padded key block in the middle)."""
    q, k, v = rand_qkv(1, 2, lq, lk, d, dtype=dtype, seed=lq + d)
    mask = padding_mask(1, lk, seed=lk)
    if lk > 600:
        mask[:, 300:600] = False
    run_case(q, k, v, mask if lq != 256 else None, p=0.1 if lq == 33 else 0.0)


# ----------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("lq,lk,d", [(1, 257, 64), (32, 257, 64), (33, 300, 88), (32, 1, 64)])
def test_dropout(dtype, p, lq, lk, d):
    q, k, v = rand_qkv(2, 3, lq, lk, d, dtype=dtype, seed=lq * lk + d)
    run_case(q, k, v, p=p)
    run_case(q, k, v, padding_mask(2, lk, seed=1, full_row=1), p=p)


def test_dropout_seed_extremes_and_scale():
    """Seeds near 2**31 (uint32 wrapping in the hash), a non-default scale, the two seeds differ."""
    q, k, v = rand_qkv(2, 3, 33, 70, 64, seed=9)
    seed = torch.tensor([2 ** 31 - 1, 2 ** 31 - 2], dtype=torch.int64)
    run_case(q, k, v, p=0.5, seed=seed, scale=0.3)
    out_a = C.cross_attention_fwd(q, k, v, None, seed, 0.3, 0.5)[0]
    out_b = C.cross_attention_fwd(q, k, v, None, torch.tensor([1, 2]), 0.3, 0.5)[0]
    out_c = C.cross_attention_fwd(q, k, v, None, seed, 0.3, 0.5)[0]
    assert not torch.equal(out_a, out_b)
    assert torch.equal(out_a, out_c)


def test_dropout_mask_is_the_hash():
    """With v = identity over keys, out * (1 - p) / P recovers exactly the reference keep mask."""
    b, h, lq, lk, p = 2, 2, 5, 16, 0.5
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, lq, lk, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, lk, lk, generator=g, dtype=torch.float64)
    v = torch.eye(lk, dtype=torch.float64).expand(b, h, lk, lk)  # stride-0 batch/head dims
    out = C.cross_attention_fwd(q, k, v, None, SEED, 0.25, p)[0]
    probs = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1)
    keep = dropout_keep_mask(SEED, (b, h, lq, lk), p)
    assert torch.equal(out != 0, keep)
    torch.testing.assert_close(out, torch.where(keep, probs / (1 - p), 0.0), rtol=1e-12, atol=1e-14)


def test_dropout_zero_ignores_seed():
    q, k, v = rand_qkv(1, 2, 8, 20, 64, dtype=torch.float32)
    a = C.cross_attention_fwd(q, k, v, None, None, 0.125, 0.0)
    b = C.cross_attention_fwd(q, k, v, None, SEED, 0.125, 0.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- padding

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_fully_padded_rows(dtype):
    b, h, lq, lk, d = 3, 2, 33, 300, 64
    q, k, v = rand_qkv(b, h, lq, lk, d, dtype=dtype, seed=5)
    mask = padding_mask(b, lk, seed=5, full_row=1)
    for p in (0.0, 0.5):
        out, lse, dq, dk, dv = run_case(q, k, v, mask, p=p)
        assert bool((out[1] == 0).all()) and bool(torch.isneginf(lse[1]).all())
        assert bool(torch.isfinite(lse[0]).all() and torch.isfinite(lse[2]).all())
        for t in (dq[1], dk[1], dv[1]):
            assert bool((t == 0).all())
        pad = ~mask[:, None, :, None].expand_as(dk)
        assert bool((dk[pad] == 0).all()) and bool((dv[pad] == 0).all())
    # every key of every batch row padded
    none = torch.zeros(b, lk, dtype=torch.bool)
    out, lse, m, l = C.cross_attention_fwd(q, k, v, none, SEED, 0.125, 0.1)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())
    assert bool(torch.isneginf(m).all()) and bool((l == 0).all())
    dout = torch.randn(q.shape, dtype=torch.float64).to(dtype)
    for t in C.cross_attention_bwd(q, k, v, out, m, l, dout, none, SEED, 0.125, 0.1):
        assert bool((t == 0).all())


def test_mask_strided():
    q, k, v = rand_qkv(2, 2, 7, 40, 64, seed=2)
    full = padding_mask(40, 2, seed=2).t()  # [2, 40] non-contiguous view
    assert not full.is_contiguous()
    run_case(q, k, v, full)


# ----------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_strided_views(dtype):
    """q as a [B, Lq, H, D] transpose, k/v as the [B, H, Lk, D] views of one projection output
    [B, Lk, 2*H*D] (what fused_kv_projection returns), and a v with last stride 2."""
    b, h, lq, lk, d = 2, 3, 33, 257, 64
    g = torch.Generator().manual_seed(11)
    q = torch.randn(b, lq, h, d, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
    y = torch.randn(b, lk, 2 * h * d, generator=g, dtype=torch.float64).to(dtype)
    k = y[..., : h * d].view(b, lk, h, d).transpose(1, 2)
    v = y[..., h * d:].view(b, lk, h, d).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    mask = padding_mask(b, lk, seed=1)
    res_nc = run_case(q, k, v, mask, p=0.1)
    res_c = run_case(q.contiguous(), k.contiguous(), v.contiguous(), mask, p=0.1)
    for a, c in zip(res_nc, res_c):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
    v2 = torch.randn(b, h, lk, 2 * d, generator=g, dtype=torch.float64).to(dtype)[..., ::2]
    assert v2.stride(-1) == 2
    run_case(q, k, v2, mask)
    # out / dout handed to the backward as non-contiguous views
    s = 0.125
    out, _, m, l = C.cross_attention_fwd(q, k, v, mask, SEED, s, 0.1)
    dout = torch.randn(b, lq, h, d, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
    a = C.cross_attention_bwd(q, k, v, out.transpose(1, 2).contiguous().transpose(1, 2), m, l, dout,
                              mask, SEED, s, 0.1)
    c = C.cross_attention_bwd(q, k, v, out, m, l, dout.contiguous(), mask, SEED, s, 0.1)
    for x, y_ in zip(a, c):
        torch.testing.assert_close(x, y_, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads(threads):
    """Few (b, h) pairs (fewer than threads) and many; results do not depend on the thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v = rand_qkv(1, 1, 70, 130, 64, dtype=torch.float32, seed=threads)
        run_case(q, k, v, padding_mask(1, 130), p=0.1)
        q, k, v = rand_qkv(3, 4, 33, 65, 64, seed=threads)
        run_case(q, k, v, padding_mask(3, 65, full_row=2), p=0.1)
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- gradcheck

class XAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, seed, scale, p):
        out, _, m, l = C.cross_attention_fwd(q, k, v, mask, seed, scale, p)
        ctx.save_for_backward(q, k, v, out, m, l)
        ctx.args = (mask, seed, scale, p)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, m, l = ctx.saved_tensors
        dq, dk, dv = C.cross_attention_bwd(q, k, v, out, m, l, dout, *ctx.args)
        return dq, dk, dv, None, None, None, None


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(p, masked):
    g = torch.Generator().manual_seed(3)
    b, h, lq, lk, d = 2, 2, 3, 6, 5
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64, requires_grad=True)
               for n in (lq, lk, lk))
    mask = None
    if masked:
        mask = torch.tensor([[True, False, True, True, False, True], [False] * 6])
    seed = torch.tensor([12345, 2 ** 31 - 7], dtype=torch.int64)
    assert torch.autograd.gradcheck(lambda q_, k_, v_: XAttn.apply(q_, k_, v_, mask, seed, 0.7, p),
                                    (q, k, v), eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- errors, fallback

def test_bad_inputs():
    q, k, v = rand_qkv(2, 2, 4, 6, 8)
    with pytest.raises(RuntimeError):
        C.cross_attention_fwd(q, k.float(), v, None, None, 0.3, 0.0)  # dtype mismatch
    with pytest.raises(RuntimeError):
        C.cross_attention_fwd(q, k[:, :, :, :4], v, None, None, 0.3, 0.0)  # k/v shapes differ
    with pytest.raises(RuntimeError):
        C.cross_attention_fwd(q[:1], k, v, None, None, 0.3, 0.0)  # batch mismatch
    with pytest.raises(RuntimeError):
        C.cross_attention_fwd(q, k, v, torch.ones(2, 5, dtype=torch.bool), None, 0.3, 0.0)
    with pytest.raises(RuntimeError):
        C.cross_attention_fwd(q, k, v, torch.ones(2, 6, dtype=torch.int32), None, 0.3, 0.0)
    with pytest.raises(RuntimeError):
        C.cross_attention_fwd(q, k, v, None, None, 0.3, 0.1)  # dropout without a seed
    with pytest.raises(RuntimeError):
        C.cross_attention_fwd(q, k, v, None, SEED, 0.3, 1.0)
    with pytest.raises(RuntimeError):
        C.cross_attention_fwd(q.int(), k.int(), v.int(), None, None, 0.3, 0.0)
    out, _, m, l = C.cross_attention_fwd(q, k, v, None, None, 0.3, 0.0)
    with pytest.raises(RuntimeError):
        C.cross_attention_bwd(q, k, v, out, m[:, :1], l, out, None, None, 0.3, 0.0)
    with pytest.raises(RuntimeError):
        C.cross_attention_bwd(q, k, v, out, m, l[:, :1], out, None, None, 0.3, 0.0)


def test_aten_gemm_fallback():
    """With BLAS switched off (``_ext.cpu_blas(False)``) the GEMMs take their ATen fallback (the path
    of a torch that exports no sgemm_/dgemm_); it must give the same results."""
    with _ext.cpu_blas(False):
        q, k, v = rand_qkv(2, 2, 33, 300, 88, seed=1)
        run_case(q, k, v, padding_mask(2, 300, full_row=1), p=0.1)
        q, k, v = rand_qkv(1, 2, 70, 1100, 64, dtype=torch.float32, seed=2)
        run_case(q, k, v, None)
