"""The PyTorch-op paths of ``modality_linear`` / ``modality_ffn`` (``mmkernels/experts/grouped_mm/paths.py``)
and their choice under backend ``auto``.

Each path against the float64 reference, forward and backward (x, every weight and bias): every
activation, split positions 0, inside and S, ids layouts with two and three experts, odd sizes;
``batched`` in float64 and float32, ``grouped_mm`` in bfloat16 (it runs on CPU in bfloat16).
Per-expert parameter lists keep their semantics (an expert a split leaves without tokens, or a
frozen one, gets no gradient). The dispatcher's choices per shape class are read back with
``mmkernels.explain()`` under ``pretend_device``; ``batched`` makes no copy of x.
"""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import mmkernels
from mmkernels import _dispatch
from mmkernels.experts.grouped_mm import paths
from mmkernels.testing.numerics import assert_close
from tests.experts.cases import ACTS, check_grads, ffn_params, leaf, linear_params, make_ids, randn, run
from tests.helpers.backends import require_backend


def _require_cpu():
    require_backend("cpu", "experts", "experts_linear_fwd", "mmkernels.experts.kernels")


def _compare(kind, path, x, ids, params, dtype, activation="gelu", seed=99):
    """``path`` (forced with use_path under auto) in ``dtype`` against the float64 reference;
    "eager" is the reference in ``dtype``. Returns the explained paths."""
    h_out = params[0].shape[1] if kind == "linear" else params[2].shape[1]
    dy = randn(*x.shape[:-1], h_out, seed=seed)
    with mmkernels.use_path(path), mmkernels.explain() as log:
        got = run(kind, "auto", x, ids, params, dy, activation, dtype)
    assert log.paths() == [path], str(log)
    check_grads(path, kind, got, x, ids, params, dy, activation, dtype)
    return got


# ----------------------------------------------------------------------------- batched

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("p", [0, 4, 11])
@pytest.mark.parametrize("bias", [True, False])
def test_batched_linear(dtype, p, bias):
    x = randn(3, 11, 13, seed=1)
    _compare("linear", "batched", x, p, linear_params(2, 13, 7, bias), dtype)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("p", [0, 5, 11])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_batched_ffn(activation, p, dtype):
    x = randn(3, 11, 13, seed=2)
    _compare("ffn", "batched", x, p, ffn_params(2, 13, 9, 6, activation, bias=activation != "swiglu"), dtype,
             activation)


@pytest.mark.parametrize("shape", [(1, 7, 5), (5, 1, 3), (2, 97, 17)])
def test_batched_odd_sizes_and_views(shape):
    """One sample (the views fold to matrices), one position, and a non-contiguous x."""
    b, s, h = shape
    p = s // 3
    base = randn(b, s, 2 * h, seed=3)
    x = base[..., ::2]  # strided features
    _compare("ffn", "batched", x, p, ffn_params(2, h, 11, 4, "swiglu"), torch.float32, "swiglu")
    _compare("linear", "batched", x, p, linear_params(2, h, 9), torch.float32)


def test_batched_weight_gradient_forms():
    """The weight gradient's two forms (a GEMM per sample; one GEMM over folded rows) agree."""
    g = randn(6, 5, 4, seed=4)
    a = randn(6, 5, 3, seed=5)
    for gv, av in ((g, a), (g[:, 1:4], a[:, 1:4]), (g.expand(6, 5, 4), a)):
        dw = torch.zeros(4, 3, dtype=torch.float64)
        paths._wgrad_into(dw, gv, av)
        assert torch.allclose(dw, torch.einsum("bnk,bnj->kj", gv, av))


COPY_OPS = {"aten::copy_", "aten::cat", "aten::index_select", "aten::clone", "aten::index", "aten::gather",
            "aten::stack", "aten::_to_copy", "aten::contiguous", "aten::split", "aten::index_put_"}


@pytest.mark.parametrize("kind", ["linear", "ffn"])
def test_batched_makes_no_copy_of_x(kind):
    """No copy, gather or concatenation of x (or of a slice of it) in the forward or backward."""
    b, s, h, p = 3, 19, 24, 7
    x = randn(b, s, h, seed=6, dtype=torch.float32).requires_grad_()
    if kind == "linear":
        params = [leaf(t, torch.float32) for t in linear_params(2, h, 10)]
    else:
        params = [leaf(t, torch.float32) for t in ffn_params(2, h, 14, 10, "gelu")]
    forbidden = {(b, s, h), (b * s, h), (b, p, h), (b * p, h), (p, h), (b, s - p, h), (b * (s - p), h), (s - p, h)}
    with mmkernels.use_path("batched"), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        if kind == "linear":
            y = mmkernels.modality_linear(x, p, *params)
        else:
            y = mmkernels.modality_ffn(x, p, *params)
        y.backward(torch.ones_like(y))
    seen = [(e.name, e.input_shapes) for e in prof.events() if e.name in COPY_OPS]
    bad = [(n, shp) for n, shp in seen if any(tuple(t) in forbidden for t in shp if t)]
    assert not bad, bad


# ----------------------------------------------------------------------------- grouped_mm (bf16 on CPU)

@pytest.mark.parametrize("e,layout", [(2, "random"), (3, "random"), (3, "empty"), (2, "first")])
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_mm_linear_ids(e, layout, bias):
    x = randn(3, 13, 16, seed=7)
    ids = make_ids((3, 13), e, layout, seed=8)
    _compare("linear", "grouped_mm", x, ids, linear_params(e, 16, 24, bias), torch.bfloat16)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("e", [2, 3])
def test_grouped_mm_ffn_ids(activation, e):
    x = randn(2, 17, 16, seed=9)
    ids = make_ids((2, 17), e, seed=10)
    _compare("ffn", "grouped_mm", x, ids, ffn_params(e, 16, 24, 8, activation), torch.bfloat16, activation)


@pytest.mark.parametrize("p", [0, 6, 13])
@pytest.mark.parametrize("kind", ["linear", "ffn"])
def test_grouped_mm_split(p, kind):
    x = randn(3, 13, 16, seed=11)
    params = linear_params(2, 16, 8) if kind == "linear" else ffn_params(2, 16, 24, 8, "swiglu")
    _compare(kind, "grouped_mm", x, p, params, torch.bfloat16, "swiglu")


def test_grouped_mm_flat_tokens_and_strided_weights():
    """x without a batch dimension, and weights that are strided views (copied for alignment)."""
    x = randn(29, 16, seed=12)
    ids = make_ids((29,), 3, seed=13)
    w_in, b_in, w_out, b_out = ffn_params(3, 16, 16, 8, "gelu")
    w_in = torch.cat([w_in, w_in], dim=2)[..., ::2]  # stride 2 along H_in
    _compare("ffn", "grouped_mm", x, ids, [w_in, b_in, w_out, b_out], torch.bfloat16)


# ----------------------------------------------------------------------------- per-expert parameters

def _per_expert(t, dtype):
    return None if t is None else [u.detach().to(dtype).clone().requires_grad_() for u in t.unbind(0)]


@pytest.mark.parametrize("path", ["batched", "grouped_mm"])
@pytest.mark.parametrize("p", [0, 5, 9])
def test_per_expert_lists_untouched_expert_gets_no_grad(path, p):
    dtype = torch.float32 if path == "batched" else torch.bfloat16
    x = randn(2, 9, 16, seed=14)
    stacked = ffn_params(2, 16, 24, 8, "gelu")
    lists = [_per_expert(t, dtype) for t in stacked]
    xx = leaf(x, dtype)
    dy = randn(2, 9, 8, seed=15).to(dtype)
    with mmkernels.use_path(path):
        mmkernels.modality_ffn(xx, p, *lists).backward(dy)
    ref = run("ffn", "reference", x, p, stacked, randn(2, 9, 8, seed=15), "gelu", torch.float64)
    eager = run("ffn", "reference", x, p, stacked, randn(2, 9, 8, seed=15), "gelu", dtype)
    assert_close(xx.grad, ref[1], dtype, eager=eager[1], name="dx")
    for j, plist in enumerate(lists):
        for i, t in enumerate(plist):
            untouched = (i == 0 and p == 0) or (i == 1 and p == 9)
            if untouched:
                assert t.grad is None, f"param {j} expert {i}"
            else:
                assert_close(t.grad, ref[2 + j][i], dtype, eager=eager[2 + j][i], name=f"param {j} expert {i}")


@pytest.mark.parametrize("path", ["batched", "grouped_mm"])
def test_frozen_expert_gets_no_grad(path):
    dtype = torch.float32 if path == "batched" else torch.bfloat16
    x = randn(2, 9, 16, seed=16)
    stacked = linear_params(2, 16, 8)
    lists = [_per_expert(t, dtype) for t in stacked]
    for t in lists:
        t[0].requires_grad_(False)
    dy = randn(2, 9, 8, seed=17)
    with mmkernels.use_path(path):
        mmkernels.modality_linear(x.to(dtype), 4, *lists).backward(dy.to(dtype))
    ref = run("linear", "reference", x, 4, stacked, dy, dtype=torch.float64)
    eager = run("linear", "reference", x, 4, stacked, dy, dtype=dtype)
    for j, t in enumerate(lists):
        assert t[0].grad is None
        assert_close(t[1].grad, ref[2 + j][1], dtype, eager=eager[2 + j][1])


# ----------------------------------------------------------------------------- shape classes, eligibility

def test_shape_class():
    assert paths.shape_class("split", 4, 8, 8) == "split-small"
    assert paths.shape_class("ids", 1 << 10, 1 << 9, 1 << 9) == "ids-large"
    assert paths.shape_class("ids", (1 << 10) - 1, 1 << 9, 1 << 9) == "ids-small"
    # the bench's sizes are GEMM-bound: VLMo FFN on the GPU, the CPU rows
    assert paths.shape_class("split", 64 * 237, 768, 3072) == "split-large"
    assert paths.shape_class("ids", 4 * 1526, 4096, 2 * 11008) == "ids-large"
    with pytest.raises(ValueError):
        paths.shape_class("mask", 1, 1, 1)


def test_eligibility_reasons():
    x16 = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    assert paths.eligibility("split", x16, {"H_out": 8, "H_in": 16}) == {"grouped_mm": None, "batched": None}
    can = paths.eligibility("ids", x16.double(), {"H_out": 8, "H_in": 16})
    assert "got float64" in can["grouped_mm"] and "split position" in can["batched"]
    can = paths.eligibility("ids", x16, {"H_out": 12, "H_in": 16})
    assert "multiple of 8" in can["grouped_mm"] and "H_out = 12" in can["grouped_mm"]
    assert "no tokens" in paths.eligibility("ids", x16[:, :0], {"H_out": 8, "H_in": 16})["grouped_mm"]


def test_use_path_refuses_what_cannot_run():
    x = randn(2, 5, 16, seed=18, dtype=torch.float32)
    w, b = (t.float() for t in linear_params(2, 16, 8))
    with mmkernels.use_path("batched"), pytest.raises(RuntimeError, match="split position"):
        mmkernels.modality_linear(x, make_ids((2, 5), 2, seed=19), w, b)
    with mmkernels.use_path("grouped_mm"), pytest.raises(RuntimeError, match="got float64"):
        mmkernels.modality_linear(x.double(), 2, w.double(), b.double())


# ----------------------------------------------------------------------------- the dispatcher's choices

def _chosen(kind, x, ids, params, activation="gelu"):
    with mmkernels.explain() as log, torch.no_grad():
        if kind == "linear":
            mmkernels.modality_linear(x, ids, *params)
        else:
            mmkernels.modality_ffn(x, ids, *params, activation)
    (d,) = log
    return d


def _small_call(dtype):
    x = randn(2, 9, 16, seed=20, dtype=dtype)
    return x, [t.to(dtype) for t in linear_params(2, 16, 8)]


def _large_linear(dtype):
    """The smallest linear of the "large" class: tokens * H_in * H_out = 2**28."""
    x = randn(2, 512, 512, seed=21, dtype=dtype)
    return x, [t.to(dtype) for t in linear_params(2, 512, 512)]


def _want(op, kind, dtype, cls, can):
    """The first eligible path of the table's row for the case."""
    _, row = _dispatch.lookup("experts", op, kind, _dispatch.dtype_name(dtype), cls)
    return next(p for p in row.order if can.get(p, "x") is None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_choices_cuda_sm90(dtype):
    """On the H100/H200 record: batched for the split layouts, grouped_mm for large ids calls (where
    it can run), the kernels elsewhere. pretend_device changes only the table lookup."""
    _require_cpu()
    x, params = _small_call(dtype)
    ids = make_ids((2, 9), 2, seed=22)
    with _dispatch.pretend_device("cuda-sm90"):
        d = _chosen("linear", x, 4, params)
        assert (d.path, d.case) == ("batched", ("cuda-sm90", _dispatch.dtype_name(dtype), "split-small"))
        assert _chosen("linear", x, ids, params).path == "kernel"
        x, params = _large_linear(dtype)
        assert _chosen("linear", x, 200, params).path == "batched"
        ids = make_ids((2, 512), 2, seed=23)
        d = _chosen("linear", x, ids, params)
        assert d.case[2] == "ids-large"
        assert d.path == ("grouped_mm" if dtype == torch.bfloat16 else "kernel"), str(d)
        if dtype != torch.bfloat16:
            assert "skipped grouped_mm (grouped_mm on CPU runs bfloat16" in d.reason, d.reason


def test_choices_cpu_follow_the_table():
    """On CPU the choice is the table's first eligible path, for every shape class."""
    _require_cpu()
    for dtype in (torch.float32, torch.bfloat16):
        for x, params in (_small_call(dtype), _large_linear(dtype)):
            b, s, h = x.shape
            for ids in (s // 3, make_ids((b, s), 2, seed=24)):
                kind = "split" if isinstance(ids, int) else "ids"
                cls = paths.shape_class(kind, b * s, h, params[0].shape[1])
                can = paths.eligibility(kind, x, {"H_out": params[0].shape[1], "H_in": h})
                can["kernel"] = None
                d = _chosen("linear", x, ids, params)
                assert d.case == ("cpu", _dispatch.dtype_name(dtype), cls)
                assert d.path == _want("modality_linear", "cpu", dtype, cls, can), str(d)


def test_split_and_ids_forms_agree_at_small_sizes_on_cpu():
    """Small calls on CPU run the kernels for both forms, which then give identical results."""
    _require_cpu()
    x, params = _small_call(torch.float32)
    ids = make_ids((2, 9), 2, seed=25)
    ids[:, :4], ids[:, 4:] = 0, 1
    with mmkernels.explain() as log:
        a = mmkernels.modality_linear(x, 4, *params)
        b = mmkernels.modality_linear(x, ids, *params)
    assert log.paths() == ["kernel", "kernel"]
    assert torch.equal(a, b)


def test_forced_backends_ignore_the_table():
    _require_cpu()
    x, params = _small_call(torch.float32)
    with _dispatch.pretend_device("cuda-sm90"), mmkernels.explain() as log:
        with mmkernels.backend("cpu"):
            mmkernels.modality_linear(x, 4, *params)
        with mmkernels.backend("reference"):
            mmkernels.modality_linear(x, 4, *params)
        with mmkernels.backend("cpu"), mmkernels.use_path("batched"):
            mmkernels.modality_linear(x, 4, *params)
    assert log.paths() == ["kernel", "reference", "kernel"]
    assert [d.backend for d in log] == ["cpu", None, "cpu"]


def test_every_table_row_names_known_paths_and_keeps_the_kernels():
    from mmkernels.experts.dispatch_table import TABLE
    assert ("*", "*", "*", "*") in TABLE
    for key, (order, source) in TABLE.items():
        assert "kernel" in order, key
        assert set(order) <= {"kernel", "grouped_mm", "batched"}, key
        assert source, key


# ----------------------------------------------------------------------------- compile, opcheck

@pytest.mark.parametrize("path", ["batched", "grouped_mm"])
def test_torch_compile_fullgraph(path):
    dtype = torch.float32 if path == "batched" else torch.bfloat16
    x0 = randn(2, 11, 16, seed=26, dtype=dtype)
    params0 = [t.to(dtype) for t in ffn_params(2, 16, 24, 16, "swiglu")]

    def step(x, *params):
        return mmkernels.modality_ffn(x, 4, *params, activation="swiglu")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with mmkernels.use_path(path), mmkernels.explain() as log:
        c = [t.clone().requires_grad_() for t in [x0] + params0]
        out = compiled(*c)
        (out * out).sum().backward()
        e = [t.clone().requires_grad_() for t in [x0] + params0]
        ref = step(*e)
        (ref * ref).sum().backward()
    assert set(log.paths()) == {path}
    assert torch.equal(out, ref)
    for a, r in zip(c, e):
        assert torch.equal(a.grad, r.grad)


def test_opcheck_batched_ops():
    ops = torch.ops.mmkernels
    x = randn(2, 7, 8, seed=27, dtype=torch.float32).requires_grad_()
    w, b = (t.float().requires_grad_() for t in linear_params(2, 8, 6))
    for p in (0, 3, 7):
        torch.library.opcheck(ops.modality_linear_batched.default, (x, w, b, p, [True, True]))
        torch.library.opcheck(ops.modality_linear_batched.default, (x, w, None, p, [False, True]))
    ps = [t.float().requires_grad_() for t in ffn_params(2, 8, 10, 6, "swiglu")]
    torch.library.opcheck(ops.modality_ffn_batched.default, (x, *ps, 3, "swiglu", [True, True], [True, False]))


def test_opcheck_grouped_mm_ops():
    ops = torch.ops.mmkernels
    x = randn(13, 16, seed=28, dtype=torch.bfloat16).requires_grad_()
    perm, offsets = mmkernels.experts.routing.route(make_ids((13,), 3, "empty", seed=29), 3)
    w, b = (t.to(torch.bfloat16).requires_grad_() for t in linear_params(3, 16, 8))
    torch.library.opcheck(ops.modality_linear_grouped_mm.default, (x, w, b, perm, offsets, [True, True, True]),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    ps = [t.to(torch.bfloat16).requires_grad_() for t in ffn_params(3, 16, 8, 8, "gelu")]
    torch.library.opcheck(ops.modality_ffn_grouped_mm.default,
                          (x, *ps, perm, offsets, "gelu", [True, False, True], [True, True, True]),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
