"""modality_linear / modality_ffn on every backend against the float64 reference, forward and every gradient.

The ``cpu`` backend runs the C++ kernels, ``triton`` the Triton kernels (through the interpreter on
this machine), both through the registered ops and the public API; ``reference`` is the
loop-over-experts definition. Shapes stay small (T <= 97, H <= 64) because the interpreter is slow.
"""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.experts import routing
from mmkernels.experts.reference import modality_linear_reference
from mmkernels.testing.numerics import assert_close

from tests.experts.cases import (ACTS, DTYPES, check_grads, ffn_params, linear_params, make_ids, names, randn,
                                 run)
from tests.helpers.backends import require_backend

BACKENDS = ["cpu", "triton"]


def _require(backend):
    require_backend(backend, "experts", "experts_linear_fwd", "mmkernels.experts.kernels")


def _compare(kind, backend, x, ids, params, dtype=torch.float32, activation="gelu", seed=99):
    """``backend`` in ``dtype`` against the reference in float64; "eager" is the reference in ``dtype``."""
    h_out = params[0].shape[1] if kind == "linear" else params[2].shape[1]
    dy = randn(*x.shape[:-1], h_out, seed=seed)
    got = run(kind, backend, x, ids, params, dy, activation, dtype)
    check_grads(backend, kind, got, x, ids, params, dy, activation, dtype)
    return got


# ----------------------------------------------------------------------------- expert counts, layouts, sizes

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("e,layout", [(1, "random"), (2, "random"), (3, "random"), (3, "empty"),
                                      (2, "empty"), (3, "one"), (2, "first")])
def test_linear_experts_and_layouts(backend, e, layout):
    _require(backend)
    x = randn(3, 13, 24, seed=1)
    ids = make_ids((3, 13), e, layout, seed=2)
    _compare("linear", backend, x, ids, linear_params(e, 24, 40), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("e,layout", [(1, "random"), (2, "random"), (3, "random"), (3, "empty"), (3, "one")])
def test_ffn_experts_and_layouts(backend, e, layout):
    _require(backend)
    x = randn(2, 17, 16, seed=3)
    ids = make_ids((2, 17), e, layout, seed=4)
    _compare("ffn", backend, x, ids, ffn_params(e, 16, 48, 16), torch.float32, "gelu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1, 7, 97])
def test_ragged_token_counts(backend, t):
    _require(backend)
    x = randn(t, 40, seed=5)
    ids = make_ids((t,), 3, seed=6)
    _compare("linear", backend, x, ids, linear_params(3, 40, 24), torch.float32)
    _compare("ffn", backend, x, ids, ffn_params(3, 40, 56, 24, "swiglu"), torch.float32, "swiglu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTS)
def test_every_activation(backend, activation):
    _require(backend)
    x = randn(37, 32, seed=7)
    ids = make_ids((37,), 2, seed=8)
    _compare("ffn", backend, x, ids, ffn_params(2, 32, 24, 32, activation), torch.float32, activation)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_biases(backend):
    _require(backend)
    x = randn(2, 11, 24, seed=9)
    ids = make_ids((2, 11), 3, seed=10)
    _compare("linear", backend, x, ids, linear_params(3, 24, 16, bias=False), torch.float32)
    _compare("ffn", backend, x, ids, ffn_params(3, 24, 32, 24, "swiglu", bias=False), torch.float32, "swiglu")
    w_in, b_in, w_out, _ = ffn_params(3, 24, 32, 8, "gelu")  # first-layer bias only, H_out != H_in
    _compare("ffn", backend, x, ids, [w_in, b_in, w_out, None], torch.float32, "gelu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(backend, dtype):
    _require(backend)
    x = randn(4, 23, 64, seed=11)
    ids = make_ids((4, 23), 3, seed=12)
    _compare("linear", backend, x, ids, linear_params(3, 64, 48), dtype)
    _compare("ffn", backend, x[:2], ids[:2], ffn_params(3, 64, 32, 64, "gelu"), dtype, "gelu")
    _compare("ffn", backend, x[2:], ids[2:], ffn_params(3, 64, 32, 64, "swiglu"), dtype, "swiglu")


def test_cpu_float64():
    _require("cpu")
    x = randn(2, 9, 12, seed=13)
    ids = make_ids((2, 9), 3, seed=14)
    _compare("linear", "cpu", x, ids, linear_params(3, 12, 8), torch.float64)
    _compare("ffn", "cpu", x, ids, ffn_params(3, 12, 10, 8, "swiglu"), torch.float64, "swiglu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_ids_and_non_contiguous_x(backend):
    _require(backend)
    base = randn(24, 2, 5, seed=15)  # [H, B, S] -> x [B, S, H] strided view
    x = base.permute(1, 2, 0)
    assert not x.is_contiguous()
    ids = make_ids((2, 5), 2, seed=16, dtype=torch.int32)
    _compare("linear", backend, x, ids, linear_params(2, 24, 16), torch.float32)
    _compare("ffn", backend, x, ids, ffn_params(2, 24, 16, 24, "silu"), torch.float32, "silu")
    x2 = randn(3, 7, 48, seed=17)[..., ::2]  # last-dim stride 2
    _compare("linear", backend, x2, make_ids((3, 7), 3, seed=18), linear_params(3, 24, 8), torch.float32)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 5)])
def test_zero_tokens(backend, lead):
    if backend != "reference":
        _require(backend)
    x = torch.randn(*lead, 8, requires_grad=True)
    ids = torch.zeros(lead, dtype=torch.int64)
    w, b = (t.float().requires_grad_() for t in linear_params(2, 8, 6))
    params = [t.float().requires_grad_() for t in ffn_params(2, 8, 12, 5, "swiglu")]
    with mmkernels.backend(backend):
        y = mmkernels.modality_linear(x, ids, w, b)
        assert y.shape == (*lead, 6) and y.dtype == torch.float32
        y.sum().backward()
        assert (w.grad == 0).all() and (b.grad == 0).all()
        y = mmkernels.modality_ffn(x, ids, *params, "swiglu")
        assert y.shape == (*lead, 5)
        y.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
        for p in params:
            assert p.grad is not None and p.grad.shape == p.shape and (p.grad == 0).all()
        if len(lead) == 2:  # the split form with zero tokens
            y = mmkernels.modality_ffn(x, min(1, lead[1]), *params, "swiglu")
            assert y.shape == (*lead, 5)


# ----------------------------------------------------------------------------- position split

@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("p", [0, 3, 9])
def test_split_position_equals_ids(backend, p):
    """The int split position and the equivalent ids tensor give identical outputs and gradients."""
    if backend != "reference":
        _require(backend)
    b, s = 3, 9
    x = randn(b, s, 24, seed=19)
    ids = routing.split_ids(b, s, p, "cpu")
    dy_lin, dy_ffn = randn(b, s, 16, seed=20), randn(b, s, 24, seed=21)
    for kind, params, dy, act in (("linear", linear_params(2, 24, 16), dy_lin, "gelu"),
                                  ("ffn", ffn_params(2, 24, 20, 24, "swiglu"), dy_ffn, "swiglu"),
                                  ("ffn", ffn_params(2, 24, 20, 24, "gelu_tanh"), dy_ffn, "gelu_tanh")):
        split = run(kind, backend, x, p, params, dy, act, torch.float32)
        dense = run(kind, backend, x, ids, params, dy, act, torch.float32)
        for name, a, c in zip(names(kind), split, dense):
            assert torch.equal(a, c), f"{kind} {name}: split position differs from the ids form"
        if backend != "reference":
            ref = run(kind, "reference", x, ids, params, dy, act, torch.float64)
            assert_close(split[0], ref[0], torch.float32, scale=4.0)


def test_route_split_matches_route():
    for b, s, p in ((3, 9, 0), (3, 9, 4), (2, 5, 5), (1, 1, 1), (4, 17, 6)):
        ids = routing.split_ids(b, s, p, "cpu")
        a, c = routing.route_split(b, s, p, "cpu"), routing.route(ids.reshape(-1), 2)
        assert torch.equal(a.perm, c.perm) and torch.equal(a.offsets, c.offsets)


def test_route_split_makes_no_host_to_device_copy():
    """Writing Python ints into a device tensor (``t[i] = v``, ``torch.tensor(..., device)``) is a
    pageable host-to-device copy: not capturable in a CUDA graph. Traced on the meta device: the
    split routing may only fill, never copy a host scalar."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        r = routing.route_split(3, 9, 4, "meta")
    assert r.offsets.device.type == "meta"
    assert not [n for n in ops.names if "copy_" in n or "scalar_tensor" in n or "lift" in n], ops.names


@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_feeds_the_op(backend):
    """The registered op with the routing of the ids reproduces the API (and so the reference)."""
    _require(backend)
    x = randn(31, 16, seed=22).float()
    ids = make_ids((31,), 3, seed=23)
    w, b = (t.float() for t in linear_params(3, 16, 8))
    perm, offsets = routing.route(ids, 3, backend)
    assert perm.dtype == torch.int32 and offsets.dtype == torch.int32
    assert offsets.tolist() == [0] + torch.cumsum(torch.bincount(ids, minlength=3), 0).tolist()
    y = torch.ops.mmkernels.modality_linear_fwd(x, w, b, perm, offsets, [True] * 3, backend)
    assert_close(y, modality_linear_reference(x.double(), ids, w.double(), b.double()))


# ----------------------------------------------------------------------------- partial gradients

@pytest.mark.parametrize("backend", BACKENDS)
def test_needs_input_grad_subsets(backend):
    """Only the gradients asked for are computed, and they equal the full computation's."""
    _require(backend)
    x0 = randn(2, 13, 16, seed=24).float()
    ids = make_ids((2, 13), 2, seed=25)
    params0 = [t.float() for t in ffn_params(2, 16, 24, 16, "silu")]
    lin0 = [t.float() for t in linear_params(2, 16, 8)]
    with mmkernels.backend(backend):
        full = [t.clone().requires_grad_() for t in [x0] + params0]
        mmkernels.modality_ffn(full[0], ids, *full[1:], "silu").sum().backward()
        for which in ([0], [1, 3], [2, 4], [1]):
            ts = [t.clone().requires_grad_(i in which) for i, t in enumerate([x0] + params0)]
            mmkernels.modality_ffn(ts[0], ids, *ts[1:], "silu").sum().backward()
            for i, t in enumerate(ts):
                if i in which:
                    assert torch.equal(t.grad, full[i].grad), (which, i)
                else:
                    assert t.grad is None
        fl = [t.clone().requires_grad_() for t in [x0] + lin0]
        mmkernels.modality_linear(fl[0], ids, *fl[1:]).sum().backward()
        for which in ([0], [1], [2], [1, 2]):
            ts = [t.clone().requires_grad_(i in which) for i, t in enumerate([x0] + lin0)]
            mmkernels.modality_linear(ts[0], ids, *ts[1:]).sum().backward()
            for i, t in enumerate(ts):
                if i in which:
                    assert torch.equal(t.grad, fl[i].grad), (which, i)
                else:
                    assert t.grad is None
        y = mmkernels.modality_linear(x0, ids, *lin0)  # nothing requires grad
        assert not y.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_ffn_backward_fills_no_gradient_for_the_saved_activations(backend):
    """The forward op also returns h [T, Fi] and a [T, F] (saved for the backward, no gradient):
    autograd must not fill zero gradients for them on every backward (on the GPU two memsets of
    93 MB each per call at the VLMo FFN's size)."""
    from mmkernels.testing.fills import fills
    _require(backend)
    t, f = 2 * 24, 64
    x = randn(2, 24, 32, seed=26).float().requires_grad_()
    params = [p.float().requires_grad_() for p in ffn_params(2, 32, f, 32, "gelu")]
    dy = randn(2, 24, 32, seed=27).float()
    with mmkernels.backend(backend):
        y = mmkernels.modality_ffn(x, 4, *params, "gelu")
        filled = [(op, s) for op, s in fills(lambda: y.backward(dy)) if len(s) == 2 and s[0] == t]
    assert not filled, filled
    assert x.grad is not None and all(p.grad is not None for p in params)


# ----------------------------------------------------------------------------- gradcheck, opcheck, compile

@pytest.mark.parametrize("activation", ACTS)
def test_gradcheck_float64_cpu(activation):
    _require("cpu")
    x = randn(2, 5, 6, seed=26).requires_grad_()
    ids = make_ids((2, 5), 3, "empty", seed=27)
    params = [t.requires_grad_() for t in ffn_params(3, 6, 4, 5, activation)]
    with mmkernels.backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda *a: mmkernels.modality_ffn(a[0], ids, *a[1:], activation), (x, *params))
        if activation == "gelu":
            lp = [t.requires_grad_() for t in linear_params(3, 6, 4)]
            assert torch.autograd.gradcheck(lambda a, w, b: mmkernels.modality_linear(a, ids, w, b), (x, *lp))
            assert torch.autograd.gradcheck(lambda a, w: mmkernels.modality_linear(a, 2, w, None),
                                            (x, lp[0][:2].detach().requires_grad_()))


def _op_args(kind, act="gelu", bias=True, t=13, e=3, dtype=torch.float32):
    x = randn(t, 8, seed=28, dtype=dtype)
    ids = make_ids((t,), e, "empty", seed=29)
    perm, offsets = routing.route(ids, e)
    if kind == "linear":
        w, b = (None if p is None else p.to(dtype) for p in linear_params(e, 8, 6, bias))
        return x, w, b, perm, offsets
    ps = [None if p is None else p.to(dtype) for p in ffn_params(e, 8, 10, 6, act, bias)]
    return (x, *ps, perm, offsets)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_cpu(bias):
    _require("cpu")
    ops = torch.ops.mmkernels
    x, w, b, perm, offsets = (t.requires_grad_() if t is not None and t.is_floating_point() else t
                              for t in _op_args("linear", bias=bias))
    e = w.shape[0]
    all_e, some_e, none_e = [True] * e, [i % 2 == 1 for i in range(e)], [False] * e
    torch.library.opcheck(ops.modality_linear_fwd.default, (x, w, b, perm, offsets, all_e, "cpu"))
    torch.library.opcheck(ops.modality_linear_fwd.default, (x, w, b, perm, offsets, some_e, "cpu"))
    dy = randn(x.shape[0], w.shape[1], seed=30, dtype=torch.float32)
    for needs_dx, mask in ((True, all_e), (True, none_e), (False, all_e), (False, some_e)):
        torch.library.opcheck(ops.modality_linear_bwd.default,
                              (dy, x.detach(), w.detach(), None if b is None else b.detach(), perm, offsets,
                               needs_dx, mask, "cpu"))
    for act in ("gelu", "swiglu"):
        x, w_in, b_in, w_out, b_out, perm, offsets = _op_args("ffn", act, bias)
        args = [x, w_in, b_in, w_out, b_out]
        leafs = [None if t is None else t.requires_grad_() for t in args]
        e = w_in.shape[0]
        all_e, some_e, none_e = [True] * e, [i % 2 == 1 for i in range(e)], [False] * e
        for masks in ((all_e, all_e), (some_e, all_e), (none_e, some_e)):
            torch.library.opcheck(ops.modality_ffn_fwd.default, (*leafs, perm, offsets, act, *masks, "cpu"))
        y, h, a = ops.modality_ffn_fwd(*args, perm, offsets, act, all_e, all_e, "cpu")
        dy = torch.randn_like(y)
        det = [None if t is None else t.detach() for t in args]
        for needs_dx, masks in ((True, (all_e, all_e)), (False, (some_e, none_e)), (True, (none_e, none_e))):
            torch.library.opcheck(ops.modality_ffn_bwd.default,
                                  (dy, *det, perm, offsets, h, a, act, needs_dx, *masks, "cpu"))


def test_opcheck_triton_schema_and_fake():
    """The triton path through the same registered ops: schema, fake tensors and autograd registration."""
    _require("triton")
    ops = torch.ops.mmkernels
    x, w, b, perm, offsets = _op_args("linear", t=9, e=2)
    torch.library.opcheck(ops.modality_linear_fwd.default,
                          (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), perm, offsets, [True, False],
                           "triton"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    x, w_in, b_in, w_out, b_out, perm, offsets = _op_args("ffn", "swiglu", t=9, e=2)
    torch.library.opcheck(ops.modality_ffn_fwd.default,
                          (x, w_in, b_in, w_out, b_out, perm, offsets, "swiglu", [True, True], [False, True],
                           "triton"),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("kind", ["linear", "ffn"])
@pytest.mark.parametrize("form", ["ids", "split"])
def test_torch_compile_fullgraph_cpu(kind, form):
    _require("cpu")
    b, s = 2, 11
    x0 = randn(b, s, 16, seed=31).float()
    ids = make_ids((b, s), 2, seed=32) if form == "ids" else 4
    params0 = [t.float() for t in (linear_params(2, 16, 12) if kind == "linear"
                                   else ffn_params(2, 16, 20, 16, "swiglu"))]

    def step(x, *params):
        if kind == "linear":
            return mmkernels.modality_linear(x, ids, *params)
        return mmkernels.modality_ffn(x, ids, *params, activation="swiglu")

    compiled = torch.compile(step, fullgraph=True)
    with mmkernels.backend("cpu"):
        c = [t.clone().requires_grad_() for t in [x0] + params0]
        out = compiled(*c)
        (out * out).sum().backward()
        e = [t.clone().requires_grad_() for t in [x0] + params0]
        ref = step(*e)
        (ref * ref).sum().backward()
    assert_close(out, ref.double(), scale=4.0)
    for a, r in zip(c, e):
        assert_close(a.grad, r.grad.double(), scale=4.0)


# ----------------------------------------------------------------------------- GPU tier (pytest -m gpu)

@pytest.mark.gpu
@pytest.mark.parametrize("form", ["ids", "split"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_real_sizes_without_host_sync(form, dtype):
    """Routing, validation, forward and backward on CUDA with sync-debug mode "error"; against the
    float64 reference (CogVLM-like sizes, 2 experts)."""
    b, s, h, f = 2, 1100, 1024, 1408
    dev = "cuda"
    x = randn(b, s, h, seed=40).to(dev)
    ids = make_ids((b, s), 2, seed=41).to(dev) if form == "ids" else 258
    dense = ids if form == "ids" else routing.split_ids(b, s, ids, dev)
    params = [None if p is None else p.to(dev) for p in ffn_params(2, h, f, h, "swiglu", bias=False)]
    dy = randn(b, s, h, seed=42).to(dev)
    warm = run("ffn", "triton", x, ids, params, dy, "swiglu", dtype)  # compile outside sync-debug mode
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = run("ffn", "triton", x, ids, params, dy, "swiglu", dtype)
        lin = run("linear", "triton", x, ids, [params[0][:, :h]], dy, dtype=dtype)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    del warm
    ref = run("ffn", "reference", x, dense, params, dy, "swiglu", dtype=torch.float64)
    eager = run("ffn", "reference", x, dense, params, dy, "swiglu", dtype=dtype)
    for name, g, r, e in zip(names("ffn"), got, ref, eager):
        if r is not None:
            assert_close(g, r, dtype, eager=e, name=f"ffn {name}")
    ref = run("linear", "reference", x, dense, [params[0][:, :h]], dy, dtype=torch.float64)
    eager = run("linear", "reference", x, dense, [params[0][:, :h]], dy, dtype=dtype)
    for name, g, r, e in zip(names("linear"), lin, ref, eager):
        if r is not None:
            assert_close(g, r, dtype, eager=e, name=f"linear {name}")
