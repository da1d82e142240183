"""The SigLIP C++ CPU kernels (``siglip_rows``, ``siglip_grads`` of mmkernels._C) against the
float64 reference.

The kernels are called directly (and through the registered ops for gradcheck and opcheck). The
reference is ``siglip_rows_reference`` evaluated in float64 on the inputs rounded to their dtype,
with gradients from autograd; "eager" is the same dense computation in float32, whose error sets
the allowance of the project's comparison rule (``mmkernels.testing.numerics``).
"""
import itertools

import pytest
import torch

import mmkernels.contrastive.siglip.ops  # noqa: F401  (registers torch.ops.mmkernels.siglip_*)
from mmkernels.contrastive.siglip.reference import siglip_rows_reference
from mmkernels.testing import cpp
from mmkernels.testing.numerics import assert_close

from tests.helpers.rss import peak_extra

C = cpp.kernels()

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(N, M, D, dtype, *, seed=0, magnitude=1.0, normalise=True):
    """q [N, D], k [M, D] in dtype, targets [N] in [-1, M) with a -1 row and positives at both ends,
    g_row [N] (non-uniform, of both signs)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(N, D, generator=gen, dtype=torch.float64)
    k = torch.randn(M, D, generator=gen, dtype=torch.float64)
    if normalise:
        q = torch.nn.functional.normalize(q, dim=1)
        k = torch.nn.functional.normalize(k, dim=1)
    targets = torch.randint(-1, M, (N,), generator=gen)
    for i, t in enumerate([M - 1, -1, 0]):
        if i < N:
            targets[i] = t
    g_row = torch.randn(N, generator=gen, dtype=torch.float64) + 0.5
    return (magnitude * q).to(dtype), (magnitude * k).to(dtype), targets, g_row


def dense(q, k, scale, bias, targets, g_row, dtype):
    """(row_loss, dq, dk, dscale, dbias) of the materialised formula in `dtype`, by autograd."""
    q = q.detach().to(dtype).requires_grad_()
    k = k.detach().to(dtype).requires_grad_()
    s = torch.tensor(float(scale), dtype=dtype, requires_grad=True)
    b = torch.tensor(float(bias), dtype=dtype, requires_grad=True)
    rows = siglip_rows_reference(q, k, s, b, targets)
    dq, dk, ds, db = torch.autograd.grad((rows * g_row.to(dtype)).sum(), (q, k, s, b))
    return rows.detach(), dq, dk, ds, db


def run_and_compare(q, k, scale, bias, targets, g_row):
    """Both kernels against the float64 reference; returns (row_loss, dq, dk, dscale, dbias)."""
    dtype = q.dtype
    sd = stats_dtype(dtype)
    s, b = torch.tensor(scale, dtype=sd), torch.tensor(bias, dtype=sd)
    rows = C.siglip_rows(q, k, s, b, targets)
    dq, dk, ds, db = C.siglip_grads(q, k, s, b, targets, g_row.to(sd))
    assert rows.dtype == sd and rows.shape == (q.shape[0],)
    assert dq.dtype == dtype and dq.shape == q.shape and dq.is_contiguous()
    assert dk.dtype == dtype and dk.shape == k.shape and dk.is_contiguous()
    assert ds.dtype == db.dtype == sd and ds.dim() == db.dim() == 0

    ref = dense(q, k, scale, bias, targets, g_row, torch.float64)
    eager = dense(q, k, scale, bias, targets, g_row, torch.float32)
    for name, out, r, e in zip(["row_loss", "dq", "dk", "dscale", "dbias"],
                               (rows, dq, dk, ds, db), ref, eager):
        # Outputs in the input dtype (dq, dk) are held to its tolerance; the float32 ones to float32's.
        out_dtype = out.dtype
        assert_close(out, r, out_dtype, eager=e.to(out_dtype), name=f"{name} {dtype} {tuple(q.shape)}x{tuple(k.shape)}")
    return rows, dq, dk, ds, db


SIZES = [1, 7, 97]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [1, 88])
@pytest.mark.parametrize("N,M", list(itertools.product(SIZES, SIZES)) + [(33, 65), (65, 33)])
def test_against_reference(N, M, D, dtype):
    q, k, t, g = make_inputs(N, M, D, dtype, seed=N * 1000 + M * 10 + D)
    run_and_compare(q, k, 10.0, -10.0, t, g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale,bias", [(100.0, -10.0), (-3.5, 2.0), (1.0, 0.0)])
def test_scale_and_bias(scale, bias, dtype):
    # Unnormalised features with scale 100: logits in the hundreds, where softplus is linear on one
    # side and vanishes on the other, and sigmoid saturates.
    q, k, t, g = make_inputs(97, 65, 33, dtype, seed=3, magnitude=2.0 if scale == 100.0 else 1.0,
                             normalise=scale != 100.0)
    rows, *grads = run_and_compare(q, k, scale, bias, t, g)
    for x in [rows, *grads]:
        assert torch.isfinite(x).all()
    if scale == 100.0:
        L = scale * (q.double() @ k.double().T) + bias
        assert L.abs().max() > 500


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    N, M, D = 97, 65, 33
    q, k, t, g = make_inputs(N, M, D, dtype, seed=5)
    q_nc = q.t().contiguous().t()                      # column-major view
    k_big = torch.randn(2 * M, D + 3).to(dtype)
    k_big[::2, 1:D + 1] = k
    k_nc = k_big[::2, 1:D + 1]                         # strided, offset slice
    t_nc = torch.stack([t, t], 1)[:, 0]
    g_nc = torch.stack([g, g], 1)[:, 1]
    assert not (q_nc.is_contiguous() or k_nc.is_contiguous() or t_nc.is_contiguous() or g_nc.is_contiguous())
    a = run_and_compare(q, k, 10.0, -10.0, t, g)
    b = run_and_compare(q_nc, k_nc, 10.0, -10.0, t_nc, g_nc)
    for x, y in zip(a, b):
        # Not bitwise: BLAS may take another path for differently aligned copies.
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("N,M,D", [
    (1100, 4096, 4),    # two row chunks (R = 1024 rows of 4096)
    (3, 20000, 8),      # few long rows: rows split into column segments, the positive in one
    (5, 1025, 16),
])
def test_chunking_paths(N, M, D):
    q, k, t, g = make_inputs(N, M, D, torch.float32, seed=11)
    t[-1] = M // 2
    run_and_compare(q, k, 10.0, -10.0, t, g)


@pytest.mark.parametrize("N,M,D", [(1, 1, 1), (7, 7, 3), (97, 65, 33), (1030, 4096, 2)])
def test_float64_path(N, M, D):
    """float64 input (used by gradcheck) is computed in float64: every output is float64."""
    q, k, t, g = make_inputs(N, M, D, torch.float64, seed=4, normalise=False)
    q = q.t().contiguous().t()  # non-contiguous
    s, b = torch.tensor(3.7, dtype=torch.float64), torch.tensor(-1.3, dtype=torch.float64)
    rows = C.siglip_rows(q, k, s, b, t)
    grads = C.siglip_grads(q, k, s, b, t, g)
    ref = dense(q, k, 3.7, -1.3, t, g, torch.float64)
    for o, r in zip((rows, *grads), ref):
        assert o.dtype == torch.float64
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)


def test_empty_key_set_and_zero_dim():
    # M = 0: every row is an empty sum (targets all -1). D = 0: every logit is the bias.
    q, _, _, g = make_inputs(4, 1, 3, torch.float32)
    s, b = torch.tensor(10.0), torch.tensor(-2.0)
    t = torch.full((4,), -1)
    k0 = torch.empty(0, 3)
    assert torch.equal(C.siglip_rows(q, k0, s, b, t), torch.zeros(4))
    dq, dk, ds, db = C.siglip_grads(q, k0, s, b, t, g.float())
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == (0, 3) and ds == 0 and db == 0
    run_and_compare(torch.randn(3, 0), torch.randn(5, 0), 10.0, -2.0, torch.tensor([4, -1, 0]),
                    torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64))


def test_nan_propagates():
    q, k, t, g = make_inputs(7, 9, 5, torch.float32, seed=1)
    q[3, 2] = float("nan")
    rows = C.siglip_rows(q, k, torch.tensor(10.0), torch.tensor(-10.0), t)
    assert torch.isnan(rows[3])
    assert torch.isfinite(rows[torch.arange(7) != 3]).all()
    dq, dk, ds, db = C.siglip_grads(q, k, torch.tensor(10.0), torch.tensor(-10.0), t, g.float())
    assert torch.isnan(dq[3]).all() and torch.isnan(dk).all() and torch.isnan(ds) and torch.isnan(db)
    assert torch.isfinite(dq[torch.arange(7) != 3]).all()


def test_gradcheck_float64():
    q, k, t, _ = make_inputs(5, 6, 3, torch.float64, seed=7, normalise=False)
    t = torch.tensor([5, -1, 0, 2, 2])
    args = (q.requires_grad_(), k.requires_grad_(),
            torch.tensor(1.7, dtype=torch.float64, requires_grad=True),
            torch.tensor(-0.8, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(
        lambda a, b, s, c: torch.ops.mmkernels.siglip_rows(a, b, s, c, t, "cpu"), args)


def test_opcheck():
    q, k, t, g = make_inputs(9, 13, 12, torch.float32, seed=1)
    s, b = torch.tensor(7.0), torch.tensor(-3.0)
    torch.library.opcheck(torch.ops.mmkernels.siglip_rows.default,
                          (q.requires_grad_(), k.requires_grad_(), s.requires_grad_(),
                           b.requires_grad_(), t, "cpu"))
    torch.library.opcheck(torch.ops.mmkernels.siglip_grads.default,
                          (q.detach(), k.detach(), s.detach(), b.detach(), t, g.float(), "cpu"))


def test_bad_inputs_raise():
    q, k, t, g = make_inputs(5, 6, 4, torch.float32)
    g = g.float()
    s, b = torch.tensor(1.0), torch.tensor(0.0)
    cases = [
        ("2-D", (q[0], k, s, b, t)),
        ("feature dims", (q, k[:, :3], s, b, t)),
        ("same dtype", (q, k.half(), s, b, t)),
        ("unsupported dtype", (q.to(torch.int32), k.to(torch.int32), s, b, t)),
        ("CPU tensors", (q.to("meta"), k.to("meta"), s, b, t)),
        (r"out of range \[-1, 6\)", (q, k, s, b, torch.tensor([0, 1, 2, 3, 6]))),
        (r"out of range \[-1, 6\)", (q, k, s, b, torch.tensor([0, 1, -2, 3, 5]))),
        ("targets must have shape", (q, k, s, b, t[:3])),
        ("targets must be an integer", (q, k, s, b, t.float())),
        ("scale must have one element", (q, k, torch.ones(2), b, t)),
        ("bias must be a floating", (q, k, s, torch.tensor(1), t)),
    ]
    for message, args in cases:
        with pytest.raises(RuntimeError, match=message):
            C.siglip_rows(*args)
        with pytest.raises(RuntimeError, match=message):
            C.siglip_grads(*args, g)
    with pytest.raises(RuntimeError, match="mmkernels siglip: g_row must have shape"):
        C.siglip_grads(q, k, s, b, t, g[:4])


_MEMORY_BODY = """
import torch
from mmkernels import _ext

def setup(n, d):
    torch.manual_seed(0)
    n, d = int(n), int(d)
    q = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    return q, k, torch.arange(n), torch.ones(n)

def run(state):
    q, k, t, g = state
    s, b = torch.tensor(10.0), torch.tensor(-10.0)
    rows = _ext.C.siglip_rows(q, k, s, b, t)
    _ext.C.siglip_grads(q, k, s, b, t, g)
    return float(rows.sum())
"""


@pytest.mark.slow
def test_memory_bound_no_n_by_m():
    """N = M = 4096: the kernels' extra memory is the chunk buffer (16 MiB) and O(N * D), well under
    one N x M float32 matrix (64 MiB)."""
    n, d = 4096, 16
    out = peak_extra(_MEMORY_BODY, n, d)
    assert out["extra"] <= 0.5 * n * n * 4, f"used {out['extra'] / 2**20:.0f} MiB extra"


@pytest.mark.parametrize("N,M,D", [(7, 97, 88), (97, 33, 16), (130, 130, 64)])
def test_bf16_gemm_products(N, M, D):
    """bf16_gemm=True (bf16 GEMMs, products rounded to bf16 as eager bf16 code rounds them)
    against the float64 reference, within the bf16 tolerance or twice the eager bf16 error."""
    q, k, t, g = make_inputs(N, M, D, torch.bfloat16, seed=N + M + D)
    s, b = torch.tensor(10.0), torch.tensor(-10.0)
    rows = C.siglip_rows(q, k, s, b, t, True)
    dq, dk, ds, db = C.siglip_grads(q, k, s, b, t, g.float(), True)
    assert dq.dtype == dk.dtype == torch.bfloat16
    ref = dense(q, k, 10.0, -10.0, t, g, torch.float64)
    eager = dense(q, k, 10.0, -10.0, t, g, torch.bfloat16)
    for name, out, r, e in zip(["row_loss", "dq", "dk", "dscale", "dbias"],
                               (rows, dq, dk, ds, db), ref, eager):
        assert_close(out, r, torch.bfloat16, eager=e, name=f"{name} bf16_gemm")
