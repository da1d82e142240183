"""The ALBEF / BLIP / BLIP-2 objectives through their public API on every CPU path (the C++
kernels, the Triton kernels under the interpreter, ``blockwise``, ``materialized``) against the
papers' code evaluated in float64: loss and every gradient, queues (empty too), ids with several
and with all positives, label smoothing, ties in the max over queries, fp32/bf16/fp16; the
hard-negative sampler (every draw a negative, the distribution by a chi-square test, the same
draws on every path); bad inputs; opcheck, ``torch.compile``, the memory bound."""
from __future__ import annotations

import math

import pytest
import torch

import mmkernels
from mmkernels import _ext
from mmkernels.contrastive.itc import ops
from mmkernels.contrastive.itc import reference as R
from mmkernels.testing.numerics import assert_close

from ..helpers.rss import peak_extra
from .cases import features, have_backend, leaf

PATHS = ["cpu", "triton", "blockwise", "materialized"]
SCALE = 1 / 0.07


def _have(path: str) -> bool:
    if path == "cpu":
        return _ext.available() and hasattr(_ext.C, "itc_rows")
    if path == "triton":
        if not have_backend("triton"):
            return False
        try:
            from mmkernels.contrastive.itc import kernels  # noqa: F401
        except ImportError:
            return False
        return True
    return True


def _ctx(path: str):
    if path in ("cpu", "triton", "reference"):
        if not _have(path):
            pytest.skip(f"backend {path} unavailable")
        return mmkernels.backend(path)
    return mmkernels.use_path(path)


def tokens(n: int, t: int, d: int, dtype=torch.float32, *, seed: int) -> torch.Tensor:
    """``[n, t, d]`` normalised token features."""
    return features(n * t, d, dtype, seed=seed).reshape(n, t, d)


def _compare(path, fn, ref_fn, inputs, grads_of, dtype=torch.float32, eager=False):
    """``fn(*leaves)`` on ``path`` against ``ref_fn`` on float64 copies: the loss and the
    gradients of the inputs at ``grads_of`` (indices) and of the scale (the last input)."""
    xs = [leaf(x) if i in grads_of else x for i, x in enumerate(inputs)]
    with _ctx(path):
        loss = fn(*xs)
    w = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape) if loss.dim() else 1.0
    (loss.float() * w).sum().backward()
    rs = [leaf(x.double()) if i in grads_of else (x.double() if x.is_floating_point() else x)
          for i, x in enumerate(inputs)]
    ref = ref_fn(*rs)
    (ref * (w.double() if torch.is_tensor(w) else w)).sum().backward()
    eager_out = None
    if eager:
        es = [leaf(x) if i in grads_of else x for i, x in enumerate(inputs)]
        eo = ref_fn(*es)
        (eo.float() * w).sum().backward()
        eager_out = (eo, [es[i].grad for i in grads_of])
    n = max(1, loss.numel())
    assert loss.dtype == (dtype if dtype != torch.float64 else torch.float64) or dtype != torch.float32
    assert_close(loss, ref, dtype, scale=n ** 0.5, name=f"{path} loss",
                 eager=None if eager_out is None else eager_out[0])
    for j, i in enumerate(grads_of):
        assert_close(xs[i].grad, rs[i].grad, dtype, scale=8.0, name=f"{path} grad {i}",
                     eager=None if eager_out is None else eager_out[1][j])


# ----------------------------------------------------------------------------- ALBEF / BLIP


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("queue", [0, 11])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_momentum_itc_equals_papers_code(path, queue, alpha):
    b, d = 7, 16
    ins = [features(b, d, seed=1), features(b, d, seed=2), features(b, d, seed=3),
           features(b, d, seed=4), features(queue, d, seed=5), features(queue, d, seed=6),
           torch.tensor(SCALE)]

    def ours(i, t, im, tm, iq, tq, s):
        return mmkernels.momentum_itc_loss(i, t, im, tm, s, alpha=alpha, image_queue=iq, text_queue=tq)

    def theirs(i, t, im, tm, iq, tq, s):
        return R.momentum_itc_reference(i, t, im, tm, iq, tq, 1 / s, alpha)

    _compare(path, ours, theirs, ins, grads_of=(0, 1, 6))


@pytest.mark.parametrize("path", PATHS)
def test_momentum_itc_with_ids_equals_blip_retrieval(path):
    """BLIP retrieval: targets uniform over equal ids across batch and queue (rows with one and
    with several positives)."""
    b, k, d = 8, 9, 16
    idx = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4])
    idx_queue = torch.tensor([5, 1, 7, 3, 9, 0, 4, 4, 6])
    ins = [features(b, d, seed=7), features(b, d, seed=8), features(b, d, seed=9),
           features(b, d, seed=10), features(k, d, seed=11), features(k, d, seed=12),
           torch.tensor(SCALE)]

    def ours(i, t, im, tm, iq, tq, s):
        return mmkernels.momentum_itc_loss(i, t, im, tm, s, alpha=0.4, image_queue=iq, text_queue=tq,
                                           idx=idx, idx_queue=idx_queue)

    def theirs(i, t, im, tm, iq, tq, s):
        return R.momentum_itc_reference(i, t, im, tm, iq, tq, 1 / s, 0.4, idx, idx_queue)

    _compare(path, ours, theirs, ins, grads_of=(0, 1, 6))


@pytest.mark.parametrize("path", PATHS)
def test_queue_as_strided_view_is_used_without_a_copy(path):
    """ALBEF keeps its queues as ``[D, K]`` buffers: ``queue.T`` goes in as it is, and the keys
    ``[feat_m; queue]`` are never concatenated (on the kernels' paths)."""
    b, k, d = 6, 13, 16
    iq_buf, tq_buf = features(k, d, seed=17).T.contiguous(), features(k, d, seed=18).T.contiguous()
    ins = [features(b, d, seed=1), features(b, d, seed=2), features(b, d, seed=3),
           features(b, d, seed=4), torch.tensor(SCALE)]

    def ours(i, t, im, tm, s):
        return mmkernels.momentum_itc_loss(i, t, im, tm, s, alpha=0.4, image_queue=iq_buf.T,
                                           text_queue=tq_buf.T)

    def theirs(i, t, im, tm, s):
        return R.momentum_itc_reference(i, t, im, tm, iq_buf.T.double(), tq_buf.T.double(), 1 / s, 0.4)

    _compare(path, ours, theirs, ins, grads_of=(0, 1, 4))


@pytest.mark.parametrize("path", PATHS)
def test_queue_updated_in_place_before_backward(path):
    """ALBEF and BLIP enqueue inside ``forward``, before ``backward()``: by default the loss keeps
    its own copy of the queues, so the gradients are those of the queues it was given; with
    ``queue_snapshot=False`` autograd refuses the overwritten queue (never a silent change)."""
    if not _have(path):
        pytest.skip(f"{path} unavailable")
    b, k, d = 6, 10, 16
    feats = [features(b, d, seed=s) for s in (31, 32, 33, 34)]
    grads = {}
    for mode in ("after", "before"):
        iq_buf, tq_buf = features(k, d, seed=35).T.contiguous(), features(k, d, seed=36).T.contiguous()
        i, t = leaf(feats[0]), leaf(feats[1])
        with mmkernels.use_path("kernel" if path in ("cpu", "triton") else path), \
                mmkernels.backend(path if path in ("cpu", "triton") else "auto"):
            loss = mmkernels.momentum_itc_loss(i, t, feats[2], feats[3], SCALE, alpha=0.4,
                                               image_queue=iq_buf.T, text_queue=tq_buf.T)
            if mode == "before":                     # ALBEF's _dequeue_and_enqueue
                iq_buf[:, :b] = feats[2].T
                tq_buf[:, :b] = feats[3].T
            loss.backward()
        grads[mode] = (i.grad, t.grad)
    assert torch.equal(grads["after"][0], grads["before"][0]) and torch.equal(grads["after"][1], grads["before"][1])
    if path in ("cpu", "triton"):
        iq_buf, tq_buf = features(k, d, seed=35).T.contiguous(), features(k, d, seed=36).T.contiguous()
        i, t = leaf(feats[0]), leaf(feats[1])
        with mmkernels.use_path("kernel"), mmkernels.backend(path):
            loss = mmkernels.momentum_itc_loss(i, t, feats[2], feats[3], SCALE, alpha=0.4, image_queue=iq_buf.T,
                                               text_queue=tq_buf.T, queue_snapshot=False)
            iq_buf[:, :b] = feats[2].T
            with pytest.raises(RuntimeError, match="inplace"):
                loss.backward()


@pytest.mark.parametrize("path", PATHS)
def test_key_queue_with_key_gradients(path):
    """``itc_rows_loss(keys=..., key_queue=...)``: the keys get their gradient, the queue none."""
    q, k, kq = tokens(5, 2, 8, seed=19), features(7, 8, seed=20), features(4, 8, seed=21)
    rid = torch.tensor([0, 1, 2, 2, 9])
    cid = torch.tensor([0, 1, 2, 3, 4, 5, 6, 2, 9, 0, 8])

    def ours(q, k, s):
        return mmkernels.itc_rows_loss(q, k, s, key_queue=kq, positive_ids=rid, key_ids=cid,
                                       label_smoothing=0.1, reduction="none")

    def theirs(q, k, s):
        return _rows_ref(q, torch.cat([k, kq.to(k.dtype)]), s, rid, cid, eps=0.1)

    _compare(path, ours, theirs, [q, k, torch.tensor(6.0)], grads_of=(0, 1, 2))


# ----------------------------------------------------------------------------- BLIP-2


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ties", [False, True])
def test_blip2_itc_equals_papers_code(path, ties):
    b, q, d = 7, 4, 16
    img = tokens(b, q, d, seed=13)
    if ties:  # two queries of some images exactly equal: the max and its gradient go to the first
        img[::2, 2] = img[::2, 1]
    ins = [img, features(b, d, seed=14), torch.tensor(SCALE)]

    def ours(i, t, s):
        return mmkernels.blip2_itc_loss(i, t, s, reduction="none")

    def theirs(i, t, s):
        return torch.stack([R.blip2_itc_reference(i, t, i.detach(), t.detach(), 1 / s, 0)])

    def ours_mean(i, t, s):
        return torch.stack([ours(i, t, s).mean()])

    _compare(path, ours_mean, theirs, ins, grads_of=(0, 1, 2))


@pytest.mark.parametrize("path", PATHS)
def test_tie_gradient_goes_to_first_query(path):
    """An image whose queries 0 and 2 are equal: query 2 gets no gradient, as with ``max``."""
    img = tokens(5, 3, 8, seed=15)
    img[:, 2] = img[:, 0]
    x = leaf(img)
    with _ctx(path):
        loss = mmkernels.infonce_loss(x, features(5, 8, seed=16), SCALE)
    loss.backward()
    assert torch.count_nonzero(x.grad[:, 2]) == 0
    assert torch.count_nonzero(x.grad[:, 0]) > 0


# ----------------------------------------------------------------------------- one direction


def _rows_ref(q, k, s, rid, cid, tq=None, tk=None, alpha=0.0, eps=0.0):
    return R.itc_rows_reference(q, k, s, rid, cid, teacher_q=tq, teacher_k=tk, alpha=alpha,
                                label_smoothing=eps)


CASES = {
    # name: (N, Q, M, P, D, row ids, col ids, alpha, eps, teacher keys)
    "plain": (7, 1, 13, 1, 16, None, None, 0.0, 0.0, False),
    "ids-several": (9, 1, 13, 1, 24, [0, 1, 1, 2, 3, 3, 4, 5, 6], list(range(7)) + [1, 3, 3, 0, 6, 6], 0.0, 0.0, False),
    "all-positive": (5, 1, 6, 1, 16, [2] * 5, [2] * 6, 0.0, 0.0, False),
    "smoothing-teacher": (7, 1, 10, 1, 16, None, None, 0.4, 0.1, True),
    "queries-tokens": (6, 4, 9, 1, 16, None, None, 0.3, 0.1, False),
    "key-tokens": (6, 1, 9, 3, 16, [0, 1, 2, 2, 4, 5], [0, 1, 2, 3, 4, 5, 2, 7, 8], 0.5, 0.0, True),
    "odd": (33, 2, 97, 1, 40, None, None, 1.0, 0.0, False),
}


def _case_inputs(name, dtype=torch.float32):
    n, qt, m, pt, d, rid, cid, alpha, eps, with_tk = CASES[name]
    q = tokens(n, qt, d, dtype, seed=20)
    k = tokens(m, pt, d, dtype, seed=21)
    tq = tokens(n, qt, d, dtype, seed=22)
    tk = tokens(m, pt, d, dtype, seed=23) if with_tk else None
    rid = torch.arange(n) if rid is None else torch.tensor(rid)
    cid = torch.arange(m) if cid is None else torch.tensor(cid)
    return q, k, tq, tk, rid, cid, alpha, eps


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(CASES))
def test_itc_rows_loss_equals_reference(path, name):
    q, k, tq, tk, rid, cid, alpha, eps = _case_inputs(name)
    squeeze = lambda x: x[:, 0] if x is not None and x.shape[1] == 1 else x

    def ours(q, k, s):
        return mmkernels.itc_rows_loss(squeeze(q), squeeze(k), s, positive_ids=rid, key_ids=cid,
                                       teacher_queries=squeeze(tq), teacher_keys=squeeze(tk),
                                       alpha=alpha, label_smoothing=eps, reduction="none")

    def theirs(q, k, s):
        return _rows_ref(q, k, s, rid, cid, None if tq is None else tq.double(),
                         None if tk is None else tk.double(), alpha, eps)

    _compare(path, ours, theirs, [q, k, torch.tensor(7.0)], grads_of=(0, 1, 2))


@pytest.mark.parametrize("path", ["cpu", "blockwise"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_eager(path, dtype):
    q, k, tq, tk, rid, cid, alpha, eps = _case_inputs("key-tokens", dtype)

    def ours(q, k, s):
        return mmkernels.itc_rows_loss(q, k, s, positive_ids=rid, key_ids=cid, teacher_queries=tq,
                                       teacher_keys=tk, alpha=alpha, reduction="none")

    def theirs(q, k, s):
        cast = (lambda x: x) if q.dtype == torch.float64 else (lambda x: x.to(q.dtype))
        ref_tq = tq.double() if q.dtype == torch.float64 else tq
        ref_tk = tk.double() if q.dtype == torch.float64 else tk
        return _rows_ref(q, k, cast(s), rid, cid, ref_tq, ref_tk, alpha)

    _compare(path, ours, theirs, [q, k, torch.tensor(7.0)], grads_of=(0, 1), dtype=dtype, eager=True)


def test_infonce_and_contrastive_route_here():
    """``infonce_loss`` with ids equals :func:`itc_rows_loss`; ``contrastive_loss`` with a teacher,
    ids and token features is the mean of its two directions."""
    img, txt = tokens(6, 3, 16, seed=30), features(6, 16, seed=31)
    timg, ttxt = tokens(6, 3, 16, seed=32), features(6, 16, seed=33)
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    with mmkernels.use_path("blockwise"):
        a = mmkernels.contrastive_loss(img, txt, SCALE, positive_ids=ids, teacher_image_features=timg,
                                       teacher_text_features=ttxt, alpha=0.4, label_smoothing=0.1)
    d = lambda x: x.double()
    want = 0.5 * (_rows_ref(d(img), d(txt), SCALE, ids, ids, d(timg), d(ttxt), 0.4, 0.1)
                  + _rows_ref(d(txt), d(img), SCALE, ids, ids, d(ttxt), d(timg), 0.4, 0.1)).mean()
    assert_close(a, want, torch.float32, scale=4.0)
    with mmkernels.use_path("blockwise"):
        b = mmkernels.infonce_loss(txt, features(9, 16, seed=34), SCALE, positive_ids=ids,
                                   key_ids=torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 5]))
        c = mmkernels.itc_rows_loss(txt, features(9, 16, seed=34), SCALE, positive_ids=ids,
                                    key_ids=torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 5]))
    assert torch.equal(b, c)


@pytest.mark.parametrize("path", PATHS)
def test_row_without_positive_is_nan(path):
    q, k = features(4, 8, seed=40), features(5, 8, seed=41)
    with _ctx(path):
        rows = mmkernels.itc_rows_loss(q, k, SCALE, positive_ids=torch.tensor([0, 1, 9, 2]),
                                       key_ids=torch.arange(5), reduction="none")
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3]]).all()


@pytest.mark.parametrize("backend", ["cpu", "blockwise"])
def test_gradcheck_float64(backend):
    if backend == "cpu" and not _have("cpu"):
        pytest.skip("C++ itc kernels unavailable")
    q, k = tokens(4, 2, 5, torch.float64, seed=50), tokens(6, 1, 5, torch.float64, seed=51)
    tq, tk = tokens(4, 2, 5, torch.float64, seed=52), tokens(6, 1, 5, torch.float64, seed=53)
    rid, cid = torch.tensor([0, 1, 1, 3]), torch.tensor([0, 1, 2, 3, 1, 5])
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    ctx = mmkernels.backend("cpu") if backend == "cpu" else mmkernels.use_path("blockwise")
    with ctx:
        assert torch.autograd.gradcheck(
            lambda a, b, c: mmkernels.itc_rows_loss(a, b, c, positive_ids=rid, key_ids=cid,
                                                    teacher_queries=tq, teacher_keys=tk, teacher_scale=2.0, alpha=0.3,
                                                    label_smoothing=0.1, reduction="none"),
            (leaf(q), leaf(k), s))


# ----------------------------------------------------------------------------- the sampler


def _draws(path, q, k, seed, **kw):
    with _ctx(path) if path != "reference" else mmkernels.backend("reference"):
        return mmkernels.sample_hard_negatives(q, k, SCALE, seed=torch.tensor(seed), **kw)


@pytest.mark.parametrize("path", PATHS)
def test_every_draw_is_a_negative_and_in_range(path):
    q, k = tokens(40, 3, 16, seed=60), features(12, 16, seed=61)
    rid = torch.arange(40) % 7
    cid = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4])
    for seed in (1, 2, 3):
        neg = _draws(path, q, k, seed, positive_ids=rid, key_ids=cid)
        assert neg.dtype == torch.int64 and neg.shape == (40,)
        assert ((neg >= 0) & (neg < 12)).all()
        assert (cid[neg] != rid).all()


@pytest.mark.parametrize("path", PATHS)
def test_row_with_only_positives_draws_minus_one(path):
    q, k = features(3, 8, seed=62), features(4, 8, seed=63)
    neg = _draws(path, q, k, 5, positive_ids=torch.tensor([1, 2, 1]), key_ids=torch.tensor([1, 1, 1, 1]))
    assert neg[0] == -1 and neg[2] == -1 and 0 <= neg[1] < 4


def test_same_seed_same_draws_on_every_path():
    q, k = tokens(48, 4, 16, seed=64), tokens(20, 1, 16, seed=65)
    want = R.negatives_reference(q, k, torch.tensor(SCALE), torch.arange(48) % 20, torch.arange(20), 77)
    for path in ["reference"] + [p for p in PATHS if _have(p)]:
        got = _draws(path, q, k, 77, targets=torch.arange(48) % 20)
        assert torch.equal(got, want), path


def test_generator_seeds_the_draws():
    q, k = features(64, 16, seed=66), features(64, 16, seed=67)
    with mmkernels.use_path("blockwise"):
        a = mmkernels.sample_hard_negatives(q, k, SCALE, generator=torch.Generator().manual_seed(3))
        b = mmkernels.sample_hard_negatives(q, k, SCALE, generator=torch.Generator().manual_seed(3))
        c = mmkernels.sample_hard_negatives(q, k, SCALE, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _chi2_critical(df: int, false_alarm: float = 1e-3) -> float:
    """The chi-square quantile by Wilson and Hilferty's approximation (z of the normal tail)."""
    z = {1e-3: 3.090232, 1e-2: 2.326348}[false_alarm]
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("path", ["cpu", "blockwise"])
def test_draws_follow_softmax_over_negatives(path):
    """One query (3 tokens) repeated 6000 times (each row an independent draw), 8 keys of which
    two are positives: the counts match ``softmax(scale * S)`` over the 6 negatives by a chi-square
    test at a false-alarm rate of 1e-3 (fixed seeds: deterministic)."""
    n, scale = 6000, 3.0
    q = tokens(1, 3, 8, seed=70).expand(n, 3, 8).contiguous()
    k = features(8, 8, seed=71)
    rid, cid = torch.zeros(n, dtype=torch.int64), torch.tensor([0, 1, 2, 0, 3, 4, 5, 6])
    with _ctx(path):
        neg = mmkernels.sample_hard_negatives(q, k, scale, positive_ids=rid, key_ids=cid,
                                              seed=torch.tensor(12345))
    s = R.similarity_reference(q[:1].double(), k.double())[0] * scale
    negatives = cid != 0
    p = torch.softmax(s[negatives], 0)
    counts = torch.bincount(neg, minlength=8)[negatives].double()
    assert counts.sum() == n
    expected = n * p
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < _chi2_critical(int(negatives.sum()) - 1), (chi2, counts.tolist(), expected.tolist())


def test_itm_hard_negatives_both_directions():
    img, txt = tokens(10, 4, 16, seed=80), features(10, 16, seed=81)
    with mmkernels.use_path("blockwise"):
        neg_text, neg_image = mmkernels.itm_hard_negatives(img, txt, SCALE,
                                                           generator=torch.Generator().manual_seed(0))
    assert (neg_text != torch.arange(10)).all() and (neg_image != torch.arange(10)).all()
    assert ((neg_text >= 0) & (neg_text < 10)).all() and ((neg_image >= 0) & (neg_image < 10)).all()


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call,error,match", [
    (lambda q, k: mmkernels.itc_rows_loss(q[0, 0], k, 1.0), ValueError, "rows, D"),
    (lambda q, k: mmkernels.itc_rows_loss(q, k[..., :3], 1.0), ValueError, "feature size"),
    (lambda q, k: mmkernels.itc_rows_loss(q, k.double(), 1.0), TypeError, "dtype"),
    (lambda q, k: mmkernels.itc_rows_loss(q, k, 1.0, alpha=0.5), ValueError, "teacher"),
    (lambda q, k: mmkernels.itc_rows_loss(q, k, 1.0, alpha=1.5, teacher_queries=q), ValueError, "alpha"),
    (lambda q, k: mmkernels.itc_rows_loss(q, k, 1.0, alpha=0.5, teacher_queries=q[:2]), ValueError, "rows"),
    (lambda q, k: mmkernels.itc_rows_loss(q, k, 1.0, positive_ids=torch.arange(4).int()), TypeError, "int64"),
    (lambda q, k: mmkernels.itc_rows_loss(q, k, 1.0, positive_ids=torch.arange(3)), ValueError, "entries"),
    (lambda q, k: mmkernels.itc_rows_loss(q, k, 1.0, key_ids=torch.arange(6)), ValueError, "positive_ids"),
    (lambda q, k: mmkernels.itc_rows_loss(q, k, 1.0, positive_ids=torch.arange(4)), ValueError, "key_ids"),
    (lambda q, k: mmkernels.itc_rows_loss(q, k, 1.0, targets=torch.arange(4), positive_ids=torch.arange(4)),
     ValueError, "either"),
    (lambda q, k: mmkernels.itc_rows_loss(q, k, 1.0, targets=torch.tensor([0, 1, 2, 6])), ValueError, "targets"),
    (lambda q, k: mmkernels.itc_rows_loss(q, k, 1.0, label_smoothing=2.0), ValueError, "label_smoothing"),
    (lambda q, k: mmkernels.blip2_itc_loss(q, q, 1.0), ValueError, "text_feat"),
    (lambda q, k: mmkernels.sample_hard_negatives(q, k, 1.0, seed=torch.tensor(1.0)), TypeError, "int64"),
    (lambda q, k: mmkernels.momentum_itc_loss(q[:, 0], q[:, 0], q[:, 0], q[:, 0], 1.0, alpha=0.4,
                                              image_queue=k[:, 0], text_queue=k[:, 0],
                                              idx=torch.arange(4)), ValueError, "idx_queue"),
    (lambda q, k: mmkernels.contrastive_loss(q, q[:, 0], 1.0, alpha=0.4), ValueError, "teacher"),
    (lambda q, k: mmkernels.itc_rows_loss(q, k, 1.0, key_queue=k[..., :3]), ValueError, "key_queue"),
    (lambda q, k: mmkernels.itc_rows_loss(q, k, 1.0, key_queue=k, alpha=0.4, teacher_queries=q,
                                          teacher_keys=k), ValueError, "teacher_keys=None"),
    (lambda q, k: mmkernels.momentum_itc_loss(q[:, 0], q[:, 0], q[:, 0], q[:, 0], 1.0, alpha=0.4,
                                              image_queue=k[:, 0], text_queue=k[:3, 0]),
     ValueError, "same number"),
    (lambda q, k: mmkernels.contrastive_loss(q, q[:, 0], 1.0, return_stats=True,
                                             positive_ids=torch.arange(4)), ValueError, "return_stats"),
])
def test_bad_inputs(call, error, match):
    q, k = tokens(4, 2, 8, seed=90), tokens(6, 1, 8, seed=91)
    with pytest.raises(error, match=match):
        call(q, k)


# ----------------------------------------------------------------------------- registration


@pytest.mark.parametrize("backend", ["cpu", "blockwise"])
def test_opcheck(backend):
    if backend == "cpu" and not _have("cpu"):
        pytest.skip("C++ itc kernels unavailable")
    q, k = tokens(5, 2, 6, seed=100), tokens(7, 1, 6, seed=101)
    tq = tokens(5, 2, 6, seed=102)
    rid, cid = torch.tensor([0, 1, 1, 3, 4]), torch.tensor([0, 1, 2, 3, 4, 1, 6])
    s, ts = torch.tensor(3.0, requires_grad=True), torch.tensor(2.0)
    kq = tokens(3, 1, 6, seed=103)
    cid = torch.cat([cid, torch.tensor([1, 9, 4])])
    args = (q.requires_grad_(), k.requires_grad_(), kq, tq, None, s, ts, rid, cid, 0.4, 0.1, backend)
    torch.library.opcheck(ops.itc_rows, args)
    loss, lse, tlse, cnt = ops.itc_rows(*[a.detach() if torch.is_tensor(a) else a for a in args])
    g = torch.linspace(0.1, 1.0, 5)
    torch.library.opcheck(ops.itc_grads, (g, q.detach(), k.detach(), kq, tq, None, s.detach(), ts, rid,
                                          cid, lse, tlse, cnt, 0.4, 0.1, True, backend))
    torch.library.opcheck(ops.itc_negatives, (q.detach(), k.detach(), s.detach(), rid, cid[:7],
                                              torch.tensor(9), backend))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    if not _have("cpu"):
        pytest.skip("C++ itc kernels unavailable")
    img, txt = tokens(9, 4, 16, seed=110), features(9, 16, seed=111)
    ids = torch.tensor([0, 1, 1, 2, 3, 4, 4, 5, 6])

    def step(a, b, s):
        return mmkernels.contrastive_loss(a, b, s.exp(), positive_ids=ids, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    with mmkernels.backend("cpu"):
        ins1 = [leaf(img), leaf(txt), torch.tensor(2.3, requires_grad=True)]
        out = compiled(*ins1)
        out.backward()
        ins2 = [leaf(img), leaf(txt), torch.tensor(2.3, requires_grad=True)]
        ref = step(*ins2)
        ref.backward()
    assert_close(out, ref.double())
    for a, b in zip(ins1, ins2):
        assert_close(a.grad, b.grad.double())


_MEMORY_BODY = """
import torch
import mmkernels

def setup(n, m, d, path):
    torch.manual_seed(0)
    n, m, d = int(n), int(m), int(d)
    f = lambda *s: torch.nn.functional.normalize(torch.randn(*s), dim=-1)
    return f(n, d), f(n, d), f(n, d), f(n, d), f(m, d), f(m, d), path

def run(state):
    i, t, im, tm, iq, tq, path = state
    i, t = i.clone().requires_grad_(), t.clone().requires_grad_()
    s = torch.tensor(14.0, requires_grad=True)
    ctx = mmkernels.backend(path) if path == "cpu" else mmkernels.use_path(path)
    with ctx:
        loss = mmkernels.momentum_itc_loss(i, t, im, tm, s, alpha=0.4, image_queue=iq, text_queue=tq)
        loss.backward()
    return float(loss)
"""


@pytest.mark.slow
@pytest.mark.parametrize("path", ["cpu", "blockwise"])
def test_memory_bound_no_n_by_m(path):
    """ALBEF's form with a 65,536-row queue and 1024 rows: the extra memory (the kernels' fixed
    chunk buffers and O((N + K) * D)) stays below a fifth of one ``[B, B + K]`` float32 matrix,
    of which the materialised code holds about ten (logits, targets, teacher, gradients); the
    blockwise path under a 4 MiB memory budget."""
    if path == "cpu" and not _have("cpu"):
        pytest.skip("C++ itc kernels unavailable")
    n, m, d = 1024, 65536, 64
    body = _MEMORY_BODY
    if path == "blockwise":
        body = body.replace("import mmkernels\n", "import mmkernels\nmmkernels.tuning.set_option('memory_budget', 4 << 20)\n")
    out = peak_extra(body, n, m, d, path)
    one_nm = n * (n + m) * 4
    assert out["extra"] <= 0.2 * one_nm, f"used {out['extra'] / 2**20:.1f} MiB extra"
