"""The itc C++ CPU kernels (``itc_rows``, ``itc_grads``, ``itc_negatives`` of mmkernels._C) through
the registered ops (``backend="cpu"``) against the float64 reference.

The reference is ``itc_rows_reference`` evaluated in float64 on the inputs rounded to their dtype
(lse and tlse from ``torch.logsumexp`` of the materialised logits, gradients from autograd);
"eager" is the same dense computation in float32 (in bfloat16 where the kernels multiply bf16
with bf16 GEMMs), whose error sets the allowance of the project's comparison rule
(``mmkernels.testing.numerics``). Negatives must equal ``negatives_reference`` exactly. A queue
``kq`` is checked against the reference on the keys ``torch.cat([k, kq])`` (dk: k's rows).
"""
import pytest
import torch

import mmkernels._backend
from mmkernels import _ext
import mmkernels.contrastive.itc.ops  # noqa: F401  (registers torch.ops.mmkernels.itc_*)
from mmkernels.contrastive.itc import reference as R
from mmkernels.testing.numerics import assert_close

from tests.helpers.backends import require_backend
from tests.helpers.rss import peak_extra

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCALE, TSCALE = 10.0, 7.0  # exactly representable in every dtype


@pytest.fixture(autouse=True)
def _kernels_built():
    require_backend("cpu", "itc", "itc_rows")


@pytest.fixture
def bf16_gemm(monkeypatch):
    """Set whether the cpu backend multiplies bf16 features with bf16 GEMMs (the ops read
    ``mmkernels._backend.cpu_bf16_gemm`` at each call)."""
    def set_(enabled: bool):
        monkeypatch.setattr(mmkernels._backend, "cpu_bf16_gemm", lambda: bool(enabled))
    return set_


def stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def features(n, t, d, gen, dtype):
    x = torch.nn.functional.normalize(torch.randn(n, t, d, generator=gen, dtype=torch.float64), dim=-1)
    return x.to(dtype)


def make_inputs(N, M, D, dtype, *, Q=1, P=1, teacher=None, n_ids=None, seed=0):
    """q [N, Q, D], k [M, P, D] (unit tokens), ids (n_ids distinct values, every row id among the
    column ids when n_ids <= M; None: row i's positive is column i), per-row weights g of both
    signs, and the teacher pair: None, "q" (tq only, tk = k) or (Q', P', D') for tq and tk.
    With a queue, M counts its columns too (col_ids has M entries): split k with split_queue."""
    gen = torch.Generator().manual_seed(seed)
    q = features(N, Q, D, gen, dtype)
    k = features(M, P, D, gen, dtype)
    if n_ids is None:
        row_ids, col_ids = torch.arange(N), torch.arange(M)
    else:
        row_ids = torch.randperm(N, generator=gen) % n_ids
        col_ids = torch.randperm(M, generator=gen) % n_ids
    g = torch.randn(N, generator=gen, dtype=torch.float64) + 0.5
    tq = tk = None
    if teacher == "q":
        tq = features(N, Q, D, gen, dtype)
    elif teacher is not None:
        tqt, tpt, td = teacher
        tq, tk = features(N, tqt, td, gen, dtype), features(M, tpt, td, gen, dtype)
    return q, k, tq, tk, row_ids, col_ids, g


def split_queue(k, K, strided=False):
    """(k[:M - K], kq) for the last K keys as the queue; strided: kq is the transposed view of a
    [D, K] buffer (ALBEF's layout, P = 1), equal in value."""
    k0, kq = k[:k.shape[0] - K], k[k.shape[0] - K:]
    if strided:
        assert kq.shape[1] == 1
        kq = kq[:, 0].T.contiguous().T.unsqueeze(1)
        assert not kq.is_contiguous() and kq.stride(0) == 1
    return k0, kq


def dense(q, k, tq, tk, row_ids, col_ids, g, alpha, eps, dtype, scale=SCALE, tscale=TSCALE,
          kq=None):
    """(loss, lse, tlse, count, dq, dk, dscale) of the materialised reference in `dtype`; with a
    queue the keys are torch.cat([k, kq]) and dk is k's share."""
    m0 = k.shape[0]
    if kq is not None:
        k = torch.cat([k, kq])
    q = q.detach().to(dtype).requires_grad_()
    k = k.detach().to(dtype).requires_grad_()
    s = torch.tensor(scale, dtype=dtype, requires_grad=True)
    ts = torch.tensor(tscale, dtype=dtype)
    tq = None if tq is None else tq.to(dtype)
    tk = None if tk is None else tk.to(dtype)
    loss = R.itc_rows_reference(q, k, s, row_ids, col_ids, teacher_q=tq, teacher_k=tk,
                                teacher_scale=ts, alpha=alpha, label_smoothing=eps)
    with torch.no_grad():
        lse = torch.logsumexp(s * R.similarity_reference(q, k), 1)
        tlse = (torch.logsumexp(ts * R.similarity_reference(tq, k if tk is None else tk), 1)
                if alpha != 0.0 else torch.zeros_like(lse))
        count = R.positives(row_ids, col_ids).sum(1).to(dtype)
    dq, dk, ds = torch.autograd.grad((loss * g.to(dtype)).sum(), (q, k, s))
    return loss.detach(), lse, tlse, count, dq, dk[:m0], ds


def run_op(q, k, tq, tk, row_ids, col_ids, g, alpha, eps, scale=SCALE, tscale=TSCALE, kq=None):
    """(loss, lse, tlse, count, dq, dk, dscale) of the registered ops (cpu backend), the
    gradients through their autograd (the queue kq gets none)."""
    sd = stats_dtype(q.dtype)
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    s = torch.tensor(scale, dtype=sd, requires_grad=True)
    ts = torch.tensor(tscale, dtype=sd)
    tq = tq if alpha != 0.0 else None
    loss, lse, tlse, count = torch.ops.mmkernels.itc_rows(q, k, kq, tq, tk, s, ts, row_ids,
                                                          col_ids, alpha, eps, "cpu")
    for x in (loss, lse, tlse, count):
        assert x.dtype == sd and x.shape == (q.shape[0],)
    dq, dk, ds = torch.autograd.grad((loss * g.to(sd)).sum(), (q, k, s))
    assert dq.dtype == q.dtype and dq.shape == q.shape
    assert dk.dtype == k.dtype and dk.shape == k.shape
    assert ds.dtype == sd and ds.dim() == 0
    return loss.detach(), lse, tlse, count, dq, dk, ds


NAMES = ["loss", "lse", "tlse", "count", "dq", "dk", "dscale"]


def run_and_compare(q, k, tq, tk, row_ids, col_ids, g, alpha=0.0, eps=0.0, *, native=False,
                    scale=SCALE, tscale=TSCALE, kq=None):
    """The ops against the float64 reference; returns their outputs. native: bf16 inputs are
    multiplied with bf16 GEMMs (the products rounded to bf16), so every output is held to bf16's
    tolerance and eager bf16's error."""
    dtype = q.dtype
    out = run_op(q, k, tq, tk, row_ids, col_ids, g, alpha, eps, scale, tscale, kq=kq)
    ref = dense(q, k, tq, tk, row_ids, col_ids, g, alpha, eps, torch.float64, scale, tscale, kq=kq)
    eager = dense(q, k, tq, tk, row_ids, col_ids, g, alpha, eps,
                  torch.bfloat16 if native else torch.float32, scale, tscale, kq=kq)
    kqs = "" if kq is None else f" kq{tuple(kq.shape)}"
    case = f"{dtype} q{tuple(q.shape)} k{tuple(k.shape)}{kqs} alpha={alpha} eps={eps}"
    for name, o, r, e in zip(NAMES, out, ref, eager):
        # dq, dk in the input dtype are held to its tolerance; the float32 statistics to float32's.
        tol = torch.bfloat16 if native else o.dtype
        assert_close(o, r, tol, eager=e.to(o.dtype), name=f"{name} {case}")
    return out


# ----------------------------------------------------------------------------- forward + backward

SHAPES = [  # N, M, D, Q, P
    (7, 13, 16, 1, 1),      # plain features
    (7, 13, 16, 4, 1),      # query tokens vs plain keys (BLIP-2 image -> text)
    (7, 13, 16, 1, 3),      # plain queries vs key tokens (BLIP-2 text -> image)
    (33, 97, 40, 1, 1),
    (33, 97, 40, 2, 3),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,M,D,Q,P", SHAPES)
def test_against_reference(N, M, D, Q, P, dtype, bf16_gemm):
    bf16_gemm(False)
    q, k, _, _, rid, cid, g = make_inputs(N, M, D, dtype, Q=Q, P=P, seed=N + M + Q + P)
    run_and_compare(q, k, None, None, rid, cid, g)


@pytest.mark.parametrize("N,M,D,Q,P", SHAPES)
def test_bf16_gemm(N, M, D, Q, P, bf16_gemm):
    """bf16 features multiplied with bf16 GEMMs (the products rounded as eager bf16 rounds them)."""
    bf16_gemm(True)
    q, k, tq, _, rid, cid, g = make_inputs(N, M, D, torch.bfloat16, Q=Q, P=P, teacher="q",
                                           n_ids=5, seed=N * M)
    run_and_compare(q, k, tq, None, rid, cid, g, alpha=0.4, eps=0.1, native=True)


@pytest.mark.parametrize("Q,TQ,P", [(1, 2, 3), (2, 1, 3), (3, 1, 1), (1, 1, 5)])
def test_teacher_queries_with_other_tokens(Q, TQ, P):
    """The teacher's keys are the keys (their query rows go into the same GEMMs as the queries')
    while its queries have another number of tokens."""
    q, keys, _, _, rid, cid, g = make_inputs(33, 97, 40, torch.float32, Q=Q, P=P, n_ids=6, seed=27)
    tq = features(33, TQ, 40, torch.Generator().manual_seed(28), torch.float32)
    k, kq = split_queue(keys, 30)
    run_and_compare(q, k, tq, None, rid, cid, g, alpha=0.4, eps=0.1, kq=kq)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha", [0.4, 1.0])
@pytest.mark.parametrize("teacher", ["q", (2, 1, 24), (1, 4, 24)],
                         ids=["tk=k", "tq,tk", "tq,tk tokens"])
@pytest.mark.parametrize("N,M,D,Q,P", [(7, 13, 16, 1, 1), (33, 97, 40, 2, 3), (33, 97, 40, 1, 3)])
def test_teacher(N, M, D, Q, P, teacher, alpha, dtype, bf16_gemm):
    """Momentum distillation: soft targets from the teacher's softmax (its keys k when tk is None),
    with positives by ids and label smoothing."""
    bf16_gemm(False)
    q, k, tq, tk, rid, cid, g = make_inputs(N, M, D, dtype, Q=Q, P=P, teacher=teacher, n_ids=6,
                                            seed=3)
    _, _, tlse, *_ = run_and_compare(q, k, tq, tk, rid, cid, g, alpha=alpha, eps=0.1)
    assert torch.isfinite(tlse).all() and (tlse != 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("N,M,D,Q,P", [(7, 13, 16, 1, 1), (33, 97, 40, 4, 1)])
def test_positives_by_ids(N, M, D, Q, P, eps, dtype):
    """Several positives per row (uniform hard targets over equal ids), with label smoothing."""
    q, k, _, _, rid, cid, g = make_inputs(N, M, D, dtype, Q=Q, P=P, n_ids=3, seed=5)
    _, _, _, count, *_ = run_and_compare(q, k, None, None, rid, cid, g, eps=eps)
    assert (count >= 2).all()


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_all_positive_rows(alpha):
    """Every key is a positive of every row: targets uniform over the keys."""
    q, k, tq, _, _, _, g = make_inputs(7, 13, 16, torch.float32, Q=2, P=3, teacher="q", seed=6)
    rid, cid = torch.full((7,), 4), torch.full((13,), 4)
    _, _, _, count, *_ = run_and_compare(q, k, tq, None, rid, cid, g, alpha=alpha, eps=0.1)
    assert (count == 13).all()


def test_rows_without_positives():
    """A row without a positive gets a NaN loss (and NaN gradients) when the hard targets count
    (alpha < 1), as the materialised code does. With alpha = 1 the op contract omits the positive
    term, so the row is an ordinary soft-target row: it equals the reference's row for any ids
    (where the reference's 0 * (pos / c) is finite)."""
    q, k, tq, _, _, cid, g = make_inputs(7, 13, 16, torch.float32, Q=2, P=1, teacher="q", seed=8)
    rid = torch.arange(7)
    rid[2] = 100  # no key has this id
    out = run_and_compare(q, k, tq, None, rid, cid, g, alpha=0.4)  # the NaN patterns must agree
    loss, count = out[0], out[3]
    assert torch.isnan(loss[2]) and count[2] == 0
    assert torch.isfinite(loss[torch.arange(7) != 2]).all()

    out = run_op(q, k, tq, None, rid, cid, g, 1.0, 0.1)
    ref = dense(q, k, tq, None, torch.arange(7), cid, g, 1.0, 0.1, torch.float64)
    eager = dense(q, k, tq, None, torch.arange(7), cid, g, 1.0, 0.1, torch.float32)
    for name, o, r, e in zip(NAMES, out, ref, eager):
        assert torch.isfinite(o).all()
        if name != "count":
            assert_close(o, r, o.dtype, eager=e.to(o.dtype), name=f"{name} alpha=1")
    assert out[3][2] == 0


@pytest.mark.parametrize("Q,P", [(1, 1), (20, 1), (2, 3)])
def test_nan_features_propagate(Q, P):
    """A NaN query token makes its row's similarities NaN (the max over token pairs propagates it,
    as torch.max does) and so its loss and its row of dq; the other rows stay finite in the
    forward. The NaN patterns agree with the reference's, but for dk with several key tokens:
    the op gives dk[j, b*] its share at the arg-max pair only (the contract), where the
    materialised autograd's dense GEMM also multiplies the NaN token by the zeros of the other
    pairs."""
    q, keys, tq, _, rid, cid, g = make_inputs(33, 97, 24, torch.float32, Q=Q, P=P, teacher="q",
                                              n_ids=9, seed=26)
    q[5, Q - 1, 3] = float("nan")
    k, kq = split_queue(keys, 40)
    out = run_op(q, k, tq, None, rid, cid, g, 0.4, 0.1, kq=kq)
    ref = dense(q, k, tq, None, rid, cid, g, 0.4, 0.1, torch.float64, kq=kq)
    eager = dense(q, k, tq, None, rid, cid, g, 0.4, 0.1, torch.float32, kq=kq)
    for name, o, r, e in zip(NAMES, out, ref, eager):
        if name == "dk" and P > 1:
            # the NaN row's arg-max pair is (Q - 1, 0): every key's token 0 gets NaN, no other
            assert torch.isnan(o[:, 0]).any(-1).all() and not torch.isnan(o[:, 1:]).any()
            continue
        assert_close(o, r, o.dtype, eager=e.to(o.dtype), name=f"{name} with a NaN token")
    loss = out[0]
    assert torch.isnan(loss[5]) and torch.isfinite(loss[torch.arange(33) != 5]).all()


@pytest.mark.parametrize("Q,P", [(4, 1), (1, 3), (3, 2), (32, 1), (1, 32)])
def test_ties_go_to_the_first_token_pair(Q, P):
    """Ties in the max over token pairs go to the first pair in a * P + b order, as torch.max
    resolves them. The features are multiples of 1/4 so that every product is exact in any
    summation order (float32 kernels and float64 BLAS alike: the ties are exact everywhere), and
    an exact duplicate of a query (key) token ties with the original for every key (query), so the
    duplicate gets no gradient."""
    gen = torch.Generator().manual_seed(9)
    N, M, D = 7, 37, 16
    q = torch.randint(-2, 3, (N, Q, D), generator=gen).float() / 4
    k = torch.randint(-2, 3, (M, P, D), generator=gen).float() / 4
    rid, cid = torch.arange(N), torch.arange(M)
    g = torch.randn(N, generator=gen, dtype=torch.float64) + 0.5
    if Q > 1:
        q[:, Q - 1] = q[:, 0]
    if P > 1:
        k[:, P - 1] = k[:, 0]
    ours = run_and_compare(q, k, None, None, rid, cid, g, scale=1.0)
    ref = dense(q, k, None, None, rid, cid, g, 0.0, 0.0, torch.float64, scale=1.0)
    for dq, dk in [(ours[4], ours[5]), (ref[4], ref[5])]:
        if Q > 1:
            assert (dq[:, Q - 1] == 0).all() and (dq[:, 0] != 0).any()
        if P > 1:
            assert (dk[:, P - 1] == 0).all() and (dk[:, 0] != 0).any()


@pytest.mark.parametrize("N,M,D,Q,P,teacher", [
    (1100, 4096, 4, 1, 1, None),        # several row chunks and column tiles (512 x 512)
    (70, 2048, 4, 4, 8, (2, 2, 4)),     # chunks of a few rows, tiles of token products
    (3, 20000, 8, 1, 1, "q"),           # few long rows: one tile per thread, merged online
    (2, 9000, 8, 2, 1, (1, 2, 8)),
])
def test_chunking_paths(N, M, D, Q, P, teacher):
    q, k, tq, tk, rid, cid, g = make_inputs(N, M, D, torch.float32, Q=Q, P=P, teacher=teacher,
                                            n_ids=max(1, M // 3), seed=11)
    run_and_compare(q, k, tq, tk, rid, cid, g, alpha=0.4 if teacher else 0.0, eps=0.1)


# ----------------------------------------------------------------------------- a queue segment

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("N,M,K,D,Q,P", [(7, 20, 13, 16, 1, 1), (33, 97, 41, 40, 2, 3)])
def test_queue(N, M, K, D, Q, P, alpha, dtype, bf16_gemm):
    """Keys [k; kq]: the same results as the reference on torch.cat([k, kq]) (the teacher's keys
    are the keys, queue included), with dk for k's rows only."""
    bf16_gemm(False)
    keys_q, keys, tq, _, rid, cid, g = make_inputs(N, M, D, dtype, Q=Q, P=P, teacher="q",
                                                   n_ids=6, seed=M + K)
    k, kq = split_queue(keys, K)
    out = run_and_compare(keys_q, k, tq if alpha else None, None, rid, cid, g, alpha=alpha,
                          eps=0.1, kq=kq)
    assert out[5].shape == k.shape


@pytest.mark.parametrize("Q,P", [(1, 1), (4, 1), (2, 3)])
def test_queue_bf16_gemm(Q, P, bf16_gemm):
    bf16_gemm(True)
    q, keys, tq, _, rid, cid, g = make_inputs(33, 97, 40, torch.bfloat16, Q=Q, P=P, teacher="q",
                                              n_ids=5, seed=40 + Q * P)
    k, kq = split_queue(keys, 50)
    run_and_compare(q, k, tq, None, rid, cid, g, alpha=0.4, eps=0.1, native=True, kq=kq)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Q", [1, 4])
def test_queue_as_transposed_buffer(Q, dtype, bf16_gemm):
    """ALBEF's queue is a [D, K] buffer: its transposed view goes in as it is (strides (1, K)) and
    gives what the contiguous queue gives; an empty k (all keys in the queue) works too."""
    bf16_gemm(dtype == torch.bfloat16)
    q, keys, tq, _, rid, cid, g = make_inputs(33, 150, 24, dtype, Q=Q, teacher="q", n_ids=7,
                                              seed=41 + Q)
    native = dtype == torch.bfloat16
    for m0 in [50, 0]:
        k, kq = split_queue(keys, 150 - m0, strided=True)
        out = run_and_compare(q, k, tq, None, rid, cid, g, alpha=0.4, eps=0.1, kq=kq, native=native)
        contiguous = run_op(q, k, tq, None, rid, cid, g, 0.4, 0.1, kq=kq.contiguous())
        for x, y in zip(out, contiguous):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        assert out[5].shape == (m0, 1, 24)


@pytest.mark.parametrize("N,M,K,D,Q,P,teacher", [
    (3, 5000, 3001, 40, 1, 1, "q"),    # a few rows: one tile per segment and thread
    (130, 5000, 3001, 8, 1, 1, "q"),   # several tiles per segment, of unequal widths
    (3, 5000, 3001, 40, 8, 4, "q"),    # token products: several tiles per segment
    (130, 5000, 3001, 8, 2, 1, None),
])
def test_queue_across_column_tiles(N, M, K, D, Q, P, teacher):
    """Long odd-sized segments cut into several column tiles, the row statistics merged online
    across them and the threads' partial results merged in order."""
    q, keys, tq, _, rid, cid, g = make_inputs(N, M + K, D, torch.float32, Q=Q, P=P,
                                              teacher=teacher, n_ids=(M + K) // 5, seed=N + Q)
    k, kq = split_queue(keys, K, strided=P == 1)
    alpha = 0.4 if teacher else 0.0
    run_and_compare(q, k, tq, None, rid, cid, g, alpha=alpha, eps=0.1, kq=kq)


def test_queue_results_are_deterministic():
    q, keys, tq, _, rid, cid, g = make_inputs(130, 8001, 8, torch.float32, teacher="q",
                                              n_ids=1000, seed=42)
    k, kq = split_queue(keys, 3001, strided=True)
    a = run_op(q, k, tq, None, rid, cid, g, 0.4, 0.1, kq=kq)
    b = run_op(q, k, tq, None, rid, cid, g, 0.4, 0.1, kq=kq)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------- many tokens

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Q,P", [(32, 1), (1, 32)])
def test_many_tokens(Q, P, dtype, bf16_gemm):
    """BLIP-2's shapes: 32 query tokens against plain keys, plain queries against 32 key tokens
    (the backward gathers and scatters at the arg-max pairs), with a queue and a teacher."""
    bf16_gemm(False)
    q, keys, tq, _, rid, cid, g = make_inputs(19, 300, 24, dtype, Q=Q, P=P, teacher="q", n_ids=9,
                                              seed=43 + Q)
    k, kq = split_queue(keys, 120)
    run_and_compare(q, k, tq, None, rid, cid, g, alpha=0.4, eps=0.1, kq=kq)


@pytest.mark.parametrize("Q,P", [(32, 1), (1, 32)])
def test_many_tokens_bf16_gemm(Q, P, bf16_gemm):
    bf16_gemm(True)
    q, k, _, _, rid, cid, g = make_inputs(19, 300, 24, torch.bfloat16, Q=Q, P=P, seed=44 + Q)
    run_and_compare(q, k, None, None, rid, cid, g, eps=0.1, native=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(dtype, bf16_gemm):
    bf16_gemm(False)
    N, M, D, Q, P = 33, 97, 40, 2, 3
    q, k, tq, tk, rid, cid, g = make_inputs(N, M, D, dtype, Q=Q, P=P, teacher=(3, 1, 8), n_ids=9,
                                            seed=12)
    q_nc = q.transpose(0, 2).contiguous().transpose(0, 2)  # [N, Q, D] with D outermost
    k_big = torch.randn(2 * M, P, D + 3).to(dtype)
    k_big[::2, :, 1:D + 1] = k
    k_nc = k_big[::2, :, 1:D + 1]                          # strided, offset slice
    tq_nc = torch.stack([tq, tq], 1)[:, 1]
    rid_nc = torch.stack([rid, rid], 1)[:, 0]
    assert not (q_nc.is_contiguous() or k_nc.is_contiguous() or tq_nc.is_contiguous()
                or rid_nc.is_contiguous())
    a = run_and_compare(q, k, tq, tk, rid, cid, g, alpha=0.4, eps=0.1)
    b = run_and_compare(q_nc, k_nc, tq_nc, tk, rid_nc, cid, g, alpha=0.4, eps=0.1)
    for x, y in zip(a, b):
        # Not bitwise: BLAS may take another path for differently aligned copies.
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("Q,P,K", [(2, 3, 0), (1, 1, 40), (32, 1, 40), (1, 32, 0)])
def test_need_dk_false(Q, P, K):
    """Keys without gradient (a queue, a momentum encoder): dk is an empty [0] tensor and dq is
    unchanged; through autograd, k without requires_grad gets no dk."""
    q, keys, tq, _, rid, cid, g = make_inputs(33, 97, 40, torch.float32, Q=Q, P=P, teacher="q",
                                              n_ids=9, seed=13)
    k, kq = split_queue(keys, K, strided=P == 1) if K else (keys, None)
    s, ts = torch.tensor(SCALE), torch.tensor(TSCALE)
    args = (kq, tq, None, s, ts, rid, cid)
    loss, lse, tlse, count = torch.ops.mmkernels.itc_rows(q, k, *args, 0.4, 0.1, "cpu")
    gf = g.float()
    full = torch.ops.mmkernels.itc_grads(gf, q, k, *args, lse, tlse, count, 0.4, 0.1, True, "cpu")
    part = torch.ops.mmkernels.itc_grads(gf, q, k, *args, lse, tlse, count, 0.4, 0.1, False, "cpu")
    assert part[1].shape == (0,) and part[1].dtype == k.dtype
    assert torch.equal(part[0], full[0]) and torch.equal(part[2], full[2])

    qg = q.clone().requires_grad_()
    out = torch.ops.mmkernels.itc_rows(qg, k, *args, 0.4, 0.1, "cpu")[0]
    (dq,) = torch.autograd.grad((out * gf).sum(), (qg,))
    ref = dense(q, k, tq, None, rid, cid, g, 0.4, 0.1, torch.float64, kq=kq)
    assert_close(dq, ref[4], torch.float32, name="dq without dk")
    assert_close(full[1], ref[5], torch.float32, name="dk")


def test_float64_path():
    """float64 inputs are computed in float64: every output is float64 and matches tightly."""
    q, k, tq, tk, rid, cid, g = make_inputs(33, 97, 40, torch.float64, Q=2, P=3, teacher=(2, 2, 8),
                                            n_ids=9, seed=14)
    out = run_op(q, k, tq, tk, rid, cid, g, 0.4, 0.1)
    ref = dense(q, k, tq, tk, rid, cid, g, 0.4, 0.1, torch.float64)
    for name, o, r in zip(NAMES, out, ref):
        assert o.dtype == torch.float64
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10, msg=name)


def test_float64_queue():
    q, keys, tq, _, rid, cid, g = make_inputs(33, 97, 40, torch.float64, Q=2, P=3, teacher="q",
                                              n_ids=9, seed=24)
    k, kq = split_queue(keys, 41)
    out = run_op(q, k, tq, None, rid, cid, g, 0.4, 0.1, kq=kq)
    ref = dense(q, k, tq, None, rid, cid, g, 0.4, 0.1, torch.float64, kq=kq)
    for name, o, r in zip(NAMES, out, ref):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("alpha,eps", [(0.0, 0.0), (0.4, 0.1)])
def test_gradcheck_float64_queue(alpha, eps):
    """With a queue the teacher's keys are the keys, so with alpha > 0 the numerical gradient in
    k would include the teacher's dependence on k, which the op contract leaves out: k is then
    held fixed."""
    q, keys, tq, _, rid, cid, _ = make_inputs(3, 7, 4, torch.float64, Q=2, P=1, teacher="q",
                                              n_ids=2, seed=25)
    k, kq = split_queue(keys, 3, strided=True)
    ts = torch.tensor(TSCALE, dtype=torch.float64)
    tq = tq if alpha else None
    s = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    if alpha:
        args = (q.requires_grad_(), s)
        fn = lambda a, s: torch.ops.mmkernels.itc_rows(a, k, kq, tq, None, s, ts, rid, cid, alpha,
                                                       eps, "cpu")[0]
    else:
        args = (q.requires_grad_(), k.requires_grad_(), s)
        fn = lambda a, b, s: torch.ops.mmkernels.itc_rows(a, b, kq, tq, None, s, ts, rid, cid,
                                                          alpha, eps, "cpu")[0]
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("alpha,eps", [(0.0, 0.0), (0.4, 0.1)])
def test_gradcheck_float64(alpha, eps):
    q, k, tq, tk, rid, cid, _ = make_inputs(3, 5, 4, torch.float64, Q=2, P=2, teacher=(2, 1, 3),
                                            n_ids=2, seed=15)
    ts = torch.tensor(TSCALE, dtype=torch.float64)
    tq = tq if alpha else None
    args = (q.requires_grad_(), k.requires_grad_(),
            torch.tensor(2.3, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(
        lambda a, b, s: torch.ops.mmkernels.itc_rows(a, b, None, tq, tk, s, ts, rid, cid, alpha,
                                                     eps, "cpu")[0], args)


def test_opcheck():
    q, keys, tq, _, rid, cid, g = make_inputs(9, 13, 12, torch.float32, Q=2, P=3, teacher="q",
                                              n_ids=4, seed=16)
    k, kq = split_queue(keys, 5)
    s, ts = torch.tensor(SCALE), torch.tensor(TSCALE)
    torch.library.opcheck(torch.ops.mmkernels.itc_rows.default,
                          (q.requires_grad_(), k.requires_grad_(), kq, tq, None, s.requires_grad_(),
                           ts, rid, cid, 0.4, 0.1, "cpu"))
    loss, lse, tlse, count = torch.ops.mmkernels.itc_rows(q, k, kq, tq, None, s, ts, rid, cid, 0.4,
                                                          0.1, "cpu")
    torch.library.opcheck(torch.ops.mmkernels.itc_grads.default,
                          (g.float(), q.detach(), k.detach(), kq, tq, None, s.detach(), ts, rid,
                           cid, lse, tlse, count, 0.4, 0.1, True, "cpu"))
    torch.library.opcheck(torch.ops.mmkernels.itc_negatives.default,
                          (q.detach(), keys, s.detach(), rid, cid, torch.tensor(5), "cpu"))


# ----------------------------------------------------------------------------- hard negatives

def negatives(q, k, rid, cid, seed, scale=SCALE):
    s = torch.tensor(scale, dtype=stats_dtype(q.dtype))
    return torch.ops.mmkernels.itc_negatives(q, k, s, rid, cid, torch.tensor(seed), "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("N,M,D,Q,P", [(7, 13, 16, 1, 1), (33, 97, 40, 4, 1), (33, 97, 40, 2, 3),
                                       (70, 2048, 4, 4, 8)])
def test_negatives_equal_reference(N, M, D, Q, P, dtype):
    q, k, _, _, rid, cid, _ = make_inputs(N, M, D, dtype, Q=Q, P=P, n_ids=5, seed=17)
    for seed in [0, 1, 12345, 2 ** 31 - 2]:
        out = negatives(q, k, rid, cid, seed)
        ref = R.negatives_reference(q, k, torch.tensor(SCALE, dtype=stats_dtype(dtype)), rid, cid,
                                    torch.tensor(seed))
        assert out.dtype == torch.int64 and out.shape == (N,)
        assert torch.equal(out, ref), f"seed {seed}: {(out != ref).sum()} rows differ"
        assert (out >= 0).all() and (rid != cid[out]).all()  # every draw a negative


def test_negatives_noise_alone():
    """Identical keys: the logits of a row are equal, so the draw is decided by the Gumbel noise
    alone, which must be bitwise the reference's; different seeds give different draws."""
    q, k, _, _, rid, cid, _ = make_inputs(64, 257, 8, torch.float32, seed=18)
    k[:] = k[0]
    draws = []
    for seed in [3, 4]:
        out = negatives(q, k, rid, cid, seed)
        ref = R.negatives_reference(q, k, torch.tensor(SCALE), rid, cid, torch.tensor(seed))
        assert torch.equal(out, ref)
        draws.append(out)
    assert not torch.equal(draws[0], draws[1])
    assert len(torch.unique(draws[0])) > 32


def test_negatives_without_candidates():
    """-1 for a row whose every key is a positive; a row with one negative draws it; the others
    draw a negative."""
    q, k, _, _, _, _, _ = make_inputs(7, 13, 16, torch.float32, Q=2, P=2, seed=19)
    rid = torch.tensor([2, 3, 2, 0, 3, 2, 1])
    for cid, expect in [(torch.full((13,), 2), -1), (torch.full((13,), 2).index_fill(0, torch.tensor([5]), 3), 5)]:
        out = negatives(q, k, rid, cid, 7)
        ref = R.negatives_reference(q, k, torch.tensor(SCALE), rid, cid, torch.tensor(7))
        assert torch.equal(out, ref)
        assert (out[rid == 2] == expect).all()
        others = rid != 2
        assert (out[others] >= 0).all() and (cid[out[others]] != rid[others]).all()


def test_negatives_follow_softmax():
    """The draws follow softmax_j(L_ij) over the negatives: with a row whose logits favour one
    key strongly the draw is that key for most seeds."""
    q, k, _, _, rid, cid, _ = make_inputs(4, 9, 8, torch.float32, seed=20)
    k[6] = q[0]  # L_06 = 10, the others at most ~3: P(j = 6) > 0.99 for row 0
    hits = sum(int(negatives(q, k, rid, cid, seed)[0]) == 6 for seed in range(50))
    assert hits >= 45


def test_bad_inputs_raise():
    q, k, tq, _, rid, cid, _ = make_inputs(5, 6, 4, torch.float32, Q=2, teacher="q", seed=21)
    C = _ext.C
    s = torch.tensor(1.0)
    kq = torch.randn(3, 1, 4)
    cid9 = torch.arange(9)
    cases = [
        ("must be 3-D", (q[0], k, None, None, None, s, s, rid, cid, 0.0, 0.0)),
        ("feature dims differ", (q, k[..., :3], None, None, None, s, s, rid, cid, 0.0, 0.0)),
        ("same dtype", (q, k.half(), None, None, None, s, s, rid, cid, 0.0, 0.0)),
        ("unsupported dtype", (q.int(), k.int(), None, None, None, s, s, rid, cid, 0.0, 0.0)),
        ("row_ids must have shape", (q, k, None, None, None, s, s, rid[:3], cid, 0.0, 0.0)),
        ("col_ids must be an integer", (q, k, None, None, None, s, s, rid, cid.float(), 0.0, 0.0)),
        ("needs the teacher queries", (q, k, None, None, None, s, s, rid, cid, 0.4, 0.0)),
        ("rows of q and the keys", (q, k, None, tq[:3], None, s, s, rid, cid, 0.4, 0.0)),
        ("scale must have one element",
         (q, k, None, None, None, torch.ones(2), s, rid, cid, 0.0, 0.0)),
        ("col_ids must have shape \\[9\\]", (q, k, kq, None, None, s, s, rid, cid, 0.0, 0.0)),
        ("kq must have k's tokens", (q, k, kq[..., :3], None, None, s, s, rid, cid9, 0.0, 0.0)),
        ("kq must have k's tokens",
         (q, k, kq.expand(3, 2, 4), None, None, s, s, rid, cid9, 0.0, 0.0)),
        ("kq and k must have the same dtype",
         (q, k, kq.double(), None, None, s, s, rid, cid9, 0.0, 0.0)),
        ("tk must be None", (q, k, kq, tq, torch.randn(9, 1, 4), s, s, rid, cid9, 0.4, 0.0)),
    ]
    for message, args in cases:
        with pytest.raises(RuntimeError, match=message):
            C.itc_rows(*args)
    with pytest.raises(RuntimeError, match="seed must be"):
        C.itc_negatives(q, k, s, rid, cid, torch.tensor(1.5))
    with pytest.raises(RuntimeError, match="lse must have shape"):
        C.itc_grads(torch.ones(5), q, k, None, None, None, s, s, rid, cid, torch.ones(4),
                    torch.ones(5), torch.ones(5), 0.0, 0.0, True)


# ----------------------------------------------------------------------------- memory

_MEMORY_BODY = """
import torch
from mmkernels import _ext

def setup(b, k, d):
    torch.manual_seed(0)
    b, k, d = int(b), int(k), int(d)
    f = lambda *s: torch.nn.functional.normalize(torch.randn(*s), dim=-1)
    q, k_m, tq = f(b, 1, d), f(b, 1, d), f(b, 1, d)
    queue = torch.nn.functional.normalize(torch.randn(d, k), dim=0)  # [D, K], as ALBEF keeps it
    kq = queue.T.unsqueeze(1)                                         # [K, 1, D], strides (1, ., K)
    cid = torch.cat([torch.arange(b), torch.full((k,), -1)])
    return q, k_m, kq, tq, torch.arange(b), cid, torch.full((b,), 1.0 / b)

def run(state):
    q, k, kq, tq, rid, cid, g = state
    s = torch.tensor(1 / 0.07)
    loss, lse, tlse, count = _ext.C.itc_rows(q, k, kq, tq, None, s, s, rid, cid, 0.4, 0.0, False)
    dq, dk, ds = _ext.C.itc_grads(g, q, k, kq, tq, None, s, s, rid, cid, lse, tlse, count, 0.4,
                                  0.0, False, False)
    return float(loss.sum() + dq.sum())
"""


@pytest.mark.slow
def test_memory_albef_queue():
    """ALBEF's size (B = 64, a queue of K = 57,600 given as the transposed view of its [D, K]
    buffer, momentum distillation, no key gradient): the kernels' extra memory stays within 2% of
    what the materialised objective holds (about ten [B, B + K] float32 tensors), so the queue is
    never copied and no [B, M] buffer is allocated."""
    b, k, d = 64, 57600, 256
    out = peak_extra(_MEMORY_BODY, b, k, d)
    assert out["extra"] <= 0.02 * 10 * b * (b + k) * 4, f"used {out['extra'] / 2**20:.2f} MiB extra"
