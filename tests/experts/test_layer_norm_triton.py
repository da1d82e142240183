"""The per-modality LayerNorm's Triton kernels against the float64 loop-over-experts reference.

``layer_norm_fwd_triton`` (y, mean, rstd) and ``layer_norm_bwd_triton`` (dx, dw, db), through
Triton's interpreter without a GPU: empty and ragged experts, narrow, wide and split rows, with
and without bias, fp32/bf16/fp16, strided inputs, ``dw_experts`` masks, T = 0. Low-precision
results follow mmkernels.testing.numerics.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # normally already done by conftest.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from tests.experts.cases import make_ids, randn  # noqa: E402
from mmkernels.experts.layer_norm import kernels as NK  # noqa: E402
from mmkernels.experts.reference import modality_layer_norm_reference  # noqa: E402
from mmkernels.experts.routing import route  # noqa: E402
from mmkernels.testing.numerics import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def case(T, E, H, dtype, has_bias=True, layout="random", seed=0, param_dtype=None):
    """ids [T], x [T, H] (mean and scale vary by token), weight/bias [E, H], dy [T, H]."""
    pd = dtype if param_dtype is None else param_dtype
    ids = make_ids((T,), E, layout, seed=seed)
    x = (randn(T, H, seed=seed + 1, scale=2.0) + randn(T, 1, seed=seed + 2)).to(dtype)
    w = (1.0 + randn(E, H, seed=seed + 3, scale=0.5)).to(pd)
    b = randn(E, H, seed=seed + 4, scale=0.5).to(pd) if has_bias else None
    dy = randn(T, H, seed=seed + 5).to(dtype)
    return ids, x, w, b, dy


def reference(ids, x, w, b, dy, dtype=torch.float64):
    """(y, dx, dw, db) of the reference evaluated in ``dtype`` on the given (rounded) inputs."""
    xs = x.detach().cpu().to(dtype).requires_grad_()
    ws = w.detach().cpu().to(dtype).requires_grad_()
    bs = None if b is None else b.detach().cpu().to(dtype).requires_grad_()
    y = modality_layer_norm_reference(xs, ids.cpu(), ws, bs, EPS)
    y.backward(dy.detach().cpu().to(dtype))
    return y.detach(), xs.grad, ws.grad, None if bs is None else bs.grad


def stats(x):
    x64 = x.detach().cpu().double()
    mean = x64.mean(1)
    rstd = (x64.var(1, unbiased=False) + EPS).rsqrt()
    return mean, rstd


def run(ids, x, w, b, dy, E, needs_dx=True, mask=None):
    perm, offsets = route(ids.to(DEVICE), E, backend="triton")
    xd, wd, bd, dyd = (None if t is None else t.to(DEVICE) for t in (x, w, b, dy))
    y, mean, rstd = NK.layer_norm_fwd_triton(xd, perm, offsets, wd, bd, EPS)
    mask = [True] * E if mask is None else mask
    dx, dw, db = NK.layer_norm_bwd_triton(dyd, xd, perm, offsets, wd, bd, mean, rstd, needs_dx, mask)
    return y, mean, rstd, dx, dw, db


def check(ids, x, w, b, dy, E, needs_dx=True, mask=None):
    """Every output against the float64 reference (and eager PyTorch in x's dtype)."""
    dtype = x.dtype
    T, H = x.shape
    y, mean, rstd, dx, dw, db = run(ids, x, w, b, dy, E, needs_dx, mask)
    ref = reference(ids, x, w, b, dy)
    low = dtype != torch.float32 or w.dtype != torch.float32
    eager = reference(ids, x, w, b, dy, dtype) if low else (None,) * 4
    # forward
    assert y.shape == (T, H) and y.dtype == dtype and y.is_contiguous()
    assert mean.dtype == torch.float32 and rstd.dtype == torch.float32
    assert mean.shape == (T,) and rstd.shape == (T,)
    assert_close(y, ref[0], eager=eager[0], name="y")
    m_ref, r_ref = stats(x)
    assert_close(mean, m_ref, torch.float32, name="mean")
    assert_close(rstd, r_ref, torch.float32, name="rstd")
    # backward
    mask = [True] * E if mask is None else mask
    if needs_dx:
        assert dx.shape == (T, H) and dx.dtype == dtype
        assert_close(dx, ref[1], eager=eager[1], name="dx")
    else:
        assert dx.numel() == 0
    for name, got, r, ea, p in (("dw", dw, ref[2], eager[2], w), ("db", db, ref[3], eager[3], b)):
        if p is None or not any(mask):
            assert got.numel() == 0, name
            continue
        assert got.shape == (E, H) and got.dtype == p.dtype, name
        for e in range(E):
            if mask[e]:
                assert_close(got[e], r[e], eager=None if ea is None else ea[e], name=f"{name}[{e}]")
            else:  # a frozen expert: exactly zero
                assert torch.equal(got[e].cpu(), torch.zeros_like(got[e].cpu())), f"{name}[{e}]"
    return y, mean, rstd, dx, dw, db


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------


def test_norm_config():
    for H in (1, 16, 37, 96, 97, 768, 1024, 4095, 4096, 4097, 8192, 16383, NK.MAX_NORM_H):
        cfg = NK.norm_config(H)
        assert cfg.BLOCK_H >= H and cfg.BLOCK_H == triton.next_power_of_2(cfg.BLOCK_H)
        assert cfg.BLOCK_P * cfg.bwd_split == cfg.BLOCK_H and cfg.BLOCK_P <= 4096
        assert 4 <= cfg.fwd_warps <= 16 and 4 <= cfg.bwd_warps <= 16
        # at most 16 forward and 8 backward elements a thread (32 forward at the widest rows)
        assert cfg.fwd_rows * cfg.BLOCK_H <= 32 * cfg.fwd_warps * (32 if cfg.BLOCK_H > 8192 else 16)
        assert cfg.bwd_rows * cfg.BLOCK_P <= 32 * cfg.bwd_warps * 8
    for H in (0, NK.MAX_NORM_H + 1):
        with pytest.raises(ValueError, match="widths"):
            NK.norm_config(H)


def test_bwd_rows_per_program():
    for T in (0, 1, 97, 8192, 16384, 10 ** 6):
        for rows in (1, 2, 16):
            r = NK.bwd_rows_per_program(T, rows)
            assert r % rows == 0 and r >= NK.BWD_MIN_ROWS
            assert triton.cdiv(T, r) <= max(NK.BWD_PROGRAMS, triton.cdiv(T, NK.BWD_MIN_ROWS))
    assert NK.bwd_rows_per_program(16384, 1) == 32  # VLMo-sized batches: 512 chunks of 32


# ---------------------------------------------------------------------------
# forward and backward against the reference
# ---------------------------------------------------------------------------

CASES = [  # (T, E, layout)
    (1, 1, "random"),
    (7, 2, "random"),
    (97, 3, "random"),
    (97, 3, "empty"),  # expert 1 has no tokens
    (64, 3, "one"),  # every token in the last expert
    (33, 8, "random"),
]


@pytest.mark.parametrize("T,E,layout", CASES, ids=[f"T{t}-E{e}-{p}" for t, e, p in CASES])
@pytest.mark.parametrize("H", [37, 96])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_fp32(T, E, layout, H, has_bias):
    check(*case(T, E, H, torch.float32, has_bias, layout, seed=T + E), E)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T,E,layout", [(97, 3, "empty"), (7, 2, "random"), (33, 8, "random")],
                         ids=["T97-E3-empty", "T7-E2", "T33-E8"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_low_precision(dtype, T, E, layout, has_bias):
    check(*case(T, E, 37, dtype, has_bias, layout, seed=3), E)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp32_parameters_with_low_precision_activations(dtype):
    """fp32 LayerNorm parameters beside bf16/fp16 x: dw and db come back in fp32."""
    ids, x, w, b, dy = case(50, 2, 96, dtype, True, seed=4, param_dtype=torch.float32)
    *_, dw, db = check(ids, x, w, b, dy, 2)
    assert dw.dtype == torch.float32 and db.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=[_DT[d] for d in DTYPES])
def test_width_768(dtype):
    """A model width: 4-row forward tiles, 2-row backward steps over 1024-wide blocks."""
    check(*case(40, 2, 768, dtype, True, seed=5), 2)


@pytest.mark.parametrize("dtype,split", [(torch.float32, 2), (torch.bfloat16, 4)], ids=["fp32", "bf16"])
def test_wide_rows_split_backward(dtype, split):
    """H > 4096: each backward chunk is handled by one program per column part: parts of 4096
    (fp32 rows of 4100 are 16-byte aligned), of 2048 (bf16 rows of 4100 are not); the last part
    is masked."""
    H = 4100
    assert NK.norm_config(H, aligned=dtype == torch.float32).bwd_split == split
    check(*case(9, 2, H, dtype, True, seed=6), 2)


# ---------------------------------------------------------------------------
# layouts, flags, empty inputs
# ---------------------------------------------------------------------------


def test_non_contiguous_inputs():
    """x with a row stride wider than H, dy transposed (last stride != 1), weight and bias
    strided views: the same results as contiguous inputs."""
    T, E, H = 29, 3, 37
    ids, x, w, b, dy = case(T, E, H, torch.float32, True, seed=7)
    x_wide = torch.zeros(T, H + 5, dtype=x.dtype)
    x_wide[:, 2:H + 2] = x
    x_nc = x_wide[:, 2:H + 2]
    dy_nc = dy.t().contiguous().t()
    w_nc = w.t().contiguous().t()  # [E, H] with strides (1, E)
    b_wide = torch.zeros(E, 2 * H, dtype=b.dtype)
    b_wide[:, ::2] = b
    b_nc = b_wide[:, ::2]
    assert not x_nc.is_contiguous() and x_nc.stride(1) == 1
    assert dy_nc.stride(1) != 1 and w_nc.stride(1) != 1 and b_nc.stride(1) != 1
    got = check(ids, x_nc, w_nc, b_nc, dy_nc, E)
    base = run(ids, x, w, b, dy, E)
    for name, a, r in zip(("y", "mean", "rstd", "dx", "dw", "db"), got, base):
        assert torch.equal(a.cpu(), r.cpu()), name


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_without_dx(has_bias):
    check(*case(97, 3, 37, torch.float32, has_bias, "empty", seed=8), 3, needs_dx=False)


@pytest.mark.parametrize("needs_dx", [True, False], ids=["dx", "nodx"])
@pytest.mark.parametrize("frozen", [0, 1, 2])
def test_frozen_expert(needs_dx, frozen):
    """One expert's flag off: its dw and db slices are exactly zero, the others right."""
    mask = [e != frozen for e in range(3)]
    check(*case(97, 3, 37, torch.float32, True, seed=9), 3, needs_dx=needs_dx, mask=mask)


def test_frozen_expert_low_precision():
    mask = [True, False]
    check(*case(33, 2, 96, torch.bfloat16, True, seed=10), 2, mask=mask)


def test_no_weight_gradient():
    """Every flag off: dw and db are empty, dx is still right."""
    ids, x, w, b, dy = case(33, 3, 37, torch.float32, True, seed=11)
    check(ids, x, w, b, dy, 3, mask=[False] * 3)
    *_, dx, dw, db = run(ids, x, w, b, dy, 3, needs_dx=False, mask=[False] * 3)
    assert dx.numel() == 0 and dw.numel() == 0 and db.numel() == 0


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_no_tokens(has_bias):
    E, H = 3, 37
    ids, x, w, b, dy = case(0, E, H, torch.float32, has_bias)
    y, mean, rstd, dx, dw, db = run(ids, x, w, b, dy, E)
    assert y.shape == (0, H) and mean.shape == (0,) and rstd.shape == (0,)
    assert dx.shape == (0, H)
    assert dw.shape == (E, H) and not dw.any()
    if has_bias:
        assert db.shape == (E, H) and not db.any()
    else:
        assert db.numel() == 0
    *_, dx, dw, db = run(ids, x, w, b, dy, E, needs_dx=False, mask=[False, True, False])
    assert dx.numel() == 0 and dw.shape == (E, H) and not dw.any()


def test_no_host_synchronisation(monkeypatch):
    """The launchers never read a tensor's value on the host (CUDA-graph safe)."""
    ids, x, w, b, dy = case(33, 3, 37, torch.float32, True, seed=12)
    perm, offsets = route(ids.to(DEVICE), 3, backend="triton")
    for name in ("item", "tolist", "__bool__", "__int__", "__index__", "nonzero"):
        def boom(*a, _name=name, **k):
            raise AssertionError(f"host synchronisation: Tensor.{_name}")
        monkeypatch.setattr(torch.Tensor, name, boom)
    y, mean, rstd = NK.layer_norm_fwd_triton(x, perm, offsets, w, b, EPS)
    NK.layer_norm_bwd_triton(dy, x, perm, offsets, w, b, mean, rstd, True, [True, False, True])
