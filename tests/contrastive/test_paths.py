"""The blockwise and materialized paths against the float64 reference, the memory budget,
and the dispatcher's choices per shape class (read back through mmkernels.explain)."""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels import _dispatch, tuning
from mmkernels.contrastive import paths, reference
from mmkernels.testing.numerics import assert_close

from tests.contrastive.cases import features, have_backend, leaf

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]

BIG = 1 << 40


@pytest.fixture(params=["torch", "triton"])
def arith(request, monkeypatch):
    """The blockwise arithmetic: torch ops, or the light Triton kernels under the interpreter."""
    if request.param == "triton" and not have_backend("triton"):
        pytest.skip("needs the triton interpreter")
    monkeypatch.setattr(paths, "default_arith", lambda device, dtype: request.param)
    return request.param


def _run(path, fn, tensors, scale, weight, budget=None, **kw):
    xs = [leaf(t) for t in tensors]
    s = leaf(scale)
    with tuning.scope(), mmkernels.use_path(path), mmkernels.explain() as log:
        if budget is not None:
            tuning.set_option("memory_budget", budget)
        out = fn(*xs, s, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    (loss.sum() * weight).backward()
    assert log.paths() == [path]
    return out, [x.grad for x in xs], s.grad


def _compare(path, fn, ref_fn, tensors, dtype, budget=None, **kw):
    n = tensors[0].shape[0]
    weight = n if kw.get("reduction", "mean") == "mean" else 1.0
    s = torch.tensor(11.0)
    out, grads, gs = _run(path, fn, [t.to(dtype) for t in tensors], s, weight, budget, **kw)
    ref, rgrads, rs = _reference(ref_fn, [t.double() for t in tensors], s.double(), weight, **kw)
    eager = _reference(ref_fn, [t.to(dtype) for t in tensors], s.to(dtype), weight, **kw)
    tol = dict(scale=2.0) if dtype != torch.float32 else {}
    assert out.dtype == dtype
    assert_close(out, ref, dtype, eager=eager[0], name="loss", **tol)
    for i, (g, r, e) in enumerate(zip(grads, rgrads, eager[1])):
        assert g.dtype == dtype
        assert_close(g, r, dtype, eager=e, name=f"grad {i}", **tol)
    assert_close(gs, rs, dtype, scale=4.0, name="d logit_scale")


def _reference(fn, tensors, s, weight, **kw):
    xs = [leaf(t) for t in tensors]
    sl = leaf(s)
    out = fn(*xs, sl, **kw)
    (out.sum() * weight).backward()
    return out, [x.grad for x in xs], sl.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,d", [(1, 8), (7, 33), (97, 40)])
def test_blockwise_symmetric(arith, dtype, n, d):
    imgs, txts = features(n, d, seed=1), features(n, d, seed=2)
    # 3 rows a block: several blocks, the last ragged
    bpl = paths.block_bytes_per_logit(torch.device("cpu"), dtype, arith)
    _compare("blockwise", mmkernels.contrastive_loss, reference.contrastive_loss_reference,
             [imgs, txts], dtype, budget=3 * n * bpl, label_smoothing=0.1)


@pytest.mark.parametrize("path", ["blockwise", "materialized"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_infonce_rectangular_with_targets(arith, path, reduction):
    if path == "materialized" and arith == "triton":
        pytest.skip("materialized has no blockwise arithmetic")
    g = torch.Generator().manual_seed(3)
    q, k = features(29, 24, seed=4), features(97, 24, seed=5)
    t = torch.randint(0, 97, (29,), generator=g)
    kw = dict(targets=t, label_smoothing=0.2, reduction=reduction)
    budget = BIG if path == "materialized" else 5 * 97 * 16
    _compare(path, mmkernels.infonce_loss, reference.infonce_loss_reference, [q, k],
             torch.float32, budget=budget, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 7, 97])
def test_materialized_symmetric(dtype, n):
    _compare("materialized", mmkernels.contrastive_loss, reference.contrastive_loss_reference,
             [features(n, 33, seed=6), features(n, 33, seed=7)], dtype, budget=BIG,
             reduction="none", label_smoothing=0.1)


def test_blockwise_stats_accuracy_and_bias(arith):
    img = features(40, 8, seed=8)
    txt = (img.double() + 0.8 * features(40, 8, seed=9).double()).float()
    with mmkernels.use_path("blockwise"):
        loss, stats = mmkernels.contrastive_loss(img, txt, 10.0, torch.tensor(-2.0), return_stats=True)
    ref, (i2t, t2i) = reference.contrastive_loss_reference(img.double(), txt.double(), 10.0, -2.0,
                                                           return_stats=True)
    assert_close(loss, ref)
    assert stats.i2t_accuracy.item() == pytest.approx(i2t.item(), abs=1.5 / 40)
    assert stats.t2i_accuracy.item() == pytest.approx(t2i.item(), abs=1.5 / 40)


def test_budget_bounds_the_block(monkeypatch):
    """The rows per block follow memory_budget; every product block the path allocates is
    [rows, M] and no larger."""
    n, m, d = 97, 130, 16
    q, k = features(n, d, seed=10), features(m, d, seed=11)
    seen = []
    real = paths._Operands.product

    def product(self, r0, r1, out=None):
        seen.append((r1 - r0, out.shape if out is not None else None))
        return real(self, r0, r1, out)

    monkeypatch.setattr(paths._Operands, "product", product)
    bpl = paths.block_bytes_per_logit(torch.device("cpu"), torch.float32, "torch")
    with tuning.scope():
        tuning.set_option("memory_budget", 10 * m * bpl)
        with mmkernels.use_path("blockwise"):
            out = mmkernels.infonce_loss(leaf(q), k, 5.0, targets=torch.arange(n) % m)
        out.backward()
    assert seen and all(rows <= 10 for rows, _ in seen)
    assert all(shape is not None and shape[0] <= 10 and shape[1] == m for _, shape in seen)
    assert len(seen) == 2 * -(-n // 10)  # forward and backward, each ceil(97 / 10) blocks
    assert paths.block_rows(n, m, bpl, budget=0) == 1
    assert paths.block_rows(n, m, bpl, budget=BIG) == n


_MEMORY_BODY = """
import torch, mmkernels
from mmkernels import tuning

def setup(budget, n, d):
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(int(n), int(d)), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(int(n), int(d)), dim=-1).requires_grad_()
    img.grad, txt.grad = torch.zeros_like(img), torch.zeros_like(txt)
    return int(budget), img, txt

def run(state):
    budget, img, txt = state
    with tuning.scope(), mmkernels.use_path("blockwise"):
        tuning.set_option("memory_budget", budget)
        loss = mmkernels.contrastive_loss(img, txt, 14.3)
        loss.backward()  # the backward reads the budget too
    return float(loss)
"""


@pytest.mark.slow
def test_blockwise_peak_memory_follows_the_budget():
    """N = 4096, D = 64 fp32: with an 8 MiB budget the extra memory stays far below one N x N
    fp32 matrix (64 MiB)."""
    from tests.helpers.rss import peak_extra
    n, d, budget = 4096, 64, 8 << 20
    out = peak_extra(_MEMORY_BODY, budget, n, d)
    assert out["extra"] <= budget + 16 * n * d * 4, f"{out['extra'] / 2**20:.0f} MiB extra"


def test_materialized_refused_above_the_budget():
    q, k = features(64, 8, seed=12), features(64, 8, seed=13)
    need = paths.materialized_bytes(64, 64, torch.float32, symmetric=True)
    assert need == 9 * 64 * 64 * 4
    with tuning.scope():
        tuning.set_option("memory_budget", need - 1)
        el = paths.eligibility(q, k, symmetric=True)
        assert el["blockwise"] is None and "memory_budget" in el["materialized"]
        with mmkernels.use_path("materialized"), pytest.raises(RuntimeError, match="memory_budget"):
            mmkernels.contrastive_loss(q, k, 5.0)
        tuning.set_option("memory_budget", need)
        assert paths.eligibility(q, k, symmetric=True)["materialized"] is None
    assert paths.materialized_bytes(8, 8, torch.bfloat16, symmetric=False, loss_dtype=torch.float32) \
        == 6 * 64 * 2 + 2 * 64 * 4


def test_shape_classes():
    assert paths.shape_class(4096, 4096, 768) == "nm<=2^24"
    assert paths.shape_class(4097, 4096, 768) == "nm<=2^28"
    assert paths.shape_class(16384, 16384, 8) == "nm<=2^28"
    assert paths.shape_class(32768, 32768, 8) == "nm>2^28"
    assert set(paths.SHAPE_CLASSES) == {paths.shape_class(n, n, 1) for n in (1, 8192, 1 << 20)}


@pytest.mark.parametrize("cls_n", [64, 8192, 1 << 15])
def test_dispatcher_follows_the_table(cls_n, monkeypatch):
    cls = paths.shape_class(cls_n, cls_n, 4)
    monkeypatch.setattr(paths, "shape_class", lambda *a: cls)
    x = features(16, 4, seed=15)
    for kind in ("cuda-sm90", "cuda", "cpu"):
        for dtype in (torch.float32, torch.bfloat16):
            key, row = _dispatch.lookup("contrastive", "contrastive_loss", kind,
                                        _dispatch.dtype_name(dtype), cls)
            assert "kernel" in row.order
            with _dispatch.pretend_device(kind), mmkernels.explain() as log:
                mmkernels.contrastive_loss(x.to(dtype), x.to(dtype), 2.0)
            assert log.paths() == [row.order[0]], str(log)
            assert log[0].case == (kind, _dispatch.dtype_name(dtype), cls)
            if kind.startswith("cuda"):
                assert row.order[:2] == ("materialized", "blockwise")
            # without the budget for materialized, the next path of the row runs
            with tuning.scope(), _dispatch.pretend_device(kind), mmkernels.explain() as log:
                tuning.set_option("memory_budget", 0)
                mmkernels.contrastive_loss(x.to(dtype), x.to(dtype), 2.0)
            assert log.paths() == [[p for p in row.order if p != "materialized"][0]], str(log)


def test_use_path_and_forced_backends():
    x, y = features(9, 4, seed=16), features(9, 4, seed=17)
    with mmkernels.use_path("blockwise"), mmkernels.explain() as log:
        mmkernels.contrastive_loss(x, y, 2.0)
        mmkernels.infonce_loss(x, y, 2.0)
    assert log.paths() == ["blockwise", "blockwise"]
    assert all(d.reason == "use_path forced" for d in log)
    with mmkernels.backend("cpu"), mmkernels.use_path("blockwise"), mmkernels.explain() as log:
        mmkernels.contrastive_loss(x, y, 2.0)
    assert log.paths() == ["kernel"] and log[0].backend == "cpu"
    with mmkernels.backend("reference"), mmkernels.explain() as log:
        mmkernels.contrastive_loss(x, y, 2.0)
    assert log.paths() == ["reference"]


@pytest.mark.parametrize("with_columns", [True, False])
def test_opcheck_blockwise(with_columns):
    q, k = leaf(features(9, 12, seed=18)), leaf(features(9 if with_columns else 13, 12, seed=19))
    scale = torch.tensor(7.0, requires_grad=True)
    targets = torch.arange(9) if with_columns else torch.randint(0, 13, (9,))
    torch.library.opcheck(torch.ops.mmkernels.contrastive_stats.default,
                          (q, k, scale, targets, with_columns, "blockwise"))
    stats = torch.ops.mmkernels.contrastive_stats(q.detach(), k.detach(), scale.detach(), targets,
                                                  with_columns, "blockwise")
    g = [torch.randn_like(t) for t in (stats[0], stats[2], stats[3], stats[4], stats[6])]
    torch.library.opcheck(torch.ops.mmkernels.contrastive_grads.default,
                          (q.detach(), k.detach(), scale.detach(), targets, stats[1], stats[0], stats[5],
                           stats[4], *g,
                           "blockwise"))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_epilogue(reduction):
    n = 9
    vec = [leaf(torch.randn(n)) for _ in range(7)]
    torch.library.opcheck(torch.ops.mmkernels.contrastive_loss_epilogue.default,
                          (*vec, n, 0.1, reduction, torch.float32, "torch"))


def test_epilogue_triton_matches_torch():
    if not have_backend("triton"):
        pytest.skip("needs the triton interpreter")
    from mmkernels.contrastive.epilogue import contrastive_loss_epilogue
    n = 37
    base = [torch.randn(n, dtype=torch.float64).float() for _ in range(7)]
    for cols in (True, False):
        for reduction in ("mean", "sum", "none"):
            outs = {}
            for backend in ("torch", "triton"):
                v = [leaf(t) if cols or i < 4 else torch.empty(0) for i, t in enumerate(base)]
                loss, a, b = contrastive_loss_epilogue(*v, 50, 0.1, reduction, torch.float32, backend)
                (loss.sum() * 1.7).backward()
                outs[backend] = [loss, a, b] + [x.grad for x in v if x.requires_grad and x.grad is not None]
            for x, y in zip(outs["torch"], outs["triton"]):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_torch_compile_blockwise():
    img, txt = features(33, 16, seed=20), features(33, 16, seed=21)

    def step(a, b, s):
        return mmkernels.contrastive_loss(a, b, s.exp(), label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with mmkernels.use_path("blockwise"):
        a1, b1, s1 = leaf(img), leaf(txt), torch.tensor(2.3, requires_grad=True)
        out = compiled(a1, b1, s1)
        out.backward()
    ref = reference.contrastive_loss_reference(img.double(), txt.double(), torch.tensor(2.3).double().exp(),
                                               label_smoothing=0.1)
    assert_close(out, ref)
    assert a1.grad is not None and s1.grad is not None


def test_gradcheck_blockwise_float64():
    img = leaf(features(5, 3, torch.float64, seed=22, normalize=False))
    txt = leaf(features(5, 3, torch.float64, seed=23, normalize=False))
    scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    with tuning.scope(), mmkernels.use_path("blockwise"):
        tuning.set_option("memory_budget", 2 * 5 * 32)  # 2 rows a block
        assert torch.autograd.gradcheck(
            lambda a, b, s: mmkernels.contrastive_loss(a, b, s, label_smoothing=0.1), (img, txt, scale))
