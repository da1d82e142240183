"""The C++ CPU kernels (mmkernels._C) against a dense float64 computation.

These call the extension directly (no dispatch, no autograd wrapper): they pin the
kernel contract of ``mmkernels.contrastive.ops`` (its module docstring). The reference materialises L in float64
and takes its gradients with autograd; "eager" is the same dense computation in
float32, whose error sets the allowance for quantities limited by the fp32 GEMM
(an output passes when |out - ref| <= atol + rtol*|ref| + 2*max|eager - ref|).
float64 input (the gradcheck path) is computed in float64 and compared tightly.
"""
import itertools

import pytest
import torch

from mmkernels.testing import cpp

C = cpp.kernels()

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def dense_stats(q, k, scale, targets, with_columns, dtype=torch.float64):
    """All seven statistics from a materialised L, with autograd enabled on q, k, scale: the
    log-sum and sum of each row (column) relative to its max, which is held fixed for autograd
    (the op's contract)."""
    L = scale * (q @ k.T)
    rows = torch.arange(q.shape[0])
    out = []
    for dim in ((1, 0) if with_columns else (1,)):
        mx = L.amax(dim)
        sh = L - shift(mx).detach().unsqueeze(dim)
        out += [sh.exp().sum(dim).log(), mx, sh.sum(dim)]
        if dim == 1:
            out.append(L[rows, targets])
    if not with_columns:
        out += [L.new_zeros(0)] * 3
    return out


def shift(m):
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def dense_grads(q, k, scale, targets, with_columns, g, dtype):
    """(dq, dk, dscale) of sum(g_row_lse*row_lse + g_row_sum*row_sum + g_pos*pos [+ columns])."""
    q = q.detach().to(dtype).requires_grad_()
    k = k.detach().to(dtype).requires_grad_()
    s = scale.detach().to(dtype).requires_grad_()
    st = dense_stats(q, k, s, targets, with_columns)
    loss = (g["g_row_lse"].to(dtype) * st[0]).sum() + (g["g_row_sum"].to(dtype) * st[2]).sum() \
        + (g["g_pos"].to(dtype) * st[3]).sum()
    if with_columns:
        loss = loss + (g["g_col_lse"].to(dtype) * st[4]).sum() + (g["g_col_sum"].to(dtype) * st[6]).sum()
    return torch.autograd.grad(loss, (q, k, s))


def check(name, out, ref, eager, dtype=torch.float32):
    atol, rtol = TOL[dtype]
    assert out.shape == ref.shape, (name, out.shape, ref.shape)
    o, r, e = out.double(), ref.double(), eager.double()
    assert not torch.isnan(o).any(), f"{name}: NaN in output"
    allow_eager = 2 * (e - r).abs().max().item() if r.numel() else 0.0
    err = (o - r).abs()
    bound = atol + rtol * r.abs() + allow_eager
    if err.numel() and not bool((err <= bound).all()):
        i = int(torch.argmax(err - bound))
        raise AssertionError(f"{name} ({dtype}): error {err.flatten()[i].item():.3g} > bound "
                             f"{bound.flatten()[i].item():.3g} (max error {err.max().item():.3g}, "
                             f"eager allowance {allow_eager:.3g})")


def make_inputs(N, M, D, dtype, with_columns, seed=0, feat_scale=1.0, normalise=True):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(N, D, generator=gen) * feat_scale
    k = torch.randn(M, D, generator=gen) * feat_scale
    if normalise:
        q = torch.nn.functional.normalize(q, dim=1)
        k = torch.nn.functional.normalize(k, dim=1)
    if with_columns and N == M:
        targets = torch.arange(N)
    else:
        targets = torch.randint(0, M, (N,), generator=gen)
    g = {
        "g_row_lse": torch.randn(N, generator=gen),
        "g_row_sum": torch.randn(N, generator=gen) * 0.1,
        "g_pos": torch.randn(N, generator=gen),
        "g_col_lse": torch.randn(M, generator=gen) if with_columns else torch.zeros(0),
        "g_col_sum": torch.randn(M, generator=gen) * 0.1 if with_columns else torch.zeros(0),
    }
    return q.to(dtype), k.to(dtype), targets, g


def run_and_compare(q, k, scale, targets, with_columns, g):
    dtype = q.dtype
    stats = C.contrastive_stats(q, k, scale, targets, with_columns)
    assert len(stats) == 7
    for t in stats:
        assert t.dtype == torch.float32
    if not with_columns:
        for t in stats[4:]:
            assert t.shape == (0,)

    ref = dense_stats(q.double(), k.double(), scale.double(), targets, with_columns)
    eager = dense_stats(q.float(), k.float(), scale.float(), targets, with_columns)
    names = ["row_logsum", "row_max", "row_sum", "pos", "col_logsum", "col_max", "col_sum"]
    for name, o, r, e in zip(names, stats, ref, eager):
        check(name, o, r.detach(), e.detach())
    # pos is read from the same logits as row_max: the top-1 test is exact.
    row_max, pos = stats[1], stats[3]
    assert bool((pos <= row_max).all())
    L32 = scale * (q.float() @ k.float().T)
    top1 = L32.argmax(1) == targets
    if (L32.max(1).values - L32[torch.arange(len(targets)), targets]).abs().min() > 1e-3:
        assert torch.equal(pos >= row_max, top1)

    dq, dk, ds = C.contrastive_grads(q, k, scale, targets, stats[1], stats[0], stats[5], stats[4],
                                     g["g_row_lse"], g["g_row_sum"], g["g_pos"], g["g_col_lse"],
                                     g["g_col_sum"])
    assert dq.dtype == dtype and dk.dtype == dtype and dq.shape == q.shape and dk.shape == k.shape
    assert ds.dtype == torch.float32 and ds.dim() == 0
    rq, rk, rs = dense_grads(q, k, scale, targets, with_columns, g, torch.float64)
    eq, ek, es = dense_grads(q, k, scale, targets, with_columns, g, torch.float32)
    check("dq", dq, rq, eq.to(dtype), dtype)
    check("dk", dk, rk, ek.to(dtype), dtype)
    check("dscale", ds, rs, es)
    return stats, (dq, dk, ds)


SIZES_N = [1, 7, 97, 129]
SIZES_M = [1, 7, 97, 130]
SIZES_D = [1, 33, 88]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", SIZES_D)
@pytest.mark.parametrize("N,M", list(itertools.product(SIZES_N, SIZES_M)))
def test_rows_only(N, M, D, dtype):
    q, k, t, g = make_inputs(N, M, D, dtype, False, seed=N * 1000 + M + D)
    run_and_compare(q, k, torch.tensor(14.3), t, False, g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", SIZES_D)
@pytest.mark.parametrize("N,M", [(n, n) for n in SIZES_N] + [(7, 130), (129, 1), (97, 7)])
def test_with_columns(N, M, D, dtype):
    q, k, t, g = make_inputs(N, M, D, dtype, True, seed=N * 1000 + M + D)
    run_and_compare(q, k, torch.tensor(14.3), t, True, g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_columns", [False, True])
def test_scale_100_unnormalised(dtype, with_columns):
    # Logits in the thousands: the log-sum-exp must stay finite and exact.
    q, k, t, g = make_inputs(129, 129, 88, dtype, with_columns, seed=3, feat_scale=2.0, normalise=False)
    stats, grads = run_and_compare(q, k, torch.tensor(100.0), t, with_columns, g)
    assert stats[1].abs().max() > 1000
    for x in stats[:4] + (stats[4:] if with_columns else ()):
        assert torch.isfinite(x).all()
    for x in grads:
        assert torch.isfinite(x).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_columns", [False, True])
def test_non_contiguous_inputs(dtype, with_columns):
    N = M = 97
    D = 33
    q, k, t, g = make_inputs(N, M, D, dtype, with_columns, seed=5)
    q_nc = q.t().contiguous().t()                      # column-major view
    k_big = torch.zeros(2 * M, D + 3, dtype=dtype)
    k_big[::2, 1:D + 1] = k
    k_nc = k_big[::2, 1:D + 1]                         # strided, offset slice
    assert not q_nc.is_contiguous() and not k_nc.is_contiguous()
    t_nc = torch.stack([t, t], 1)[:, 0]
    g_nc = {name: torch.stack([v, v], 1)[:, 1] for name, v in g.items()}
    scale = torch.tensor(14.3)
    a = C.contrastive_stats(q, k, scale, t, with_columns)
    b = C.contrastive_stats(q_nc, k_nc, scale, t_nc, with_columns)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    run_and_compare(q_nc, k_nc, scale, t_nc, with_columns, g_nc)
    ga = C.contrastive_grads(q, k, scale, t, a[1], a[0], a[5], a[4], *g.values())
    gb = C.contrastive_grads(q_nc, k_nc, scale, t_nc, b[1], b[0], b[5], b[4], *g_nc.values())
    for x, y in zip(ga, gb):
        # Not bitwise: BLAS may take another path for differently aligned copies.
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("N,M,D", [
    (2500, 2048, 16),   # two row chunks (R = 2048): online column merge across chunks
    (3, 20000, 8),      # few rows, long rows: rows split into column segments
    (1, 9000, 4),
])
def test_chunking_paths(N, M, D):
    q, k, t, g = make_inputs(N, M, D, torch.float32, True, seed=11)
    run_and_compare(q, k, torch.tensor(20.0), t, True, g)


@pytest.mark.parametrize("with_columns", [False, True])
@pytest.mark.parametrize("N,M,D", [(1, 1, 1), (7, 7, 3), (97, 130, 33), (2500, 2048, 4)])
def test_float64_path(N, M, D, with_columns):
    """float64 input (used by gradcheck) is computed in float64: stats and dscale are float64."""
    q, k, t, g = make_inputs(N, M, D, torch.float64, with_columns, seed=4, normalise=False)
    q = q.t().contiguous().t()  # non-contiguous
    scale = torch.tensor(3.7, dtype=torch.float64)
    st = C.contrastive_stats(q, k, scale, t, with_columns)
    ref = dense_stats(q, k, scale, t, with_columns)
    for o, r in zip(st, ref):
        assert o.dtype == torch.float64
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)
    g64 = {name: v.double() for name, v in g.items()}
    dq, dk, ds = C.contrastive_grads(q, k, scale, t, st[1], st[0], st[5], st[4], *g64.values())
    assert dq.dtype == dk.dtype == ds.dtype == torch.float64 and ds.dim() == 0
    rq, rk, rs = dense_grads(q, k, scale, t, with_columns, g64, torch.float64)
    for o, r in [(dq, rq), (dk, rk), (ds, rs)]:
        torch.testing.assert_close(o, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("with_columns", [False, True])
def test_nan_propagates(with_columns):
    q, k, t, g = make_inputs(7, 7, 33, torch.float32, with_columns, seed=1)
    q = q.clone()
    q[3, 5] = float("nan")
    st = C.contrastive_stats(q, k, torch.tensor(10.0), t, with_columns)
    assert torch.isnan(st[0][3]) and torch.isnan(st[1][3])
    mask = torch.ones(7, dtype=torch.bool)
    mask[3] = False
    assert torch.isfinite(st[0][mask]).all()
    if with_columns:
        assert torch.isnan(st[4]).all()  # every column sees row 3
    st = C.contrastive_stats(q.nan_to_num(), k, torch.tensor(float("nan")), t, with_columns)
    assert torch.isnan(st[0]).all()
    if with_columns:
        assert torch.isnan(st[4]).all()


def test_infinite_logits_follow_logsumexp():
    q = torch.tensor([[1.0], [-1.0]])
    k = torch.tensor([[float("inf")], [1.0]])
    st = C.contrastive_stats(q, k, torch.tensor(1.0), torch.tensor([1, 1]), True)
    L = q @ k.T
    torch.testing.assert_close(st[0] + shift(st[1]), L.logsumexp(1))
    torch.testing.assert_close(st[4] + shift(st[5]), L.logsumexp(0))


def test_bad_inputs_raise():
    q, k, t, _ = make_inputs(5, 6, 4, torch.float32, False)
    s = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="2-D"):
        C.contrastive_stats(q[0], k, s, t, False)
    with pytest.raises(RuntimeError, match="feature dims"):
        C.contrastive_stats(q, k[:, :3], s, t, False)
    with pytest.raises(RuntimeError, match="same dtype"):
        C.contrastive_stats(q, k.half(), s, t, False)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        C.contrastive_stats(q.to(torch.int32), k.to(torch.int32), s, t, False)
    with pytest.raises(RuntimeError, match="out of range"):
        C.contrastive_stats(q, k, s, torch.tensor([0, 1, 2, 3, 6]), False)
    with pytest.raises(RuntimeError, match="targets must have shape"):
        C.contrastive_stats(q, k, s, t[:3], False)
    st = C.contrastive_stats(q, k, s, t, False)
    z = torch.zeros(5)
    with pytest.raises(RuntimeError, match="g_pos"):
        C.contrastive_grads(q, k, s, t, st[1], st[0], st[5], st[4], z, z, z[:4], st[4], st[4])
