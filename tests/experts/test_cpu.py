"""The C++ CPU modality-expert kernels (mmkernels._C.experts_*) against the loop-over-experts reference.

These call the extension directly (no dispatch, no autograd wrapper) and pin the kernel interface of
``mmkernels.experts.ops`` (its module docstring): routing by (perm, offsets) int32 tensors, outputs in token order,
the FFN's h / a in sorted order, empty(0) for absent gradients, zero gradients for experts without
tokens, T = 0. The reference (mmkernels.experts.reference) is evaluated in float64 with autograd and
a random upstream gradient; for 16-bit and float32 inputs "eager" is the same reference evaluated in
the input dtype, which sets the allowance of mmkernels.testing.numerics.assert_close.
"""
import pytest
import torch

from mmkernels.experts import activations
from mmkernels.experts.reference import modality_ffn_reference, modality_linear_reference
from mmkernels.testing import cpp
from mmkernels.testing.numerics import assert_close

C = cpp.kernels()

ACTS = ["gelu", "gelu_tanh", "silu", "relu", "swiglu"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


# ----------------------------------------------------------------------------- helpers

def routing(ids, num_experts):
    perm = torch.argsort(ids, stable=True).int()
    counts = torch.bincount(ids, minlength=num_experts)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)]).int()
    return perm, offsets


def make_ids(t, e, layout, seed=0):
    """Modality ids [t] in [0, e). layout: random | empty (expert 1 gets no token, when e > 1) |
    one (every token in the last expert)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, e, (t,), generator=g)
    if layout == "empty" and e > 1:
        ids[ids == 1] = 0
    elif layout == "one":
        ids.fill_(e - 1)
    return ids


def randn(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def noncontig(t):
    """The same values as ``t`` [T, W], as a view with non-unit strides in both dimensions."""
    big = torch.zeros(t.shape[1], 2 * t.shape[0] + 1, dtype=t.dtype)
    big[:, 1::2] = t.t()
    v = big[:, 1::2].t()
    assert not v.is_contiguous() and v.stride(1) != 1 and torch.equal(v, t)
    return v


def grads(fn, inputs, dy):
    """(out, grads of every defined input) of fn(*inputs) with upstream dy (autograd)."""
    req = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*req)
    gs = torch.autograd.grad(out, [t for t in req if t is not None], dy)
    it = iter(gs)
    return out.detach(), [None if t is None else next(it) for t in req]


def cast(ts, dtype):
    return [None if t is None else t.to(dtype) for t in ts]


def check(name, actual, ref64, eager, dtype):
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype} != {dtype}"
    assert_close(actual, ref64, dtype, eager=eager, name=name)


# ----------------------------------------------------------------------------- linear

def linear_inputs(t, e, hin, hout, bias, seed):
    x = randn(t, hin, seed=seed)
    w = randn(e, hout, hin, seed=seed + 1, scale=hin ** -0.5)
    b = randn(e, hout, seed=seed + 2, scale=0.1) if bias else None
    dy = randn(t, hout, seed=seed + 3)
    return x, w, b, dy


def run_linear(ids, e, x, w, b, dy, dtype, layout_x=None):
    """Run fwd + bwd of the kernel on inputs cast to dtype and compare with the reference."""
    perm, offsets = routing(ids, e)
    xd, wd, bd, dyd = cast((x, w, b, dy), dtype)
    if layout_x is not None:
        xd, dyd = layout_x(xd), layout_x(dyd)
    y = C.experts_linear_fwd(xd, perm, offsets, wd, bd)
    dx, dw, db = C.experts_linear_bwd(dyd, xd, perm, offsets, wd, bd, True, [True] * e)

    def fn(x_, w_, b_):
        return modality_linear_reference(x_, ids, w_, b_)

    r_y, r_g = grads(fn, cast((x, w, b), torch.float64), dy)
    if dtype == torch.float64:
        e_y, e_g = None, [None] * 3
    else:
        e_y, e_g = grads(fn, cast((x, w, b), dtype), dy.to(dtype))
    check("y", y, r_y, e_y, dtype)
    check("dx", dx, r_g[0], e_g[0], dtype)
    check("dw", dw, r_g[1], e_g[1], dtype)
    if b is None:
        assert db.numel() == 0
    else:
        check("db", db, r_g[2], e_g[2], dtype)
    return y, dx, dw, db


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["random", "empty", "one"])
@pytest.mark.parametrize("e", [1, 2, 3])
@pytest.mark.parametrize("t", [1, 7, 97])
def test_linear(t, e, layout, dtype):
    ids = make_ids(t, e, layout, seed=t * 7 + e)
    for bias in (True, False):
        x, w, b, dy = linear_inputs(t, e, 24, 20, bias, seed=t + e)
        _, _, dw, db = run_linear(ids, e, x, w, b, dy, dtype)
        for k in range(e):  # experts without tokens get exactly zero gradients
            if not bool((ids == k).any()):
                assert bool((dw[k] == 0).all())
                if bias:
                    assert bool((db[k] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_linear_noncontiguous(dtype):
    t, e = 97, 3
    ids = make_ids(t, e, "random", seed=11)
    x, w, b, dy = linear_inputs(t, e, 33, 17, True, seed=5)
    run_linear(ids, e, x, w, b, dy, dtype, layout_x=noncontig)
    # transposed (column-major) x and dy, and non-contiguous weights
    run_linear(ids, e, x, w.transpose(1, 2).contiguous().transpose(1, 2), b, dy, dtype,
               layout_x=lambda v: v.t().contiguous().t())


def test_linear_needs_flags():
    t, e = 50, 2
    ids = make_ids(t, e, "random", seed=3)
    perm, offsets = routing(ids, e)
    x, w, b, dy = linear_inputs(t, e, 16, 8, True, seed=9)
    every, none = [True] * e, [False] * e
    full = C.experts_linear_bwd(dy, x, perm, offsets, w, b, True, every)
    dx, dw, db = C.experts_linear_bwd(dy, x, perm, offsets, w, b, True, none)
    assert dw.numel() == 0 and db.numel() == 0 and torch.equal(dx, full[0])
    dx, dw, db = C.experts_linear_bwd(dy, x, perm, offsets, w, b, False, every)
    assert dx.numel() == 0 and torch.equal(dw, full[1]) and torch.equal(db, full[2])
    dx, dw, db = C.experts_linear_bwd(dy, x, perm, offsets, w, None, False, every)
    assert dx.numel() == 0 and db.numel() == 0 and torch.equal(dw, full[1])
    dx, dw, db = C.experts_linear_bwd(dy, x, perm, offsets, w, None, False, none)
    assert dx.numel() == 0 and dw.numel() == 0 and db.numel() == 0
    # a frozen expert 0: zero slices, the other expert's gradients unchanged
    dx, dw, db = C.experts_linear_bwd(dy, x, perm, offsets, w, b, True, [False, True])
    assert torch.equal(dx, full[0]) and torch.equal(dw[1], full[1][1]) and torch.equal(db[1], full[2][1])
    assert bool((dw[0] == 0).all()) and bool((db[0] == 0).all()) and bool(full[1][0].abs().sum() > 0)
    with pytest.raises(RuntimeError, match="one flag per expert"):
        C.experts_linear_bwd(dy, x, perm, offsets, w, b, True, [True])


def test_linear_mixed_weight_dtype():
    """Weight and bias gradients come back in the weight's dtype, outputs and dx in x's."""
    t, e = 40, 2
    ids = make_ids(t, e, "random", seed=4)
    perm, offsets = routing(ids, e)
    x, w, b, dy = linear_inputs(t, e, 16, 8, True, seed=2)
    xb, dyb = x.to(torch.bfloat16), dy.to(torch.bfloat16)
    wf, bf = w.float(), b.to(torch.bfloat16)
    y = C.experts_linear_fwd(xb, perm, offsets, wf, bf)
    dx, dw, db = C.experts_linear_bwd(dyb, xb, perm, offsets, wf, bf, True, [True] * e)
    assert (y.dtype, dx.dtype, dw.dtype, db.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)
    r_y, r_g = grads(lambda x_, w_, b_: modality_linear_reference(x_, ids, w_, b_),
                     (xb.double(), w, b), dyb.double())
    assert_close(y, r_y, torch.bfloat16, name="y")
    assert_close(dw, r_g[1], torch.bfloat16, name="dw")
    assert_close(db, r_g[2], torch.bfloat16, name="db")


# ----------------------------------------------------------------------------- FFN

def ffn_inputs(t, e, hin, f, hout, act, bias, seed):
    fi = 2 * f if act == "swiglu" else f
    x = randn(t, hin, seed=seed)
    w_in = randn(e, fi, hin, seed=seed + 1, scale=hin ** -0.5)
    w_out = randn(e, hout, f, seed=seed + 2, scale=f ** -0.5)
    b_in = randn(e, fi, seed=seed + 3, scale=0.1) if bias else None
    b_out = randn(e, hout, seed=seed + 4, scale=0.1) if bias else None
    dy = randn(t, hout, seed=seed + 5)
    return x, w_in, b_in, w_out, b_out, dy


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_ffn_backward_flags_and_expert_masks(act):
    """needs_dx and the per-expert weight-gradient masks: what is computed equals the full
    backward; experts left out get zero slices; a gradient no expert wants is empty."""
    t, e = 60, 3
    ids = make_ids(t, e, "random", seed=5)
    perm, offsets = routing(ids, e)
    x, w_in, b_in, w_out, b_out, dy = ffn_inputs(t, e, 12, 10, 8, act, True, seed=6)
    y, h, a = C.experts_ffn_fwd(x, perm, offsets, w_in, b_in, w_out, b_out, act)
    args = (dy, x, perm, offsets, w_in, b_in, w_out, b_out, h, a, act)
    every, none = [True] * e, [False] * e
    full = C.experts_ffn_bwd(*args, True, every, every)
    got = C.experts_ffn_bwd(*args, True, none, none)
    assert torch.equal(got[0], full[0]) and all(g.numel() == 0 for g in got[1:])
    got = C.experts_ffn_bwd(*args, False, [True, False, True], [False, True, False])
    assert got[0].numel() == 0
    for k, mask in ((1, [True, False, True]), (2, [True, False, True]), (3, [False, True, False]),
                    (4, [False, True, False])):
        for i in range(e):
            if mask[i]:
                assert torch.equal(got[k][i], full[k][i]), (k, i)
            else:
                assert bool((got[k][i] == 0).all()) and bool(full[k][i].abs().sum() > 0), (k, i)
    with pytest.raises(RuntimeError, match="one flag per expert"):
        C.experts_ffn_bwd(*args, True, every, [True])


def ffn_h_sorted(x, ids, perm, w_in, b_in):
    """The pre-activation h of every token, float64, in sorted order."""
    h = torch.zeros(x.shape[0], w_in.shape[1], dtype=torch.float64)
    for k in range(w_in.shape[0]):
        sel = ids == k
        h[sel] = torch.nn.functional.linear(x[sel].double(), w_in[k].double(),
                                            None if b_in is None else b_in[k].double())
    return h[perm.long()]


def run_ffn(ids, e, act, x, w_in, b_in, w_out, b_out, dy, dtype, layout_x=None):
    perm, offsets = routing(ids, e)
    xd, wid, bid, wod, bod, dyd = cast((x, w_in, b_in, w_out, b_out, dy), dtype)
    if layout_x is not None:
        xd, dyd = layout_x(xd), layout_x(dyd)
    y, h, a = C.experts_ffn_fwd(xd, perm, offsets, wid, bid, wod, bod, act)
    dx, dw_in, db_in, dw_out, db_out = C.experts_ffn_bwd(dyd, xd, perm, offsets, wid, bid, wod, bod, h, a, act,
                                                         True, [True] * e, [True] * e)

    def fn(x_, wi_, bi_, wo_, bo_):
        return modality_ffn_reference(x_, ids, wi_, bi_, wo_, bo_, act)

    ins = (x, w_in, b_in, w_out, b_out)
    r_y, r_g = grads(fn, cast(ins, torch.float64), dy)
    if dtype == torch.float64:
        e_y, e_g = None, [None] * 5
        e_h = e_a = None
    else:
        e_y, e_g = grads(fn, cast(ins, dtype), dy.to(dtype))
        e_h = ffn_h_sorted(xd, ids, perm, wid, bid).to(dtype)
        e_a = activations.apply(act, e_h)
    r_h = ffn_h_sorted(x, ids, perm, w_in, b_in)
    r_a = activations.apply(act, r_h)
    check("y", y, r_y, e_y, dtype)
    check("h", h, r_h, e_h, dtype)
    check("a", a, r_a, e_a, dtype)
    check("dx", dx, r_g[0], e_g[0], dtype)
    check("dw_in", dw_in, r_g[1], e_g[1], dtype)
    check("dw_out", dw_out, r_g[3], e_g[3], dtype)
    if b_in is None:
        assert db_in.numel() == 0 and db_out.numel() == 0
    else:
        check("db_in", db_in, r_g[2], e_g[2], dtype)
        check("db_out", db_out, r_g[4], e_g[4], dtype)
    return y, h, a, dx, dw_in, db_in, dw_out, db_out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_ffn_activations(act, dtype):
    for t, e, layout, bias in ((97, 3, "random", True), (97, 3, "empty", False), (7, 2, "one", True),
                               (1, 1, "random", True)):
        ids = make_ids(t, e, layout, seed=t + e)
        ins = ffn_inputs(t, e, 24, 40, 20, act, bias, seed=t * 3 + e)
        out = run_ffn(ids, e, act, *ins, dtype)
        dw_in, db_in, dw_out, db_out = out[4], out[5], out[6], out[7]
        for k in range(e):
            if not bool((ids == k).any()):
                assert bool((dw_in[k] == 0).all()) and bool((dw_out[k] == 0).all())
                if bias:
                    assert bool((db_in[k] == 0).all()) and bool((db_out[k] == 0).all())


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_ffn_noncontiguous(dtype, act):
    t, e = 97, 2
    ids = make_ids(t, e, "random", seed=21)
    ins = ffn_inputs(t, e, 19, 33, 11, act, True, seed=8)
    run_ffn(ids, e, act, *ins, dtype, layout_x=noncontig)


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_ffn_special_values(act):
    """relu at exactly 0 has zero derivative (as torch); large |h| saturates without NaN."""
    t, e, f = 6, 1, 4
    ids = torch.zeros(t, dtype=torch.long)
    perm, offsets = routing(ids, e)
    x = torch.tensor([[1.0], [0.0], [-1.0], [300.0], [-300.0], [2.5]], dtype=torch.float64)
    w_in = torch.ones(e, f, 1, dtype=torch.float64)
    w_out = torch.ones(e, 3, f, dtype=torch.float64)
    dy = torch.ones(t, 3, dtype=torch.float64)
    y, h, a = C.experts_ffn_fwd(x, perm, offsets, w_in, None, w_out, None, act)
    dx, *_ = C.experts_ffn_bwd(dy, x, perm, offsets, w_in, None, w_out, None, h, a, act, True, [True] * e,
                               [True] * e)
    r_y, r_g = grads(lambda x_: modality_ffn_reference(x_, ids, w_in, None, w_out, None, act), [x], dy)
    assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(dx).all())
    assert_close(y, r_y, name="y")
    assert_close(dx, r_g[0], name="dx")


# ----------------------------------------------------------------------------- T = 0

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_zero_tokens(dtype):
    e, hin, f, hout = 3, 8, 12, 5
    ids = torch.zeros(0, dtype=torch.long)
    perm, offsets = routing(ids, e)
    assert perm.shape == (0,) and offsets.tolist() == [0] * (e + 1)
    x = torch.zeros(0, hin, dtype=dtype)
    dy = torch.zeros(0, hout, dtype=dtype)
    w = randn(e, hout, hin, seed=1).to(dtype)
    b = randn(e, hout, seed=2).to(dtype)
    y = C.experts_linear_fwd(x, perm, offsets, w, b)
    assert y.shape == (0, hout) and y.dtype == dtype
    dx, dw, db = C.experts_linear_bwd(dy, x, perm, offsets, w, b, True, [True] * e)
    assert dx.shape == (0, hin) and dw.shape == w.shape and db.shape == b.shape
    assert bool((dw == 0).all()) and bool((db == 0).all())
    for act in ACTS:
        fi = 2 * f if act == "swiglu" else f
        w_in, b_in = randn(e, fi, hin, seed=3).to(dtype), randn(e, fi, seed=4).to(dtype)
        w_out, b_out = randn(e, hout, f, seed=5).to(dtype), randn(e, hout, seed=6).to(dtype)
        y, h, a = C.experts_ffn_fwd(x, perm, offsets, w_in, b_in, w_out, b_out, act)
        assert y.shape == (0, hout) and h.shape == (0, fi) and a.shape == (0, f)
        dx, dw_in, db_in, dw_out, db_out = C.experts_ffn_bwd(dy, x, perm, offsets, w_in, b_in, w_out, b_out,
                                                             h, a, act, True, [True] * e, [True] * e)
        assert dx.shape == (0, hin) and dw_in.shape == w_in.shape and dw_out.shape == w_out.shape
        assert db_in.shape == b_in.shape and db_out.shape == b_out.shape
        for g in (dw_in, db_in, dw_out, db_out):
            assert g.dtype == dtype and bool((g == 0).all())
        _, _, db_in, _, db_out = C.experts_ffn_bwd(dy, x, perm, offsets, w_in, None, w_out, None, h, a, act,
                                                   True, [True] * e, [True] * e)
        assert db_in.numel() == 0 and db_out.numel() == 0


# ----------------------------------------------------------------------------- large (chunked)

def test_ffn_large_chunked():
    """T = 3000 tokens, H = 256, F = 1024: an expert with more rows than one chunk (2048)."""
    t, e, hin, f, hout = 3000, 3, 256, 1024, 256
    ids = make_ids(t, e, "random", seed=1)
    ids[:2600] = 2  # expert 2: > 2600 tokens (two chunks of up to 2048 rows); 0/1 share the rest
    ins = ffn_inputs(t, e, hin, f, hout, "gelu", True, seed=77)
    run_ffn(ids, e, "gelu", *ins, torch.float32)


def test_linear_large_chunked_bf16():
    t, e, hin, hout = 3000, 2, 256, 512
    ids = make_ids(t, e, "random", seed=2)
    ids[100:2500] = 1
    x, w, b, dy = linear_inputs(t, e, hin, hout, True, seed=13)
    run_linear(ids, e, x, w, b, dy, torch.bfloat16, layout_x=noncontig)


def test_ffn_large_chunked_swiglu_bf16():
    t, e, hin, f, hout = 2500, 2, 128, 256, 128
    ids = make_ids(t, e, "one", seed=3)  # all 2500 tokens in expert 1: 2 chunks
    ins = ffn_inputs(t, e, hin, f, hout, "swiglu", False, seed=5)
    run_ffn(ids, e, "swiglu", *ins, torch.bfloat16)
