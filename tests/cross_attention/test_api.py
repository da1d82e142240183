"""mmkernels.cross_attention: the reference's definition, the dropout hash, the public API on every
backend, the registered ops (opcheck, torch.compile) and bad inputs.

The backends' primitive grids (Lq x Lk x D x padding x dtype) are in test_cpu.py
and test_triton.py; here every backend is driven through the public API.
"""
from __future__ import annotations

import math

import pytest
import torch

import mmkernels
from mmkernels.cross_attention import reference as ref_mod
from mmkernels.cross_attention.reference import cross_attention_reference, dropout_keep_mask, make_seed
from mmkernels.testing.numerics import assert_close
from tests.helpers.backends import require_backend

BACKENDS = ["cpu", "triton"]


def _require(backend):
    require_backend(backend, "cross-attention", "cross_attention_fwd", "mmkernels.cross_attention.kernels")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_fills_no_gradient_for_lse(backend):
    """lse [B, H, Lq] is saved for the backward and has no gradient: autograd must not fill a
    zero one on every backward (set_materialize_grads(False) on the op's context)."""
    from mmkernels.testing.fills import fills
    _require(backend)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 8, 16, generator=g).requires_grad_()
    k = torch.randn(2, 3, 20, 16, generator=g).requires_grad_()
    v = torch.randn(2, 3, 20, 16, generator=g).requires_grad_()
    with mmkernels.backend(backend):
        out = mmkernels.cross_attention(q, k, v)
        filled = [(op, s) for op, s in fills(lambda: out.backward(torch.ones_like(out))) if s == (2, 3, 8)]
    assert not filled, filled
    assert q.grad is not None and k.grad is not None and v.grad is not None


def _randn(*shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _inputs(b, h, lq, lk, d, seed=0, strided_kv=True):
    """q [B,H,Lq,D]; k, v as the Q-Former makes them: views of one [B, Lk, 2*H*D] projection."""
    q = _randn(b, lq, h, d, seed=seed).transpose(1, 2)
    if strided_kv:
        kv = _randn(b, lk, 2, h, d, seed=seed + 1)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    else:
        k, v = _randn(b, h, lk, d, seed=seed + 1), _randn(b, h, lk, d, seed=seed + 2)
    return q, k, v


def _padding(b, lk, seed=5, empty_row=None):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, lk, generator=g) > 0.3
    mask[:, 0] = True
    if empty_row is not None:
        mask[empty_row] = False
    return mask


def _run(backend, q, k, v, mask, dtype, dropout_p=0.0, seed=123):
    """Forward + backward through the public API; returns out, dq, dk, dv."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    dout = _randn(*q.shape, seed=77, dtype=dtype)
    with mmkernels.backend(backend):
        out = mmkernels.cross_attention(*leaves, key_padding_mask=mask, dropout_p=dropout_p,
                                        generator=torch.Generator().manual_seed(seed))
    (out * dout).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


# ----------------------------------------------------------------------------- the reference itself

def test_reference_matches_softmax_attention():
    q, k, v = _inputs(2, 3, 5, 9, 16)
    mask = _padding(2, 9)
    got, lse = cross_attention_reference(q, k, v, mask, return_lse=True)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(16)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    assert_close(got, torch.softmax(scores, -1) @ v)
    assert_close(lse, torch.logsumexp(scores, -1))


def test_reference_fully_padded_row_is_zero_without_nan():
    q, k, v = (t.requires_grad_() for t in _inputs(2, 2, 4, 6, 8, strided_kv=False))
    mask = _padding(2, 6, empty_row=1)
    out, lse = cross_attention_reference(q, k, v, mask, return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isinf(lse[1]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))


# ----------------------------------------------------------------------------- the dropout hash

def test_dropout_hash_test_vector():
    """The hash is a fixed function: these values are what every backend must reproduce."""
    seed = torch.tensor([398764591, 1478610112])
    u = ref_mod.dropout_hash(seed, 1, 1, 1, 4).flatten().tolist()
    assert u == [926756265, 2954379728, 2223643425, 743054470]


def _mix32_python(x):
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_dropout_hash_matches_scalar_definition():
    """The tensor implementation equals its docstring's formula evaluated in Python integers."""
    s0, s1 = 2 ** 31 - 1, 12345
    seed = torch.tensor([s0, s1])
    b, h, lq, lk = 2, 3, 5, 7
    u = ref_mod.dropout_hash(seed, b, h, lq, lk)
    m = 0xFFFFFFFF
    for bi, hi, i, j in [(0, 0, 0, 0), (1, 2, 4, 6), (1, 0, 3, 2), (0, 2, 1, 5)]:
        row = (bi * h + hi) * lq + i
        a = _mix32_python((row * 0x9E3779B9 + s0) & m)
        want = _mix32_python((a + j * 0x85EBCA6B + s1) & m)
        assert int(u[bi, hi, i, j]) == want


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_kept_fraction(p):
    """Over 1.2M draws the kept fraction is 1 - p within 5 standard deviations, per row block too."""
    seed = make_seed("cpu", torch.Generator().manual_seed(7))
    keep = dropout_keep_mask(seed, (16, 12, 24, 257), p).double()
    n = keep.numel()
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(keep.mean().item() - (1 - p)) < 5 * sd
    # no structure along rows or columns: every head's and every key's fraction is close too
    per_key = keep.mean(dim=(0, 1, 2))
    sd_key = math.sqrt(p * (1 - p) / (n / 257))
    assert (per_key - (1 - p)).abs().max().item() < 6 * sd_key
    # neighbouring elements are independent: P(keep_j and keep_j+1) = (1 - p)^2
    both = (keep[..., 1:] * keep[..., :-1]).mean().item()
    assert abs(both - (1 - p) ** 2) < 6 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / n)


def test_dropout_seed_from_generator():
    a = make_seed("cpu", torch.Generator().manual_seed(3))
    b = make_seed("cpu", torch.Generator().manual_seed(3))
    c = make_seed("cpu", torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.int64 and a.shape == (2,) and bool(((a >= 0) & (a < 2 ** 31)).all())


# ----------------------------------------------------------------------------- every backend through the API

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lq,lk,d,padded", [(32, 257, 64, True), (33, 300, 88, False), (1, 1, 64, False),
                                            (32, 40, 96, True)])
def test_api_matches_reference(backend, lq, lk, d, padded):
    _require(backend)
    q, k, v = _inputs(2, 2, lq, lk, d, seed=lq + lk)
    mask = _padding(2, lk, empty_row=1 if padded and lk > 1 else None) if padded else None
    got = _run(backend, q, k, v, mask, torch.float32)
    want = _run("reference", q, k, v, mask, torch.float64)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == torch.float32
        assert_close(g, w, torch.float32, scale=2.0, name=f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_api_dropout_same_generator_same_result(backend):
    _require(backend) if backend != "reference" else None
    q, k, v = _inputs(2, 2, 8, 37, 16, seed=11)
    first = _run(backend, q, k, v, None, torch.float32, dropout_p=0.3, seed=5)
    again = _run(backend, q, k, v, None, torch.float32, dropout_p=0.3, seed=5)
    other = _run(backend, q, k, v, None, torch.float32, dropout_p=0.3, seed=6)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.allclose(first[0], other[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_api_dropout_matches_reference_forward_and_backward(backend):
    """The kernels drop exactly the reference's probabilities, in forward and in backward."""
    _require(backend)
    q, k, v = _inputs(2, 3, 17, 70, 32, seed=21)
    mask = _padding(2, 70)
    got = _run(backend, q, k, v, mask, torch.float32, dropout_p=0.25, seed=9)
    want = _run("reference", q, k, v, mask, torch.float64, dropout_p=0.25, seed=9)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(g, w, torch.float32, scale=2.0, name=f"{backend} dropout {name}")


def test_dropout_is_inverted_and_unbiased_in_expectation():
    """E[out] over seeds equals the dropout-free output (kept probabilities scaled by 1/(1-p))."""
    q, k, v = _inputs(1, 1, 4, 50, 8, seed=3)
    clean = cross_attention_reference(q, k, v)
    outs = torch.stack([cross_attention_reference(q, k, v, dropout_p=0.5,
                                                  seed=make_seed("cpu", torch.Generator().manual_seed(s)))
                        for s in range(400)])
    err = (outs.mean(0) - clean).abs().max().item()
    sd = outs.std(0).max().item() / math.sqrt(400)
    assert err < 5 * sd


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_api_half_precision(backend, dtype):
    _require(backend)
    q, k, v = _inputs(2, 2, 32, 97, 64, seed=8)
    mask = _padding(2, 97)
    got = _run(backend, q, k, v, mask, dtype)
    want = _run("reference", q, k, v, mask, torch.float64)
    eager = _run("reference", q, k, v, mask, dtype)
    for name, g, w, e in zip(("out", "dq", "dk", "dv"), got, want, eager):
        assert g.dtype == dtype
        assert_close(g, w, dtype, eager=e, name=f"{backend} {dtype} {name}")


def test_float64_on_cpu_and_gradcheck():
    _require("cpu")
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 3, 5, 8, seed=4, strided_kv=False))
    mask = _padding(1, 5)
    gen_seed = 17

    def f(q, k, v):
        with mmkernels.backend("cpu"):
            return mmkernels.cross_attention(q, k, v, key_padding_mask=mask, dropout_p=0.2,
                                             generator=torch.Generator().manual_seed(gen_seed))

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_return_lse():
    _require("cpu")
    q, k, v = _inputs(2, 2, 5, 9, 16)
    mask = _padding(2, 9, empty_row=0)
    with mmkernels.backend("cpu"):
        out, lse = mmkernels.cross_attention(q, k, v, key_padding_mask=mask, return_lse=True)
    want_out, want_lse = cross_attention_reference(q, k, v, mask, return_lse=True)
    assert_close(out, want_out)
    assert_close(lse, want_lse)
    assert not lse.requires_grad


# ----------------------------------------------------------------------------- registered ops

def test_opcheck_cpu():
    _require("cpu")
    ops = torch.ops.mmkernels
    q, k, v = (t.float().contiguous() for t in _inputs(2, 2, 5, 9, 16))
    mask = _padding(2, 9)
    seed = make_seed("cpu", torch.Generator().manual_seed(1))
    for m, s, p in ((None, None, 0.0), (mask, seed, 0.2)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.library.opcheck(ops.cross_attention_fwd.default, (*leaves, m, s, 0.25, p, "cpu"))
        out, _, row_max, row_sum = ops.cross_attention_fwd(q, k, v, m, s, 0.25, p, "cpu")
        torch.library.opcheck(ops.cross_attention_bwd.default,
                              (q, k, v, out, row_max, row_sum, torch.randn_like(out), m, s, 0.25, p, "cpu"))


def test_opcheck_triton_schema_and_fake():
    _require("triton")
    ops = torch.ops.mmkernels
    q, k, v = (t.float().contiguous().requires_grad_() for t in _inputs(1, 2, 5, 9, 16))
    torch.library.opcheck(ops.cross_attention_fwd.default, (q, k, v, _padding(1, 9), None, 0.25, 0.0, "triton"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_fullgraph_cpu():
    _require("cpu")
    q0, k0, v0 = (t.float() for t in _inputs(2, 2, 6, 11, 16, seed=2))
    mask = _padding(2, 11)

    def step(q, k, v):
        return mmkernels.cross_attention(q, k, v, key_padding_mask=mask)

    compiled = torch.compile(step, fullgraph=True)
    with mmkernels.backend("cpu"):
        c = [t.clone().requires_grad_() for t in (q0, k0, v0)]
        out = compiled(*c)
        (out * out).sum().backward()
        e = [t.clone().requires_grad_() for t in (q0, k0, v0)]
        ref = step(*e)
        (ref * ref).sum().backward()
    assert_close(out, ref.double(), scale=4.0)
    for a, r in zip(c, e):
        assert_close(a.grad, r.grad.double(), scale=4.0)


# ----------------------------------------------------------------------------- bad inputs

def _bad(**over):
    q, k, v = (t.float() for t in _inputs(2, 2, 4, 6, 8, strided_kv=False))
    args = dict(q=q, k=k, v=v, key_padding_mask=None, dropout_p=0.0, scale=None)
    args.update(over)
    return args


@pytest.mark.parametrize("over,exc,words", [
    (dict(q=torch.randn(2, 4, 8)), ValueError, "q must have 4 dimensions"),
    (dict(k=torch.randn(2, 2, 6, 8, dtype=torch.float16)), TypeError, "dtype"),
    (dict(q=torch.randint(0, 3, (2, 2, 4, 8))), TypeError, "q must be float"),
    (dict(v=torch.randn(2, 2, 7, 8)), ValueError, "same shape"),
    (dict(k=torch.randn(3, 2, 6, 8), v=torch.randn(3, 2, 6, 8)), ValueError, "batch size"),
    (dict(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8)), ValueError, "heads"),
    (dict(k=torch.randn(2, 2, 6, 4), v=torch.randn(2, 2, 6, 4)), ValueError, "head dim"),
    (dict(q=torch.randn(1, 1, 2, 160), k=torch.randn(1, 1, 3, 160), v=torch.randn(1, 1, 3, 160)),
     ValueError, "larger than the supported"),
    (dict(key_padding_mask=torch.ones(2, 6)), TypeError, "must be bool"),
    (dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "[B, Lk]"),
    (dict(key_padding_mask=torch.ones(2, 1, 6, dtype=torch.bool)), ValueError, "2 dimensions"),
    (dict(dropout_p=1.0), ValueError, "[0, 1)"),
    (dict(dropout_p=-0.1), ValueError, "[0, 1)"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p"),
    (dict(scale="x"), TypeError, "scale"),
    (dict(q=torch.randn(2, 2, 0, 8)), ValueError, "empty"),
])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_inputs(over, exc, words, backend):
    a = _bad(**over)
    with mmkernels.backend(backend), pytest.raises(exc, match=None) as info:
        mmkernels.cross_attention(a["q"], a["k"], a["v"], key_padding_mask=a["key_padding_mask"],
                                  dropout_p=a["dropout_p"], scale=a["scale"])
    assert words in str(info.value), str(info.value)


def test_triton_rejects_float64():
    _require("triton")
    q, k, v = _inputs(1, 1, 2, 3, 8)
    with mmkernels.backend("triton"), pytest.raises(TypeError, match="float64"):
        mmkernels.cross_attention(q, k, v)


# ----------------------------------------------------------------------------- memory (cpu backend)

_MEMORY_BODY = """
import torch, mmkernels
from mmkernels.cross_attention import cross_attention_reference

def setup(which):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 256, 64, requires_grad=True)
    k, v = (torch.randn(2, 4, 8192, 64, requires_grad=True) for _ in range(2))
    mask = torch.rand(2, 8192) > 0.1
    seed = torch.tensor([1, 2])
    return which, q, k, v, mask, seed

def run(state):
    which, q, k, v, mask, seed = state
    for t in (q, k, v):
        t.grad = None
    if which == "reference":
        out = cross_attention_reference(q, k, v, mask, dropout_p=0.1, seed=seed)
    else:
        with mmkernels.backend(which):
            out = mmkernels.cross_attention(q, k, v, key_padding_mask=mask, dropout_p=0.1)
    out.sum().backward()
"""


def test_cpu_memory_has_no_scores_tensor():
    """Lq = 256 queries over Lk = 8192 keys, 2 x 4 heads, dropout and padding: the fp32 scores are
    64 MiB. The cpu backend stays far below them (gradients and per-thread tiles); the reference
    holds several score-sized tensors."""
    _require("cpu")
    from tests.helpers.rss import peak_extra
    ours = peak_extra(_MEMORY_BODY, "cpu")["extra"]
    ref = peak_extra(_MEMORY_BODY, "reference")["extra"]
    scores = 2 * 4 * 256 * 8192 * 4
    assert ref >= scores, f"reference used only {ref / 2**20:.0f} MiB"
    assert ours <= 16 * 2**20 + scores / 4, f"cpu backend used {ours / 2**20:.0f} MiB"
    assert ours <= 0.15 * ref, (ours, ref)
