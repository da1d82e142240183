"""The C++ CPU multiway LayerNorm (mmkernels._C.experts_layer_norm_fwd / _bwd) against the reference.

Called directly with (perm, offsets) routing: y / dx in token order, mean / rstd [T] float32
(float64 for float64 x), dw in the weight's dtype, db in the bias's, empty(0) for absent
gradients, zero slices for experts without tokens or outside ``dw_experts``.
"""
import pytest
import torch

from tests.experts.cases import make_ids, randn
from mmkernels.experts.reference import modality_layer_norm_reference
from mmkernels.experts.routing import route_torch
from mmkernels.testing import cpp
from mmkernels.testing.numerics import assert_close

C = cpp.kernels()

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
EPS = 1e-5


# ----------------------------------------------------------------------------- helpers

def ln_inputs(t, e, h, bias, seed):
    """x with a non-zero mean per row, weights around 1, float64."""
    x = randn(t, h, seed=seed, scale=2.0) + randn(t, 1, seed=seed + 4)
    w = 1.0 + randn(e, h, seed=seed + 1, scale=0.5)
    b = randn(e, h, seed=seed + 2, scale=0.5) if bias else None
    dy = randn(t, h, seed=seed + 3)
    return x, w, b, dy


def column_major(v):
    return v.t().contiguous().t()


def column_slice(v):
    """A column slice of a wider tensor: row stride H + 5."""
    big = torch.zeros(v.shape[0], v.shape[1] + 5, dtype=v.dtype)
    big[:, 2:2 + v.shape[1]] = v
    return big[:, 2:2 + v.shape[1]]


def strided(v):
    """Non-unit strides in both dimensions."""
    big = torch.zeros(v.shape[1], 2 * v.shape[0] + 1, dtype=v.dtype)
    big[:, 1::2] = v.t()
    return big[:, 1::2].t()


LAYOUTS = {"column_major": column_major, "column_slice": column_slice, "strided": strided}


def reference(ids, x, w, b, dy):
    """(y, dx, dw, db) of the reference with autograd, computed in x's dtype (db None without bias)."""
    leaves = [None if p is None else p.detach().clone().requires_grad_() for p in (x, w, b)]
    y = modality_layer_norm_reference(leaves[0], ids, leaves[1], leaves[2], EPS)
    gs = torch.autograd.grad(y, [p for p in leaves if p is not None], dy)
    return (y.detach(), *gs) if b is not None else (y.detach(), *gs, None)


def run(ids, e, x, w, b, dy, dtype, layout=None, wdtype=None, bdtype=None):
    """fwd + bwd of the kernel on the inputs cast to dtype (weights to wdtype / bdtype, default
    dtype), checked against the reference. Returns (y, mean, rstd, dx, dw, db)."""
    wdtype, bdtype = wdtype or dtype, bdtype or wdtype or dtype
    perm, offsets = route_torch(ids, e)
    xd, dyd, wd = x.to(dtype), dy.to(dtype), w.to(wdtype)
    bd = None if b is None else b.to(bdtype)
    if layout is not None:
        xd, dyd = layout(xd), layout(dyd)
        assert not xd.is_contiguous() and torch.equal(xd, x.to(dtype))
    y, mean, rstd = C.experts_layer_norm_fwd(xd, perm, offsets, wd, bd, EPS)
    dx, dw, db = C.experts_layer_norm_bwd(dyd, xd, perm, offsets, wd, bd, mean, rstd, True, [True] * e)

    # float64 reference on exactly the kernel's inputs; eager: the same in the tested dtype
    x64, w64, b64, dy64 = (None if v is None else v.double() for v in (xd, wd, bd, dyd))
    ref = reference(ids, x64, w64, b64, dy64)
    if dtype == torch.float64:
        eager = [None] * 4
    else:
        eager = reference(ids, xd.contiguous(), wd.to(dtype), None if bd is None else bd.to(dtype), dyd)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    r_mean = x64.mean(1)
    r_rstd = (x64.var(1, unbiased=False) + EPS).rsqrt()
    assert (y.dtype, dx.dtype, mean.dtype, rstd.dtype, dw.dtype) == (dtype, dtype, ct, ct, wdtype)
    assert y.shape == dx.shape == x.shape and mean.shape == rstd.shape == (x.shape[0],) and dw.shape == w.shape
    assert_close(mean, r_mean, ct, name="mean")
    assert_close(rstd, r_rstd, ct, name="rstd")
    for name, got, r, ea in zip(("y", "dx", "dw"), (y, dx, dw), ref, eager):
        assert_close(got, r, dtype, eager=ea, name=name)
    if b is None:
        assert db.numel() == 0
    else:
        assert db.dtype == bdtype and db.shape == b.shape
        assert_close(db, ref[3], dtype, eager=eager[3], name="db")
    return y, mean, rstd, dx, dw, db


# ----------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["random", "empty", "one"])
@pytest.mark.parametrize("e", [1, 2, 3, 8])
@pytest.mark.parametrize("t", [1, 7, 97])
def test_layer_norm(t, e, layout, dtype):
    """Ragged T, H = 37 (not a multiple of the 8 lanes), an expert without tokens (empty), every
    token in one expert (one), with and without bias."""
    ids = make_ids((t,), e, layout, seed=t * 7 + e)
    for bias in (True, False):
        x, w, b, dy = ln_inputs(t, e, 37, bias, seed=t + e)
        *_, dw, db = run(ids, e, x, w, b, dy, dtype)
        for k in range(e):  # experts without tokens get exactly zero gradients
            if not bool((ids == k).any()):
                assert bool((dw[k] == 0).all()) and (not bias or bool((db[k] == 0).all()))


@pytest.mark.parametrize("h,dtype", [(96, torch.bfloat16), (96, torch.float64), (130, torch.float16),
                                     (768, torch.float32)], ids=str)
def test_layer_norm_widths(h, dtype):
    """Wider rows: H = 130 and 768 span several dw column blocks (128 columns), one partial."""
    t, e = 97, 3
    ids = make_ids((t,), e, "random", seed=h)
    run(ids, e, *ln_inputs(t, e, h, True, seed=h), dtype)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_layer_norm_noncontiguous(dtype, layout):
    """Non-contiguous x and dy; non-contiguous (column-major) weight and bias."""
    t, e = 97, 3
    ids = make_ids((t,), e, "random", seed=3)
    x, w, b, dy = ln_inputs(t, e, 45, True, seed=9)
    run(ids, e, x, column_major(w), column_major(b), dy, dtype, layout=LAYOUTS[layout])


def test_layer_norm_mixed_param_dtypes():
    """bfloat16 x with a float32 weight and a float16 bias: dw in float32, db in float16."""
    t, e = 40, 2
    ids = make_ids((t,), e, "random", seed=4)
    run(ids, e, *ln_inputs(t, e, 24, True, seed=2), torch.bfloat16, wdtype=torch.float32, bdtype=torch.float16)


def test_layer_norm_threads_deterministic():
    """Bitwise the same results on 1 and on all threads (dw / db: each column summed by one thread)."""
    t, e, h = 600, 2, 300
    ids = make_ids((t,), e, "random", seed=6)
    perm, offsets = route_torch(ids, e)
    x, w, b, dy = (v.float() for v in ln_inputs(t, e, h, True, seed=6))

    def both():
        y, mean, rstd = C.experts_layer_norm_fwd(x, perm, offsets, w, b, EPS)
        return (y, mean, rstd) + C.experts_layer_norm_bwd(dy, x, perm, offsets, w, b, mean, rstd, True, [True] * e)

    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = both()
    finally:
        torch.set_num_threads(n)
    for a, c in zip(one, both()):
        assert torch.equal(a, c)


# ----------------------------------------------------------------------------- flags and masks

def test_layer_norm_needs_flags_and_masks():
    """needs_dx and dw_experts: what is computed equals the full backward; experts left out get
    exactly zero slices; with no flag set dw and db are empty."""
    t, e = 60, 3
    ids = make_ids((t,), e, "random", seed=5)
    perm, offsets = route_torch(ids, e)
    x, w, b, dy = ln_inputs(t, e, 33, True, seed=7)
    y, mean, rstd = C.experts_layer_norm_fwd(x, perm, offsets, w, b, EPS)
    args = (dy, x, perm, offsets, w, b, mean, rstd)
    every, none = [True] * e, [False] * e
    full = C.experts_layer_norm_bwd(*args, True, every)
    dx, dw, db = C.experts_layer_norm_bwd(*args, False, every)
    assert dx.numel() == 0 and torch.equal(dw, full[1]) and torch.equal(db, full[2])
    dx, dw, db = C.experts_layer_norm_bwd(*args, True, none)
    assert torch.equal(dx, full[0]) and dw.numel() == 0 and db.numel() == 0
    dx, dw, db = C.experts_layer_norm_bwd(*args, False, [True, False, True])
    assert dx.numel() == 0
    for k in range(e):
        if k == 1:  # frozen: zero slices, where the full backward is not zero
            assert bool((dw[k] == 0).all()) and bool((db[k] == 0).all())
            assert bool(full[1][k].abs().sum() > 0) and bool(full[2][k].abs().sum() > 0)
        else:
            assert torch.equal(dw[k], full[1][k]) and torch.equal(db[k], full[2][k])
    dx, dw, db = C.experts_layer_norm_bwd(dy, x, perm, offsets, w, None, mean, rstd, True, every)
    assert torch.equal(dx, full[0]) and torch.equal(dw, full[1]) and db.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_layer_norm_zero_tokens(dtype):
    e, h = 3, 10
    perm, offsets = route_torch(torch.zeros(0, dtype=torch.long), e)
    x, dy = torch.zeros(0, h, dtype=dtype), torch.zeros(0, h, dtype=dtype)
    w, b = randn(e, h, seed=1).to(dtype), randn(e, h, seed=2).to(dtype)
    y, mean, rstd = C.experts_layer_norm_fwd(x, perm, offsets, w, b, EPS)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.shape == (0, h) and y.dtype == dtype and mean.shape == rstd.shape == (0,) and mean.dtype == ct
    dx, dw, db = C.experts_layer_norm_bwd(dy, x, perm, offsets, w, b, mean, rstd, True, [True] * e)
    assert dx.shape == (0, h) and dw.shape == db.shape == (e, h) and dw.dtype == db.dtype == dtype
    assert bool((dw == 0).all()) and bool((db == 0).all())
    dx, dw, db = C.experts_layer_norm_bwd(dy, x, perm, offsets, w, b, mean, rstd, True, [False] * e)
    assert dx.shape == (0, h) and dw.numel() == 0 and db.numel() == 0


# ----------------------------------------------------------------------------- errors

def _bad_cases():
    t, e, h = 12, 2, 8
    ids = make_ids((t,), e, "random", seed=1)
    perm, offsets = route_torch(ids, e)
    x, w, b, dy = (v.float() for v in ln_inputs(t, e, h, True, seed=1))
    _, mean, rstd = C.experts_layer_norm_fwd(x, perm, offsets, w, b, EPS)
    fwd = dict(x=x, perm=perm, offsets=offsets, weight=w, bias=b, eps=EPS)
    bwd = dict(dy=dy, x=x, perm=perm, offsets=offsets, weight=w, bias=b, mean=mean, rstd=rstd, needs_dx=True,
               dw_experts=[True] * e)
    return [
        ("fwd", dict(fwd, x=x[0]), "x must be 2-D"),
        ("fwd", dict(fwd, x=x.int()), "x must be float32, float64, bfloat16 or float16"),
        ("fwd", dict(fwd, x=x[:, :0]), "at least one feature"),
        ("fwd", dict(fwd, weight=w[0]), "weight must be 2-D"),
        ("fwd", dict(fwd, weight=torch.randn(e, h + 1)), r"weight must have shape \[2, 8\]"),
        ("fwd", dict(fwd, bias=torch.randn(e, h - 1)), r"bias must have shape \[2, 8\]"),
        ("fwd", dict(fwd, perm=perm[1:]), r"perm must have shape \[12\]"),
        ("fwd", dict(fwd, offsets=offsets[1:]), r"offsets must have shape \[3\]"),
        ("fwd", dict(fwd, offsets=torch.tensor([0, 5, 11], dtype=torch.int32)), "offsets must run from 0"),
        ("bwd", dict(bwd, dy=torch.randn(t, h + 1)), r"dy must have shape \[12, 8\]"),
        ("bwd", dict(bwd, weight=torch.randn(e + 1, h + 1)), r"weight must have shape \[3, 8\]"),
        ("bwd", dict(bwd, bias=torch.randn(e + 1, h)), r"bias must have shape \[2, 8\]"),
        ("bwd", dict(bwd, mean=mean[1:]), r"mean must have shape \[12\]"),
        ("bwd", dict(bwd, rstd=rstd[:, None]), r"rstd must have shape \[12\]"),
        ("bwd", dict(bwd, dw_experts=[True]), "one flag per expert"),
    ]


def test_layer_norm_bad_input():
    for which, kwargs, match in _bad_cases():
        fn = C.experts_layer_norm_fwd if which == "fwd" else C.experts_layer_norm_bwd
        with pytest.raises(RuntimeError, match=match):
            fn(**kwargs)
