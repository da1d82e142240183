"""The contrastive Triton launchers against a float64 dense evaluation of the contract.

Without a GPU the kernels run through Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton);
with a GPU the same tests run on CUDA tensors.  Shapes stay small (<= 130
rows) because the interpreter is slow.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from mmkernels import tuning  # noqa: E402
from mmkernels.contrastive import kernels as K  # noqa: E402
from mmkernels.testing.numerics import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    # the interpreter evaluates kernels with numpy: inf/nan arithmetic warnings, and
    # Triton 3.6's int() of 1-element arrays (mmkernels._triton replaces it on numpy >= 2.3)
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

# (N, M, D): every N in {1, 7, 97, 129}, M in {1, 7, 97, 130}, D in {1, 33, 88, 256}
# appears, with ragged tiles in both directions and single rows/columns.
SHAPES = [
    (1, 1, 1),
    (7, 130, 33),
    (97, 7, 88),
    (129, 97, 256),
    (97, 130, 1),
    (1, 97, 88),
    (129, 1, 33),
    (7, 7, 256),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------
# reference (float64, dense: fine at these sizes)
# ---------------------------------------------------------------------------


def make_inputs(N, M, D, dtype, *, seed=0, scale=10.0, magnitude=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, D, generator=g, dtype=torch.float64)
    k = torch.randn(M, D, generator=g, dtype=torch.float64)
    if magnitude is None:  # unit rows, as CLIP features
        q = torch.nn.functional.normalize(q, dim=-1)
        k = torch.nn.functional.normalize(k, dim=-1)
    else:
        q, k = q * magnitude, k * magnitude
    targets = torch.randint(0, M, (N,), generator=g)
    vecs = {name: torch.randn(n, generator=g, dtype=torch.float64).float()
            for name, n in (("g_row_lse", N), ("g_row_sum", N), ("g_pos", N),
                            ("g_col_lse", M), ("g_col_sum", M))}
    s = torch.tensor(scale, dtype=torch.float32)
    to = dict(device=DEVICE)
    return (q.to(dtype).to(**to), k.to(dtype).to(**to), s.to(**to), targets.to(**to),
            {n: v.to(**to) for n, v in vecs.items()})


def dense_stats(q, k, scale, targets, with_columns, dtype=torch.float64):
    """The contract's stats evaluated densely in ``dtype`` (float64: the reference): log-sum and
    sum relative to the max, the max, the positive logit (rows, then columns)."""
    L = scale.to(dtype) * (q.to(dtype) @ k.to(dtype).T)
    out = []
    for dim in ((1, 0) if with_columns else (1,)):
        mx = L.amax(dim)
        sh = L - shift(mx).unsqueeze(dim)
        out += [sh.exp().sum(dim).log(), mx, sh.sum(dim)]
        if dim == 1:
            out.append(L.gather(1, targets[:, None])[:, 0])
    return out


def shift(m):
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def dense_grads(q, k, scale, targets, row, col, v, with_columns, dtype=torch.float64):
    """dq, dk, dscale of the contract evaluated densely in ``dtype``; also |G| for magnitudes.
    ``row``/``col``: (max, log-sum relative to it) of the rows / columns."""
    qd, kd, s = q.to(dtype), k.to(dtype), scale.to(dtype)
    S = qd @ kd.T
    L = s * S
    G = v["g_row_lse"].to(dtype)[:, None] * torch.exp(
        (L - shift(row[0].to(dtype))[:, None]) - row[1].to(dtype)[:, None])
    G = G + v["g_row_sum"].to(dtype)[:, None]
    onehot = torch.zeros_like(G)
    onehot[torch.arange(G.shape[0], device=G.device), targets] = 1
    G = G + v["g_pos"].to(dtype)[:, None] * onehot
    if with_columns:
        G = G + v["g_col_lse"].to(dtype)[None, :] * torch.exp(
            (L - shift(col[0].to(dtype))[None, :]) - col[1].to(dtype)[None, :])
        G = G + v["g_col_sum"].to(dtype)[None, :]
    return s * G @ kd, s * G.T @ qd, (G * S).sum(), G


def magnitudes(q, k, scale):
    """|L| scales: largest |logit| bound and largest row/column sum of |logits|."""
    A = scale.double() * (q.double().abs() @ k.double().abs().T)
    return (max(1.0, A.max().item()), max(1.0, A.sum(1).max().item()),
            max(1.0, A.sum(0).max().item()))


def close(out, ref, dtype, mag, name):
    """The project's tolerance rule for ``dtype`` on ``out / mag``: ``atol * mag + rtol * |ref|``.

    ``mag`` is the size of the terms the quantity is built from (a sum of
    absolute values), so atol scales with it while rtol stays the table's.
    """
    assert_close(out.detach().double() / mag, ref.detach().double() / mag, dtype, name=name)


def check_stats(out, ref, q, k, scale, with_columns, name=""):
    """Stats are computed in fp32 from exactly representable inputs: fp32 tolerance for every dtype."""
    lmag, rsum, csum = magnitudes(q, k, scale)
    names = ["row_logsum", "row_max", "row_sum", "pos", "col_logsum", "col_max", "col_sum"]
    mags = [lmag, lmag, rsum, lmag, lmag, lmag, csum]
    assert len(out) == 7
    for o in out:
        assert o.dtype == torch.float32
    n_cmp = 7 if with_columns else 4
    for i in range(n_cmp):
        close(out[i], ref[i], torch.float32, mags[i], f"{name} {names[i]}")
    if not with_columns:
        for o in out[4:]:
            assert o.shape == (0,)


def check_grads(res, ref, q, k, scale, dtype, name=""):
    """dq/dk: the dtype's tolerance, scaled by |scale| * |G| @ |k| (resp. |G|^T @ |q|)."""
    dq, dk, ds = res
    rdq, rdk, rds, G = ref
    assert dq.dtype == q.dtype and dk.dtype == k.dtype and ds.dtype == torch.float32
    assert dq.shape == q.shape and dk.shape == k.shape and ds.dim() == 0
    s = abs(float(scale))
    Ga = G.abs()
    mag_dq = max(1.0, s * (Ga @ k.double().abs()).max().item())
    mag_dk = max(1.0, s * (Ga.T @ q.double().abs()).max().item())
    mag_ds = max(1.0, (Ga * (q.double() @ k.double().T).abs()).sum().item())
    close(dq, rdq, dtype, mag_dq, f"{name} dq")
    close(dk, rdk, dtype, mag_dk, f"{name} dk")
    # dscale sums G * S in fp32 inside the kernel for every input dtype
    close(ds, rds, torch.float32, mag_ds, f"{name} dscale")


def ref_pairs(stats, with_columns=True, device=DEVICE):
    """``(row_max, row_logsum), (col_max, col_logsum)`` of ``dense_stats`` as float32 (the
    column pair empty without columns)."""
    row = (stats[1].float(), stats[0].float())
    if not with_columns:
        e = torch.empty(0, device=device)
        return row, (e, e)
    return row, (stats[5].float(), stats[4].float())


def run_both(q, k, scale, targets, v, with_columns, **kw):
    stats = K.contrastive_stats_triton(q, k, scale, targets, with_columns,
                                       **({"config": kw["config"]} if "config" in kw else {}))
    ref_stats = dense_stats(q, k, scale, targets, with_columns)
    # grads take the (fp32) reference statistics as inputs, so they are tested on their own
    row, col = ref_pairs(ref_stats, with_columns, q.device)
    gcl = v["g_col_lse"] if with_columns else torch.empty(0, device=q.device)
    gcs = v["g_col_sum"] if with_columns else torch.empty(0, device=q.device)
    grads = K.contrastive_grads_triton(q, k, scale, targets, *row, *col,
                                       v["g_row_lse"], v["g_row_sum"], v["g_pos"], gcl, gcs, **kw)
    ref_grads = dense_grads(q, k, scale, targets, row, col, v, with_columns)
    return stats, ref_stats, grads, ref_grads


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------


def _cases():
    cases = []
    for i, shape in enumerate(SHAPES):
        for j, dtype in enumerate(DTYPES):
            for wc in (False, True):
                # full dtype x columns cross product on half the shapes, fp32 + one other on the rest
                if i % 2 == 1 and dtype != torch.float32 and (i + j + wc) % 2:
                    continue
                cases.append(pytest.param(shape, dtype, wc,
                                          id=f"{shape[0]}x{shape[1]}x{shape[2]}-{str(dtype)[6:]}-"
                                             f"{'cols' if wc else 'rows'}"))
    return cases


@pytest.mark.parametrize("shape,dtype,with_columns", _cases())
def test_stats_and_grads_match_reference(shape, dtype, with_columns):
    N, M, D = shape
    q, k, scale, targets, v = make_inputs(N, M, D, dtype, seed=N * 1000 + M + D)
    stats, ref_stats, grads, ref_grads = run_both(q, k, scale, targets, v, with_columns)
    check_stats(stats, ref_stats, q, k, scale, with_columns)
    check_grads(grads, ref_grads, q, k, scale, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(dtype):
    N, M, D = 97, 130, 40
    q0, k0, scale, t0, v = make_inputs(2 * N, M, 2 * D, dtype, seed=3)
    q = q0[::2, ::2]  # both strides != natural
    k = k0[:, :D].t().contiguous().t()  # column-major view: stride (1, M)
    targets = torch.randint(0, M, (2 * N,), generator=torch.Generator().manual_seed(4)).to(DEVICE)[::2]
    assert not q.is_contiguous() and not k.is_contiguous() and not targets.is_contiguous()
    v = {n: (t[:N] if "row" in n or n == "g_pos" else t) for n, t in v.items()}
    for wc in (False, True):
        stats, ref_stats, grads, ref_grads = run_both(q, k, scale, targets, v, wc)
        check_stats(stats, ref_stats, q, k, scale, wc, name="strided")
        check_grads(grads, ref_grads, q, k, scale, dtype, name="strided")


def test_scale_100_unnormalised_features():
    """Logits in the thousands: finite, and no worse than twice eager fp32."""
    N, M, D = 97, 130, 64
    q, k, scale, targets, v = make_inputs(N, M, D, torch.float32, seed=5, scale=100.0,
                                          magnitude=3.0)
    stats, ref_stats, grads, ref_grads = run_both(q, k, scale, targets, v, True)
    eager_stats = dense_stats(q, k, scale, targets, True, dtype=torch.float32)
    for o, r, e in zip(stats, ref_stats, eager_stats):
        assert torch.isfinite(o).all()
        err = (o.double() - r).abs().max().item()
        eerr = (e.double() - r).abs().max().item()
        assert err <= 2 * eerr + 1e-5 * r.abs().max().item(), (err, eerr)
    row, col = ref_pairs(ref_stats)
    eager_grads = dense_grads(q, k, scale, targets, row, col, v, True, dtype=torch.float32)
    # dscale is one number whose error is dominated by a few rounded logits
    # (exp amplifies their ~1e-3 absolute error): one sample, so allow 4x there
    for name, factor, o, r, e in zip(("dq", "dk", "dscale"), (2, 2, 4), grads, ref_grads[:3],
                                     eager_grads[:3]):
        assert torch.isfinite(o).all()
        err = (o.double() - r).abs().max().item()
        eerr = (e.double() - r).abs().max().item()
        assert err <= factor * eerr + 1e-5 * r.abs().max().item(), (name, err, eerr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_propagates(dtype):
    N, M, D = 97, 130, 33
    q, k, scale, targets, v = make_inputs(N, M, D, dtype, seed=6)
    qn = q.clone()
    qn[3, 5] = float("nan")
    stats = K.contrastive_stats_triton(qn, k, scale, targets, True)
    row_lse, col_lse = stats[0], stats[4]
    assert torch.isnan(row_lse[3])
    assert torch.isfinite(torch.cat([row_lse[:3], row_lse[4:]])).all()
    assert torch.isnan(col_lse).all()  # every column sees the NaN row
    kn = k.clone()
    kn[11, 0] = float("nan")
    stats = K.contrastive_stats_triton(q, kn, scale, targets, True)
    assert torch.isnan(stats[0]).all()
    assert torch.isnan(stats[4][11])
    assert torch.isfinite(torch.cat([stats[4][:11], stats[4][12:]])).all()
    # backward: a NaN row of q poisons its dq row, every dk row and dscale
    ref = dense_stats(q, k, scale, targets, True)
    dq, dk, ds = K.contrastive_grads_triton(qn, k, scale, targets, *ref_pairs(ref)[0], *ref_pairs(ref)[1],
                                            v["g_row_lse"], v["g_row_sum"], v["g_pos"],
                                            v["g_col_lse"], v["g_col_sum"])
    assert torch.isnan(dq[3]).all()
    assert torch.isnan(dk).any(dim=1).all()
    assert torch.isnan(ds)


@pytest.mark.parametrize("with_columns", [False, True])
def test_backward_splits_the_features_across_programs(with_columns):
    """D = 200 with 16-row tiles: 4 feature chunks of 64 (the last ragged), each program
    recomputing its logits; the result equals the reference and does not depend on the tiles."""
    N, M, D = 97, 130, 200
    q, k, scale, targets, v = make_inputs(N, M, D, torch.float32, seed=7)
    cfg = K.TileConfig(16, 16, 16, 1, 1)
    assert K.grad_block_d(D, cfg) < D
    stats, ref_stats, grads, ref_grads = run_both(q, k, scale, targets, v, with_columns, config=cfg)
    check_grads(grads, ref_grads, q, k, scale, torch.float32, name="feature chunks")
    whole = run_both(q, k, scale, targets, v, with_columns)[2]
    for a, b in zip(grads, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_grad_feature_chunks_are_powers_of_two():
    for dt in DTYPES:
        for prec in K.input_precisions(dt):
            for D in (1, 16, 33, 64, 88, 256, 1536):
                for c in K.candidate_configs(dt, D, prec):
                    bd = K.grad_block_d(D, c)
                    assert bd >= 16 and bd & (bd - 1) == 0 and bd <= 128


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_small_tiles_many_programs(dtype):
    """16x16 tiles: 7 row programs x 9 column blocks, so the column merge runs
    under the lock from many programs with staggered starts, and the backward
    sums dscale over many per-block shares."""
    N, M, D = 97, 130, 40
    q, k, scale, targets, v = make_inputs(N, M, D, dtype, seed=8)
    cfg = K.TileConfig(16, 16, 16, 1, 1)
    stats, ref_stats, grads, ref_grads = run_both(q, k, scale, targets, v, True, config=cfg)
    check_stats(stats, ref_stats, q, k, scale, True, name="16x16")
    check_grads(grads, ref_grads, q, k, scale, dtype, name="16x16")


@pytest.mark.parametrize("col_splits", [1, 3, 9])
@pytest.mark.parametrize("with_columns", [False, True])
def test_stats_with_the_columns_split_across_programs(col_splits, with_columns):
    """Each block of rows shared by 1, 3 or 9 programs (9 = one 16-column block each, the last
    one ragged): the per-split row statistics merge to the reference's."""
    N, M, D = 97, 130, 40
    q, k, scale, targets, _ = make_inputs(N, M, D, torch.float32, seed=11)
    cfg = K.TileConfig(16, 16, 16, 1, 1)
    stats = K.contrastive_stats_triton(q, k, scale, targets, with_columns, config=cfg,
                                       col_splits=col_splits)
    check_stats(stats, dense_stats(q, k, scale, targets, with_columns), q, k, scale, with_columns,
                name=f"{col_splits} splits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_pass_forward_matches_reference(dtype):
    """Option contrastive.forward = "two_pass": column statistics from a rows-only launch on (k, q)."""
    N, M, D = 97, 130, 40
    q, k, scale, targets, _ = make_inputs(N, M, D, dtype, seed=12)
    with tuning.scope():
        tuning.set_option("contrastive.forward", "two_pass")
        assert K.forward_mode() == "two_pass"
        stats = K.contrastive_stats_triton(q, k, scale, targets, True, config=K.TileConfig(16, 16, 16, 1, 1))
        check_stats(stats, dense_stats(q, k, scale, targets, True), q, k, scale, True, name="two pass")
        with pytest.raises(ValueError, match="contrastive.forward"):
            tuning.set_option("contrastive.forward", "fastest")
    assert K.forward_mode() == "one_pass"


def test_tuning_override_picks_the_tiles():
    """A tuning override is used when no config is passed; an explicit config still wins."""
    N, M, D = 29, 40, 24
    q, k, scale, targets, _ = make_inputs(N, M, D, torch.float32, seed=13)
    prec = K.input_precision(torch.float32)
    small = K.TileConfig(16, 16, 16, 1, 1)
    assert K.resolve_config(torch.float32, D, prec, None, "stats") == K.heuristic_config(torch.float32, D, prec)
    with tuning.scope():
        tuning.set_config("contrastive", "stats", small, dtype=torch.float32, dim=D)
        tuning.set_config("contrastive", "grad", small._asdict(), dtype="float32")
        assert K.resolve_config(torch.float32, D, prec, None, "stats") == small
        assert K.resolve_config(torch.float32, D, prec, None, "grad") == small
        assert K.resolve_config(torch.bfloat16, D, "tf32", None, "stats") == K.heuristic_config(
            torch.bfloat16, D, "tf32")
        explicit = K.TileConfig(32, 32, 16, 2, 1)
        assert K.resolve_config(torch.float32, D, prec, explicit, "stats") == explicit
        stats = K.contrastive_stats_triton(q, k, scale, targets, True)
        check_stats(stats, dense_stats(q, k, scale, targets, True), q, k, scale, True, name="tuned")
        # the autotuner never runs under the interpreter: the heuristic stands in for it
        tuning.set_option("contrastive.autotune", True)
        assert K.resolve_config(torch.bfloat16, D, "tf32", None, "stats") == K.heuristic_config(
            torch.bfloat16, D, "tf32")
    assert K.resolve_config(torch.float32, D, prec, None, "stats") == K.heuristic_config(torch.float32, D, prec)
    assert {"contrastive/stats", "contrastive/grad"} <= set(tuning.kinds())
    assert tuning.kinds()["contrastive/stats"]["keys"] == ("dtype", "dim", "input_precision")
    assert tuning.options()["contrastive.autotune"]["default"] is False


def test_cols_per_split_covers_every_column():
    for n, m, splits in [(4096, 4096, None), (97, 130, 3), (1, 1, 8), (5, 1000, 1000)]:
        cps = K.cols_per_split(n, m, 16, 64, torch.device("cpu"), splits)
        assert cps % 64 == 0 and cps > 0
        n_splits = -(-m // cps)
        assert (n_splits - 1) * cps < m <= n_splits * cps


def test_pos_is_bitwise_the_row_max_when_the_target_wins():
    N = M = 97
    D = 64
    g = torch.Generator().manual_seed(9)
    x = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1)
    q = x.to(DEVICE)
    k = (x + 0.05 * torch.randn(N, D, generator=g)).to(DEVICE)
    targets = torch.arange(N, device=DEVICE)
    targets[::5] = (targets[::5] + 1) % N  # some rows point at a wrong column
    scale = torch.tensor(20.0, device=DEVICE)
    row_lse, row_max, _, pos, col_lse, col_max, _ = K.contrastive_stats_triton(q, k, scale, targets, True)
    L = scale.double() * (q.double() @ k.double().T)
    wins = L.argmax(1) == targets
    assert wins.any() and (~wins).any()
    assert torch.equal(pos[wins], row_max[wins])
    assert (pos[~wins] < row_max[~wins]).all()


def test_empty_and_single():
    q, k, scale, targets, v = make_inputs(1, 1, 1, torch.float32, seed=10)
    out = K.contrastive_stats_triton(q, k, scale, targets, True)
    L = float(scale) * q[0, 0].double() * k[0, 0].double()
    # one logit: it is the max, its log-sum and sum relative to the max are 0
    for i, want in enumerate((0.0, L, 0.0, L, 0.0, L, 0.0)):
        assert abs(out[i].item() - want) <= 1e-5 * max(1.0, abs(want))
    e = torch.empty(0, 4, device=DEVICE)
    out = K.contrastive_stats_triton(e, torch.randn(3, 4, device=DEVICE), scale,
                                     torch.empty(0, dtype=torch.long, device=DEVICE), False)
    assert all(o.shape == (0,) for o in out)


def test_expanded_and_strided_gradient_vectors():
    """Autograd hands over expanded (stride 0) and strided incoming gradients."""
    N, M, D = 29, 87, 24
    q, k, scale, targets, v = make_inputs(N, M, D, torch.float32, seed=11)
    ref_stats = dense_stats(q, k, scale, targets, True)
    row, col = ref_pairs(ref_stats)
    v = dict(v)
    v["g_row_lse"] = torch.full((), 0.5, device=DEVICE).expand(N)
    v["g_row_sum"] = torch.randn(2 * N, device=DEVICE)[::2]
    v["g_col_sum"] = torch.full((1,), -0.25, device=DEVICE).expand(M)
    got = K.contrastive_grads_triton(q, k, scale, targets, *row, *col, v["g_row_lse"],
                                     v["g_row_sum"], v["g_pos"], v["g_col_lse"], v["g_col_sum"])
    ref = dense_grads(q, k, scale, targets, row, col, v, True)
    check_grads(got, ref, q, k, scale, torch.float32, name="expanded")


def test_fp16_small_gradients_keep_their_precision():
    """A mean-reduced loss over a big batch has softmax terms of G ~ 1/N^2 while
    dq, dk ~ 1/N: scale * G must not be stored in fp16's subnormal range (the
    launcher rescales it by a power of two and divides the fp32 results)."""
    N, M, D = 97, 130, 64
    g = torch.Generator().manual_seed(12)
    q = (1e-2 * torch.randn(N, D, generator=g)).half().to(DEVICE)
    k = (1e2 * torch.randn(M, D, generator=g)).half().to(DEVICE)
    scale = torch.tensor(0.1, device=DEVICE)  # logits O(1): spread-out softmax
    targets = torch.randint(0, M, (N,), generator=g).to(DEVICE)
    zeros_n, zeros_m = torch.zeros(N, device=DEVICE), torch.zeros(M, device=DEVICE)
    v = {"g_row_lse": (1e-4 * torch.rand(N, generator=g)).to(DEVICE), "g_row_sum": zeros_n,
         "g_pos": zeros_n, "g_col_lse": (1e-4 * torch.rand(M, generator=g)).to(DEVICE),
         "g_col_sum": zeros_m}
    ref_stats = dense_stats(q, k, scale, targets, True)
    row, col = ref_pairs(ref_stats)
    dq, dk, ds = K.contrastive_grads_triton(q, k, scale, targets, *row, *col, v["g_row_lse"],
                                            v["g_row_sum"], v["g_pos"], v["g_col_lse"], v["g_col_sum"])
    rdq, rdk, rds, G = dense_grads(q, k, scale, targets, row, col, v, True)
    s = float(scale)
    assert (s * G).abs().max() < 6e-5  # every stored element would be subnormal in fp16
    assert rdq.abs().max() > 1e-4  # while dq is a normal fp16 number
    for got, ref, mag in ((dq, rdq, s * (G.abs() @ k.double().abs()).max().item()),
                          (dk, rdk, s * (G.abs().T @ q.double().abs()).max().item())):
        err = (got.double() - ref).abs().max().item()
        assert err <= 5e-3 * mag + 1e-7, (err, mag)
