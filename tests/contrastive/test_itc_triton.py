"""The itc Triton kernels against the float64 reference (autograd of itc_rows_reference).

Without a GPU the kernels run through Triton's interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1 before anything imports triton); with a GPU the same tests run on CUDA
tensors. Shapes stay small because the interpreter is slow.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import mmkernels.contrastive.itc.ops  # noqa: E402, F401  (registers the ops)
from mmkernels import tuning  # noqa: E402
from mmkernels.contrastive.itc import kernels as IK  # noqa: E402
from mmkernels.contrastive.itc import reference as R  # noqa: E402
from mmkernels.contrastive.kernels import TileConfig, input_precision  # noqa: E402
from mmkernels.testing.numerics import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    # the interpreter evaluates kernels with numpy: inf/nan arithmetic and uint32 wrap warnings,
    # and Triton 3.6's int() of 1-element arrays (mmkernels._triton replaces it on numpy >= 2.3)
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]
SMALL = TileConfig(16, 16, 16, 1, 1)


# ---------------------------------------------------------------------------
# inputs and the float64 truth
# ---------------------------------------------------------------------------


def _unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


def make_case(N, M, Q, P, D, dtype, *, seed=0, teacher=None, ids="diagonal", scale=10.0,
              tscale=7.0):
    """Unit token features in ``dtype`` (``q [N, Q, D]``, ``k [M, P, D]``), ids, scales and a
    non-uniform incoming gradient ``g``. ``teacher``: None, or ``(Q', P', D')`` for ``tq`` and
    ``tk`` (``P'`` None: ``tk`` None, the teacher uses ``k``). ``ids``: ``"diagonal"`` (row i's
    positive is key ``i % M``), ``"groups"`` (ids in 0..3, several positives per row)."""
    gen = torch.Generator().manual_seed(seed)
    q = _unit(torch.randn(N, Q, D, generator=gen, dtype=torch.float64))
    k = _unit(torch.randn(M, P, D, generator=gen, dtype=torch.float64))
    if ids == "diagonal":
        row_ids, col_ids = torch.arange(N) % M, torch.arange(M)
    else:
        row_ids = torch.randint(0, 4, (N,), generator=gen)
        col_ids = torch.randint(0, 4, (M,), generator=gen)
        col_ids[:4] = torch.arange(4)[: min(4, M)]  # every id has a key
    tq = tk = None
    if teacher is not None:
        tQ, tP, tD = teacher
        tq = _unit(torch.randn(N, tQ, tD, generator=gen, dtype=torch.float64)).to(DEVICE, dtype)
        if tP is not None:
            tk = _unit(torch.randn(M, tP, tD, generator=gen, dtype=torch.float64)).to(DEVICE, dtype)
    g = (torch.rand(N, generator=gen, dtype=torch.float64) * 2.0 - 0.5).float()
    f32 = dict(dtype=torch.float32, device=DEVICE)
    return dict(q=q.to(dtype).to(DEVICE), k=k.to(dtype).to(DEVICE), kq=None, tq=tq, tk=tk,
                scale=torch.tensor(scale, **f32), tscale=torch.tensor(tscale, **f32),
                row_ids=row_ids.to(DEVICE), col_ids=col_ids.to(DEVICE), g=g.to(DEVICE))


def _d(t):
    return None if t is None else t.detach().double().cpu()


def reference(c, alpha=0.0, eps=0.0):
    """float64 ``{loss, lse, tlse, count, dq, dk, dscale}`` by autograd of the reference, and
    the magnitudes the errors scale with (logits for the statistics, the largest entry for
    dq / dk, ``sum |g| max |S|`` for dscale)."""
    q = _d(c["q"]).requires_grad_()
    k = _d(c["k"]).requires_grad_()
    s = _d(c["scale"]).requires_grad_()
    rid, cid = c["row_ids"].cpu(), c["col_ids"].cpu()
    ts = _d(c["tscale"])
    keys = k if c["kq"] is None else torch.cat([k, _d(c["kq"]).reshape(-1, *k.shape[1:])])
    loss = R.itc_rows_reference(q, keys, s, rid, cid, teacher_q=_d(c["tq"]), teacher_k=_d(c["tk"]),
                                teacher_scale=ts, alpha=alpha, label_smoothing=eps)
    g = _d(c["g"])
    dq, dk, ds = torch.autograd.grad((loss * g).sum(), (q, k, s))
    with torch.no_grad():
        S = R.similarity_reference(q, keys)
        lse = torch.logsumexp(s * S, 1)
        count = R.positives(rid, cid).double().sum(1)
        tlse = torch.zeros_like(lse)
        tmag = 0.0
        if alpha != 0.0:
            TS = R.similarity_reference(_d(c["tq"]), keys if c["tk"] is None else _d(c["tk"]))
            tlse = torch.logsumexp(ts * TS, 1)
            tmag = (ts * TS).abs().max().item()
        lmag = 1.0 + (s * S).abs().max().item() + tmag
        tiny = 1e-30
        mags = dict(loss=lmag, lse=lmag, tlse=lmag, count=1.0,
                    dq=dq.nan_to_num().abs().max().item() + tiny,
                    dk=dk.nan_to_num().abs().max().item() + tiny,
                    dscale=2.0 * g.abs().sum().item() * S.abs().max().item() + tiny)
    return dict(loss=loss.detach(), lse=lse, tlse=tlse, count=count, dq=dq, dk=dk, dscale=ds), mags


def fwd_tol(dtype):
    """The forward's tolerance row: products of 16-bit inputs are exact in fp32; fp32 inputs
    may run on tf32 tensor cores (GPU, allow_tf32)."""
    if dtype == torch.float32 and input_precision(torch.float32) == "tf32":
        return "tf32"
    return torch.float32


def grad_tol(dtype):
    """dq and dk take ``scale * dL`` rounded to the input dtype for the tensor cores."""
    return fwd_tol(dtype) if dtype == torch.float32 else dtype


def check(got, ref, mags, dtype, name=""):
    for n, o in got.items():
        r = ref[n]
        assert o.shape == r.shape, (name, n, o.shape, r.shape)
        tol = grad_tol(dtype) if n in ("dq", "dk") else fwd_tol(dtype)
        assert_close(o.detach().double().cpu() / mags[n], r / mags[n], tol, name=f"{name} {n}")


def run_op(c, alpha=0.0, eps=0.0, need_dk=True):
    """The registered op with autograd: ``(loss * g).sum()`` backward through
    ``torch.ops.mmkernels.itc_rows(..., "triton")``; every output and gradient."""
    q = c["q"].detach().clone().requires_grad_()
    k = c["k"].detach().clone().requires_grad_(need_dk)
    s = c["scale"].detach().clone().requires_grad_()
    loss, lse, tlse, count = torch.ops.mmkernels.itc_rows(
        q, k, c["kq"], c["tq"], c["tk"], s, c["tscale"], c["row_ids"], c["col_ids"], alpha, eps,
        "triton")
    (loss * c["g"]).sum().backward()
    assert q.grad.dtype == q.dtype and s.grad.dtype == torch.float32 and s.grad.dim() == 0
    out = dict(loss=loss, lse=lse, tlse=tlse, count=count, dq=q.grad, dscale=s.grad)
    if need_dk:
        assert k.grad.dtype == k.dtype
        out["dk"] = k.grad
    else:
        assert k.grad is None
    for n in ("loss", "lse", "tlse", "count"):
        assert out[n].dtype == torch.float32
    return out


def run_kernels(c, alpha=0.0, eps=0.0, need_dk=True, config=None):
    """The launchers called directly (``config`` forces the tiles)."""
    args = (c["q"], c["k"], c["kq"], c["tq"], c["tk"], c["scale"], c["tscale"], c["row_ids"],
            c["col_ids"])
    loss, lse, tlse, count = IK.itc_rows_triton(*args, alpha, eps, config=config)
    dq, dk, ds = IK.itc_grads_triton(c["g"], *args, lse, tlse, count, alpha, eps, need_dk,
                                     config=config)
    out = dict(loss=loss, lse=lse, tlse=tlse, count=count, dq=dq, dscale=ds)
    if need_dk:
        out["dk"] = dk
    else:
        assert dk.shape == (0,)
    return out


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------

# (name, N, M, Q, P, D, teacher, ids, alpha, eps)
CASES = [
    ("plain", 33, 40, 1, 1, 32, None, "diagonal", 0.0, 0.0),
    ("query-tokens", 20, 33, 4, 1, 24, None, "diagonal", 0.0, 0.0),
    ("key-tokens", 33, 20, 1, 3, 24, None, "diagonal", 0.0, 0.0),
    ("teacher-0.4-k", 20, 29, 2, 1, 24, (2, None, 24), "diagonal", 0.4, 0.0),
    ("teacher-1.0-tk", 20, 29, 3, 2, 24, (2, 3, 40), "groups", 1.0, 0.0),
    ("groups", 33, 21, 1, 1, 16, None, "groups", 0.0, 0.0),
    ("smoothing", 20, 29, 2, 2, 16, (1, 2, 16), "groups", 0.3, 0.1),
    ("odd", 7, 13, 3, 1, 40, None, "diagonal", 0.0, 0.1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_op_matches_reference(case, dtype):
    name, N, M, Q, P, D, teacher, ids, alpha, eps = case
    c = make_case(N, M, Q, P, D, dtype, seed=sum(map(ord, name)), teacher=teacher, ids=ids)
    ref, mags = reference(c, alpha, eps)
    check(run_op(c, alpha, eps), ref, mags, dtype, name=name)


def test_fp16_and_two_dim_features():
    """fp16 (its products rescaled away from fp16's subnormals) with ``[N, D]`` features: the
    launchers take them as one token and return gradients of the inputs' shapes."""
    c = make_case(20, 29, 1, 1, 24, torch.float16, seed=3, ids="groups")
    ref, mags = reference(c)
    c2 = dict(c, q=c["q"][:, 0], k=c["k"][:, 0])
    got = run_kernels(c2)
    assert got["dq"].shape == (20, 24) and got["dk"].shape == (29, 24)
    got["dq"], got["dk"] = got["dq"][:, None], got["dk"][:, None]
    check(got, ref, mags, torch.float16, name="fp16 2-D")


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_need_dk_false(alpha):
    """Keys without a gradient (a queue): no dk launch, an empty dk; the rest unchanged."""
    c = make_case(20, 29, 2, 1, 24, torch.float32, seed=4, ids="groups",
                  teacher=(2, None, 24) if alpha else None)
    ref, mags = reference(c, alpha)
    got = run_op(c, alpha, need_dk=False)
    check(got, ref, mags, torch.float32, name="no dk")
    direct = run_kernels(c, alpha, need_dk=False)
    check(direct, ref, mags, torch.float32, name="no dk, direct")


def test_small_tiles_token_and_feature_chunks():
    """16-row tiles: 18 query tokens need two token chunks in the dq launch and D = 136 three
    feature chunks; the teacher's tokens are padded so that its products have 16 rows (2 to 16
    beside one query, 3 to 4 beside four keys); many row blocks and dscale shares."""
    cfg = TileConfig(16, 16, 64, 2, 1)
    c = make_case(9, 17, 18, 3, 136, torch.float32, seed=5, ids="groups", teacher=(2, 3, 24))
    assert IK.token_split(18, 16) == (1, 16, 2) and IK.token_split(3, 16) == (4, 4, 1)
    assert IK.teacher_chunk(1, 2, 16) == 16 and IK.teacher_chunk(4, 3, 16) == 4
    assert -(-136 // IK.grads_block_d(136, cfg, torch.float32, input_precision(torch.float32))) == 3
    ref, mags = reference(c, 0.4, 0.1)
    check(run_kernels(c, 0.4, 0.1, config=cfg), ref, mags, torch.float32, name="16x16")


def test_non_contiguous_inputs():
    N, M, Q, P, D = 13, 21, 3, 2, 24
    c = make_case(N, M, 2 * Q, P, 2 * D, torch.float32, seed=6, ids="groups")
    c["q"] = c["q"][:, ::2, ::2]  # every stride unnatural
    c["k"] = c["k"][:, :, :D].permute(2, 1, 0).contiguous().permute(2, 1, 0)  # feature-major
    ids = torch.randint(0, 4, (2 * N,), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    c["row_ids"] = ids[::2]
    c["g"] = c["g"].expand(2, N)[0]
    assert not (c["q"].is_contiguous() or c["k"].is_contiguous() or c["row_ids"].is_contiguous())
    ref, mags = reference(c)
    check(run_kernels(c), ref, mags, torch.float32, name="strided")
    ones = dict(c, g=torch.ones((), device=DEVICE).expand(N))  # as autograd hands over for .sum()
    ref, mags = reference(ones)
    check(run_kernels(ones), ref, mags, torch.float32, name="expanded g")


def test_ties_route_to_the_first_pair():
    """Exact ties in the max over token pairs (features of halves, so every product is exact in
    fp32 and float64): the gradient goes to the first maximal ``(a, b)`` in ``a * P + b`` order,
    as torch.max; one query token is an exact copy of another, so every tie of its pairs goes
    to the earlier token."""
    N, M, Q, P, D = 9, 11, 3, 2, 4
    gen = torch.Generator().manual_seed(8)
    q = torch.randint(-2, 3, (N, Q, D), generator=gen).double() / 2
    k = torch.randint(-2, 3, (M, P, D), generator=gen).double() / 2
    q[:, 2] = q[:, 0]  # token 2 duplicates token 0: it never gets a gradient
    c = make_case(N, M, Q, P, D, torch.float32, seed=8, ids="groups")
    c["q"], c["k"] = q.float().to(DEVICE), k.float().to(DEVICE)
    prod = torch.einsum("iad,jbd->ijab", q, k).reshape(N, M, Q * P)
    n_ties = ((prod == prod.max(-1, keepdim=True).values).sum(-1) > 1).sum().item()
    assert n_ties > N * M // 4  # many ties, across both token axes
    ref, mags = reference(c, 0.0, 0.1)
    assert (ref["dq"][:, 2] == 0).all() and ref["dq"][:, 0].abs().sum() > 0
    got = run_op(c, 0.0, 0.1)
    assert (got["dq"][:, 2] == 0).all()
    check(got, ref, mags, torch.float32, name="ties")
    check(run_kernels(c, 0.0, 0.1, config=SMALL), ref, mags, torch.float32, name="ties 16x16")


def test_rows_without_positives_and_all_positive_rows():
    """Every key has id 0: rows with id 0 are all positive (finite, as the reference), rows
    with id 1 have no positive and give NaN (0 / 0) where the hard targets count, as the
    materialised code; with alpha = 1 the hard targets are left out and every row is finite."""
    c = make_case(12, 9, 2, 1, 16, torch.float32, seed=9, teacher=(2, None, 16))
    c["col_ids"] = torch.zeros(9, dtype=torch.int64, device=DEVICE)
    c["row_ids"] = (torch.arange(12, device=DEVICE) % 3 == 0).long()  # rows 0, 3, 6, 9: none
    ref, mags = reference(c, 0.4, 0.1)
    got = run_kernels(c, 0.4, 0.1)
    assert torch.isnan(got["loss"][::3]).all() and torch.isfinite(got["loss"][1::3]).all()
    assert (got["count"][1::3] == 9).all() and (got["count"][::3] == 0).all()
    check(got, ref, mags, torch.float32, name="no positives")
    ref, mags = reference(c, 1.0, 0.1)
    got = run_kernels(c, 1.0, 0.1)
    assert all(torch.isfinite(v).all() for v in got.values())
    check(got, ref, mags, torch.float32, name="alpha 1")


def test_tuning_override_picks_the_tiles():
    from mmkernels.contrastive.kernels import resolve_config
    prec = input_precision(torch.float32)
    assert resolve_config(torch.float32, 24, prec, None, "itc_grads",
                          heuristic=IK.grads_config) == IK.grads_config(torch.float32, 24, prec)
    with tuning.scope():
        tuning.set_config("contrastive", "itc_rows", SMALL, dtype=torch.float32)
        tuning.set_config("contrastive", "itc_grads", SMALL._asdict())
        tuning.set_config("contrastive", "itc_negatives", SMALL)
        for kind, h in (("itc_rows", IK.rows_config), ("itc_grads", IK.grads_config),
                        ("itc_negatives", IK.rows_config)):
            assert resolve_config(torch.float32, 24, prec, None, kind, heuristic=h) == SMALL
        c = make_case(20, 29, 2, 1, 24, torch.float32, seed=10)
        ref, mags = reference(c)
        check(run_op(c), ref, mags, torch.float32, name="tuned")
    assert {"contrastive/itc_rows", "contrastive/itc_grads", "contrastive/itc_negatives"} <= set(
        tuning.kinds())


def _with_queue(c, K, *, transposed, seed):
    """``c`` with a key queue of ``K`` rows continuing its keys (ids continuing the key ids:
    some shared with the rows, so the queue holds positives), as ALBEF keeps it when
    ``transposed`` (``queue.T`` of a ``[D, K]`` buffer) or as a plain ``[K, P, D]`` tensor."""
    gen = torch.Generator().manual_seed(seed)
    M, P, D = c["k"].shape
    kq = _unit(torch.randn(K, P, D, generator=gen, dtype=torch.float64)).to(c["k"].dtype)
    if transposed:
        kq = kq.permute(2, 1, 0).contiguous().permute(2, 1, 0)  # feature stride K
        if P == 1:
            kq = kq[:, 0]  # [K, D] = buffer.T, as the papers' queues
    qids = torch.randint(0, 6, (K,), generator=gen).to(DEVICE)
    return dict(c, kq=kq.to(DEVICE), col_ids=torch.cat([c["col_ids"], qids]))


@pytest.mark.parametrize("teacher", [False, True], ids=["hard", "teacher"])
@pytest.mark.parametrize("transposed", [True, False], ids=["buffer.T", "tokens"])
def test_key_queue_continues_the_keys(transposed, teacher):
    """A queue ``kq`` continues the keys without a copy: the statistics run over ``[k; kq]``
    (the teacher's keys too, with ``tk`` None), k gets its gradient and the queue none."""
    c = make_case(20, 13, 2 if not transposed else 1, 1 if transposed else 2, 24, torch.float32,
                  seed=12, ids="groups", teacher=(2, None, 24) if teacher else None)
    c = _with_queue(c, 37, transposed=transposed, seed=13)
    alpha, eps = (0.4, 0.1) if teacher else (0.0, 0.1)
    ref, mags = reference(c, alpha, eps)
    got = run_op(c, alpha, eps)
    assert got["dk"].shape == c["k"].shape
    check(got, ref, mags, torch.float32, name="queue")
    check(run_kernels(c, alpha, eps, config=SMALL), ref, mags, torch.float32, name="queue 16x16")


def test_key_queue_bf16_and_without_key_gradient():
    c = make_case(20, 13, 1, 1, 32, torch.bfloat16, seed=14, ids="groups", teacher=(1, None, 32))
    c = _with_queue(c, 21, transposed=True, seed=15)
    ref, mags = reference(c, 0.4, 0.0)
    del ref["dk"]
    check(run_op(c, 0.4, 0.0, need_dk=False), ref, mags, torch.bfloat16, name="queue bf16")


# ---------------------------------------------------------------------------
# negatives
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 2])
@pytest.mark.parametrize("tokens", [(1, 1), (3, 2)], ids=["plain", "tokens"])
def test_negatives_match_reference(seed, tokens):
    Q, P = tokens
    c = make_case(33, 40, Q, P, 24, torch.float32, seed=seed % 997, ids="groups")
    c["col_ids"][4:] = 7  # most keys share an id ...
    c["row_ids"][::5] = 7  # ... with rows 0, 5, ...: most of their keys are positives
    if seed % 2:  # and with odd seeds all of them: those rows have no negative
        c["col_ids"][:4] = 7
    seed_t = torch.tensor(seed, dtype=torch.int64, device=DEVICE)
    got = torch.ops.mmkernels.itc_negatives(c["q"], c["k"], c["scale"], c["row_ids"],
                                            c["col_ids"], seed_t, "triton")
    ref = R.negatives_reference(c["q"].cpu(), c["k"].cpu(), c["scale"].cpu(), c["row_ids"].cpu(),
                                c["col_ids"].cpu(), seed)
    assert got.dtype == torch.int64 and got.shape == (33,)
    assert torch.equal(got.cpu(), ref)
    pos = R.positives(c["row_ids"], c["col_ids"])
    all_pos = pos.all(1).cpu()
    assert (got.cpu()[all_pos] == -1).all() and (got.cpu()[~all_pos] >= 0).all()
    if seed % 2:
        assert all_pos.any()
    else:
        assert not all_pos.any()
    # never a positive
    picked = got.clamp_min(0)
    assert not pos.gather(1, picked[:, None])[~all_pos.to(DEVICE)].any()


def test_negatives_small_tiles_and_bf16():
    """16 x 16 tiles (the winner found in a later tile, ties to the first column) and bf16
    features (the reference on the same bf16 values in fp32)."""
    c = make_case(20, 45, 2, 1, 24, torch.float32, seed=11, ids="groups")
    seed = torch.tensor(77, dtype=torch.int64, device=DEVICE)
    got = IK.itc_negatives_triton(c["q"], c["k"], c["scale"], c["row_ids"], c["col_ids"], seed,
                                  config=SMALL)
    ref = R.negatives_reference(c["q"].cpu(), c["k"].cpu(), c["scale"].cpu(), c["row_ids"].cpu(),
                                c["col_ids"].cpu(), 77)
    assert torch.equal(got.cpu(), ref)
    qb, kb = c["q"].bfloat16(), c["k"].bfloat16()
    got = IK.itc_negatives_triton(qb, kb, c["scale"], c["row_ids"], c["col_ids"], seed)
    ref = R.negatives_reference(qb.float().cpu(), kb.float().cpu(), c["scale"].cpu(),
                                c["row_ids"].cpu(), c["col_ids"].cpu(), 77)
    assert torch.equal(got.cpu(), ref)


def test_unsupported_dtypes_are_refused():
    q = torch.randn(3, 1, 4, dtype=torch.float64, device=DEVICE)
    ids = torch.zeros(3, dtype=torch.long, device=DEVICE)
    s = torch.tensor(1.0, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float32, bfloat16, float16"):
        IK.itc_rows_triton(q, q, None, None, None, s, s, ids, ids, 0.0, 0.0)
    with pytest.raises(TypeError, match="share"):
        IK.itc_negatives_triton(q.float(), q.half(), s, ids, ids, ids[0])
    with pytest.raises(ValueError, match="teacher"):
        IK.itc_rows_triton(q.float(), q.float(), None, None, None, s, s, ids, ids, 0.5, 0.0)
