"""The SigLIP Triton kernels against the float64 reference (autograd of siglip_rows_reference).

Without a GPU the kernels run through Triton's interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1 before anything imports triton); with a GPU the same tests run on CUDA
tensors. Shapes stay small (<= 130 rows) because the interpreter is slow.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import mmkernels.contrastive.siglip.ops  # noqa: E402, F401  (registers the ops)
from mmkernels import tuning  # noqa: E402
from mmkernels.contrastive.kernels import (TileConfig, cols_per_split, grad_block_d,  # noqa: E402
                                           input_precision, resolve_config)
from mmkernels.contrastive.siglip import kernels as SK  # noqa: E402
from mmkernels.contrastive.siglip.reference import signs, siglip_rows_reference  # noqa: E402
from mmkernels.testing.numerics import assert_close, tolerance  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    # the interpreter evaluates kernels with numpy: inf/nan arithmetic warnings, and
    # Triton 3.6's int() of 1-element arrays (mmkernels._triton replaces it on numpy >= 2.3)
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, M, D): N and M in {1, 7, 33, 65, 97}, D in {1, 8, 88, 130}, ragged tiles both ways
SHAPES = [
    (1, 1, 1),
    (7, 97, 8),
    (97, 7, 88),
    (33, 65, 130),
    (65, 33, 1),
    (1, 97, 88),
    (97, 1, 8),
    (7, 7, 130),
]
SMALL = TileConfig(16, 16, 16, 1, 1)


# ---------------------------------------------------------------------------
# inputs and the float64 truth
# ---------------------------------------------------------------------------


def make_inputs(N, M, D, dtype, *, seed=0, scale=None, bias=None, magnitude=None):
    """Unit rows (as SigLIP's features) in ``dtype``, targets with -1 entries, a scale in
    [1, 100], a bias in [-10, 0] and a non-uniform incoming gradient ``g_row``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, D, generator=g, dtype=torch.float64)
    k = torch.randn(M, D, generator=g, dtype=torch.float64)
    if magnitude is None:
        q = torch.nn.functional.normalize(q, dim=-1)
        k = torch.nn.functional.normalize(k, dim=-1)
    else:
        q, k = q * magnitude, k * magnitude
    targets = torch.randint(-1, M, (N,), generator=g)
    targets[::3] = -1  # rows without a positive (other ranks' keys in distributed SigLIP)
    if scale is None:
        scale = 1.0 + 99.0 * torch.rand((), generator=g).item()
    if bias is None:
        bias = -10.0 * torch.rand((), generator=g).item()
    g_row = torch.rand(N, generator=g, dtype=torch.float64) * 2.0 - 0.5
    to = dict(device=DEVICE)
    return (q.to(dtype).to(**to), k.to(dtype).to(**to),
            torch.tensor(scale, dtype=torch.float32, **to), torch.tensor(bias, dtype=torch.float32, **to),
            targets.to(**to), g_row.float().to(**to))


def _max(t):
    return t.max().item() if t.numel() else 0.0


def reference(q, k, scale, bias, targets, g_row):
    """float64 ``(row_loss, dq, dk, dscale, dbias)`` by autograd of the reference, and the
    magnitudes the tolerances scale with (see :func:`check`)."""
    qd = q.detach().double().requires_grad_()
    kd = k.detach().double().requires_grad_()
    sd = scale.detach().double().requires_grad_()
    bd = bias.detach().double().requires_grad_()
    rows = siglip_rows_reference(qd, kd, sd, bd, targets)
    dq, dk, ds, db = torch.autograd.grad((rows * g_row.double()).sum(), (qd, kd, sd, bd))
    with torch.no_grad():
        S = qd @ kd.T
        L = sd * S + bd
        z = signs(q.shape[0], k.shape[0], targets, torch.float64)
        sig = torch.sigmoid(-z * L)
        # first-order error of L in fp32: |dL| <~ eps (|scale| |q_i|.|k_j| + |bias|); softplus
        # and G change by sig |dL| and |G| |dL|, so these are what their errors scale with
        Lmag = sd.abs() * (qd.abs() @ kd.abs().T) + bd.abs()
        G = g_row.double()[:, None] * sig
        A = G.abs() * (1.0 + Lmag)
        mags = {
            "row_loss": (sig * (1.0 + Lmag)).sum(1),
            "dq": sd.abs() * _max(A @ kd.abs()),
            "dk": sd.abs() * _max(A.T @ qd.abs()),
            "dscale": (A * S.abs()).sum(),
            "dbias": A.sum(),
        }
    return (rows.detach(), dq, dk, ds, db), mags


def fwd_dtype(dtype):
    """The tolerance row of the forward: products of 16-bit inputs are exact in fp32; fp32
    inputs may run on tf32 tensor cores (GPU, allow_tf32)."""
    if dtype == torch.float32 and input_precision(torch.float32) == "tf32":
        return "tf32"
    return torch.float32


def check(out, ref, mags, dtype, name=""):
    """``out = (row_loss, dq, dk, dscale, dbias)`` against the reference under the project's
    table: ``|out - ref| <= atol * mag + rtol * |ref| + step``, ``step`` the output dtype's
    subnormal spacing (a result below its normal range cannot be nearer). The forward and the
    two scalar gradients are fp32 sums of exactly represented products; dq and dk take G
    rounded to the input dtype for the tensor cores."""
    names = ("row_loss", "dq", "dk", "dscale", "dbias")
    row_loss, dq, dk, ds, db = out
    assert row_loss.dtype == torch.float32 and row_loss.shape == ref[0].shape
    assert ds.dtype == torch.float32 and db.dtype == torch.float32 and ds.dim() == db.dim() == 0
    assert dq.shape == ref[1].shape and dk.shape == ref[2].shape
    grad_dtype = fwd_dtype(dtype) if dtype == torch.float32 else dtype
    tols = (fwd_dtype(dtype), grad_dtype, grad_dtype, fwd_dtype(dtype), fwd_dtype(dtype))
    for n, o, r, tol in zip(names, out, ref, tols):
        fi = torch.finfo(o.dtype)
        atol = tolerance(tol)[0]
        mag = torch.as_tensor(mags[n], dtype=torch.float64) + fi.smallest_normal * fi.eps / atol
        assert_close(o.detach().double().cpu() / mag.cpu(), r.detach().double().cpu() / mag.cpu(),
                     tol, name=f"{name} {n}")


def run(q, k, scale, bias, targets, g_row, **kw):
    fwd_kw = {n: v for n, v in kw.items() if n in ("config", "col_splits")}
    bwd_kw = {n: v for n, v in kw.items() if n == "config"}
    rows = SK.siglip_rows_triton(q, k, scale, bias, targets, **fwd_kw)
    return (rows, *SK.siglip_grads_triton(q, k, scale, bias, targets, g_row, **bwd_kw))


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------


def _cases():
    cases = []
    for i, shape in enumerate(SHAPES):
        for j, dtype in enumerate(DTYPES):
            if i % 2 == 1 and (i + j) % 3 == 2:  # every dtype on half the shapes, two on the rest
                continue
            cases.append(pytest.param(shape, dtype, id=f"{shape[0]}x{shape[1]}x{shape[2]}-{str(dtype)[6:]}"))
    return cases


@pytest.mark.parametrize("shape,dtype", _cases())
def test_matches_reference(shape, dtype):
    N, M, D = shape
    inputs = make_inputs(N, M, D, dtype, seed=N * 1000 + M * 10 + D)
    ref, mags = reference(*inputs)
    check(run(*inputs), ref, mags, dtype, name=str(shape))


@pytest.mark.parametrize("scale,bias", [(1.0, 0.0), (100.0, -10.0), (10.0, -5.0)])
def test_scale_and_bias_extremes(scale, bias):
    N, M, D = 33, 65, 88
    inputs = make_inputs(N, M, D, torch.float32, seed=2, scale=scale, bias=bias)
    ref, mags = reference(*inputs)
    check(run(*inputs), ref, mags, torch.float32, name=f"scale {scale} bias {bias}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype):
    N, M, D = 33, 65, 40
    q0, k0, scale, bias, _, g0 = make_inputs(2 * N, M, 2 * D, dtype, seed=3)
    q = q0[::2, ::2]  # both strides != natural
    k = k0[:, :D].t().contiguous().t()  # column-major: stride (1, M)
    targets = torch.randint(-1, M, (2 * N,), generator=torch.Generator().manual_seed(4)).to(DEVICE)[::2]
    g_row = g0[::2]
    assert not (q.is_contiguous() or k.is_contiguous() or targets.is_contiguous()
                or g_row.is_contiguous())
    ref, mags = reference(q, k, scale, bias, targets, g_row)
    check(run(q, k, scale, bias, targets, g_row), ref, mags, dtype, name="strided")
    # an expanded incoming gradient (stride 0), as autograd hands over for rows.sum()
    ones = torch.ones((), device=DEVICE).expand(N)
    ref, mags = reference(q, k, scale, bias, targets, ones)
    check(run(q, k, scale, bias, targets, ones), ref, mags, dtype, name="expanded g_row")


@pytest.mark.parametrize("col_splits", [1, 3, 9])
def test_forward_with_the_columns_split(col_splits):
    """Each block of rows shared by 1, 3 or 9 programs (9: one 16-column block each, the last
    ragged); the partial row sums add up to the reference's."""
    N, M, D = 33, 130, 24
    q, k, scale, bias, targets, g_row = make_inputs(N, M, D, torch.float32, seed=5)
    assert cols_per_split(N, M, 16, 16, torch.device(DEVICE), col_splits) == 16 * (-(-9 // col_splits))
    out = SK.siglip_rows_triton(q, k, scale, bias, targets, config=SMALL, col_splits=col_splits)
    ref, mags = reference(q, k, scale, bias, targets, g_row)
    assert_close(out.double().cpu() / mags["row_loss"].cpu(), ref[0].cpu() / mags["row_loss"].cpu(),
                 fwd_dtype(torch.float32), name=f"{col_splits} splits")


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_tiles_and_feature_chunks(dtype):
    """16x16 tiles: many row programs and column splits forward; backward with D = 130 in
    chunks of 32 features, each program recomputing its logits, and many dscale/dbias shares."""
    N, M, D = 97, 65, 130
    inputs = make_inputs(N, M, D, dtype, seed=6)
    assert -(-D // grad_block_d(D, SMALL)) == 5
    ref, mags = reference(*inputs)
    got = run(*inputs, config=SMALL)
    check(got, ref, mags, dtype, name="16x16")
    if dtype == torch.float32:  # the tiles change the summation order only
        for a, b in zip(got, run(*inputs)):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


def test_tuning_override_picks_the_tiles():
    """An override of kind contrastive/siglip_* is used when no config is passed; an explicit
    config still wins; without either the heuristic of the kernels module."""
    D = 24
    prec = input_precision(torch.float32)
    resolve = resolve_config
    assert resolve(torch.float32, D, prec, None, "siglip_rows", heuristic=SK.rows_config) == \
        SK.rows_config(torch.float32, D, prec)
    with tuning.scope():
        tuning.set_config("contrastive", "siglip_rows", SMALL, dtype=torch.float32)
        tuning.set_config("contrastive", "siglip_grads", SMALL._asdict())
        assert resolve(torch.float32, D, prec, None, "siglip_rows", heuristic=SK.rows_config) == SMALL
        assert resolve(torch.bfloat16, D, "tf32", None, "siglip_grads", heuristic=SK.grads_config) == SMALL
        assert resolve(torch.bfloat16, D, "tf32", None, "siglip_rows", heuristic=SK.rows_config) == \
            SK.rows_config(torch.bfloat16, D, "tf32")
        explicit = TileConfig(32, 32, 16, 2, 1)
        assert resolve(torch.float32, D, prec, explicit, "siglip_rows", heuristic=SK.rows_config) == explicit
        # the contrastive kinds are untouched
        assert resolve(torch.float32, D, prec, None, "stats") != SMALL
        inputs = make_inputs(29, 40, D, torch.float32, seed=7)
        ref, mags = reference(*inputs)
        check(run(*inputs), ref, mags, torch.float32, name="tuned")
    assert {"contrastive/siglip_rows", "contrastive/siglip_grads"} <= set(tuning.kinds())


def test_op_with_autograd():
    """torch.ops.mmkernels.siglip_rows(..., "triton") forward and backward, every input's
    gradient, against the reference; the mean of the rows (SigLIP's loss) included."""
    N, M, D = 33, 33, 64
    q, k, scale, bias, targets, g_row = make_inputs(N, M, D, torch.bfloat16, seed=8)
    targets = torch.arange(N, device=DEVICE)
    targets[5] = -1
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, scale, bias)]
    rows = torch.ops.mmkernels.siglip_rows(*leaves, targets, "triton")
    (rows * g_row).sum().backward()
    ref, mags = reference(q, k, scale, bias, targets, g_row)
    got = (rows, *(t.grad for t in leaves))
    assert got[1].dtype == torch.bfloat16 and got[3].dtype == torch.float32
    check(got, ref, mags, torch.bfloat16, name="op")
    for t in leaves:
        t.grad = None
    loss = torch.ops.mmkernels.siglip_rows(*leaves, targets, "triton").mean()
    loss.backward()
    ref, mags = reference(q, k, scale, bias, targets, torch.full((N,), 1.0 / N, device=DEVICE))
    check((rows.detach(), *(t.grad for t in leaves)), ref, mags, torch.bfloat16, name="op mean")


@pytest.mark.parametrize("small", ["q", "k"])
def test_fp16_small_gradients_keep_their_precision(small):
    """Small incoming gradients (a mean over a big batch) and features of 1e-2 on one side, 1e2
    on the other: every ``scale * G`` is below fp16's normal range while the gradient of the
    small side is a normal number; the kernel rescales G by a power of two for its fp16
    products and divides the fp32 result."""
    N, M, D = 33, 65, 32
    g = torch.Generator().manual_seed(9)
    sq, sk = (1e-2, 1e2) if small == "q" else (1e2, 1e-2)
    q = (sq * torch.randn(N, D, generator=g)).half().to(DEVICE)
    k = (sk * torch.randn(M, D, generator=g)).half().to(DEVICE)
    scale = torch.tensor(0.2, device=DEVICE)  # logits O(1)
    bias = torch.tensor(-1.0, device=DEVICE)
    targets = torch.randint(-1, M, (N,), generator=g).to(DEVICE)
    g_row = (1e-6 * (1.0 + torch.rand(N, generator=g))).to(DEVICE)
    ref, mags = reference(q, k, scale, bias, targets, g_row)
    assert float(scale) * 2e-6 < 6e-5  # |scale * G| <= scale * |g_row|: subnormal in fp16
    assert ref[1 if small == "q" else 2].abs().max() > 6.2e-5  # a normal gradient
    check(run(q, k, scale, bias, targets, g_row), ref, mags, torch.float16, name="fp16 tiny G")


def test_large_logits_stay_finite_and_accurate():
    """|L| in the thousands: no overflow in softplus or sigmoid, and no worse than twice eager
    fp32 on the same inputs."""
    N, M, D = 33, 65, 64
    q, k, scale, bias, targets, g_row = make_inputs(N, M, D, torch.float32, seed=10, scale=100.0,
                                                    bias=-10.0, magnitude=3.0)
    got = run(q, k, scale, bias, targets, g_row)
    ref, _ = reference(q, k, scale, bias, targets, g_row)
    L32 = scale * q @ k.T + bias
    z = signs(N, M, targets, torch.float32)
    eager = -torch.nn.functional.logsigmoid(z * L32).sum(1)
    assert all(torch.isfinite(t).all() for t in got)
    err = (got[0].double() - ref[0]).abs().max().item()
    eerr = (eager.double() - ref[0]).abs().max().item()
    assert err <= 2 * eerr + 1e-5 * ref[0].abs().max().item(), (err, eerr)


def test_nan_stays_in_its_row():
    N, M, D = 33, 40, 16
    q, k, scale, bias, targets, g_row = make_inputs(N, M, D, torch.float32, seed=11)
    q = q.clone()
    q[3, 5] = float("nan")
    rows = SK.siglip_rows_triton(q, k, scale, bias, targets)
    assert torch.isnan(rows[3]) and torch.isfinite(torch.cat([rows[:3], rows[4:]])).all()
    dq, dk, ds, db = SK.siglip_grads_triton(q, k, scale, bias, targets, g_row)
    assert torch.isnan(dq[3]).all() and torch.isfinite(torch.cat([dq[:3], dq[4:]])).all()
    assert torch.isnan(dk).any(dim=1).all() and torch.isnan(ds) and torch.isnan(db)


def test_empty_sides_and_no_features():
    q, k, scale, bias, targets, g_row = make_inputs(5, 3, 4, torch.float32, seed=12)
    rows = SK.siglip_rows_triton(q, k[:0], scale, bias, targets)
    assert rows.shape == (5,) and (rows == 0).all()
    dq, dk, ds, db = SK.siglip_grads_triton(q, k[:0], scale, bias, targets.clamp(max=-1), g_row)
    assert dq.shape == (5, 4) and (dq == 0).all() and dk.shape == (0, 4) and ds == 0 and db == 0
    assert SK.siglip_rows_triton(q[:0], k, scale, bias, targets[:0]).shape == (0,)
    # D = 0: every logit is the bias
    inputs = (q[:, :0], k[:, :0], scale, bias, targets, g_row)
    ref, mags = reference(*inputs)
    check(run(*inputs), ref, mags, torch.float32, name="D = 0")


def test_unsupported_dtypes_are_refused():
    q = torch.randn(3, 4, dtype=torch.float64, device=DEVICE)
    t = torch.zeros(3, dtype=torch.long, device=DEVICE)
    s = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(TypeError, match="float32, bfloat16, float16"):
        SK.siglip_rows_triton(q, q, s, s, t)
    with pytest.raises(TypeError, match="share"):
        SK.siglip_grads_triton(q.float(), q.half(), s, s, t, s.expand(3))
