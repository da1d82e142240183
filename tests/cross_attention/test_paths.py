"""The sdpa path of cross_attention against the float64 reference, its dropout, and the dispatcher's
choice per shape class."""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels import _dispatch, tuning
from mmkernels.cross_attention import cross_attention_reference, make_seed, paths
from mmkernels.testing.numerics import assert_close

from tests.helpers.rss import peak_extra


def _randn(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _inputs(b, h, lq, lk, d, dtype=torch.float32, seed=0):
    return (_randn(b, h, lq, d, seed=seed, dtype=dtype), _randn(b, h, lk, d, seed=seed + 1, dtype=dtype),
            _randn(b, h, lk, d, seed=seed + 2, dtype=dtype))


def _padding(b, lk, seed=3):
    """Random key padding; sample 1 keeps only its first key; the last sample has no key at all."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, lk, generator=g) > 0.3
    mask[0, 0] = True
    mask[1] = False
    mask[1, 0] = True
    mask[-1] = False
    return mask


def _run(path, q, k, v, mask, dout, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if path == "reference":
        out = cross_attention_reference(q, k, v, mask, **kw)
    else:
        with mmkernels.use_path(path), mmkernels.explain() as log:
            out = mmkernels.cross_attention(q, k, v, key_padding_mask=mask, **kw)
        assert log.paths() == [path]
    out.backward(dout.to(out.dtype))
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("lq,lk,d", [(32, 257, 64), (7, 97, 88), (1, 5, 96)])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_forward_backward(dtype, lq, lk, d, padded):
    b, h = 3, 2
    q, k, v = _inputs(b, h, lq, lk, d, dtype, seed=lq + lk)
    mask = _padding(b, lk) if padded else None
    dout = _randn(b, h, lq, d, seed=99, dtype=torch.float64)
    got = _run("sdpa", q, k, v, mask, dout)
    ref = _run("reference", q.double(), k.double(), v.double(), mask, dout)
    eager = _run("reference", q, k, v, mask, dout)
    for name, g, r, e in zip(("out", "dq", "dk", "dv"), got, ref, eager):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        assert_close(g, r, dtype, eager=e, name=name)
    if padded:  # the last sample's keys are all padding: out 0, zero gradient
        for t in got:
            assert (t[-1] == 0).all()


def test_sdpa_non_contiguous_kv_views():
    """k and v as the Q-Former makes them: strided views of one [B, Lk, 2, H, D] projection."""
    kv = _randn(2, 40, 2, 4, 16, seed=1)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    q = _randn(2, 9, 4, 16, seed=2).transpose(1, 2)
    mask = _padding(2, 40)
    dout = _randn(2, 4, 9, 16, seed=3, dtype=torch.float64)
    for g, r in zip(_run("sdpa", q, k, v, mask, dout), _run("reference", q.double(), k.double(), v.double(), mask, dout)):
        assert_close(g, r, torch.float32)


def test_sdpa_dropout_is_sane_and_reproducible():
    """SDPA draws its own dropout mask from the default generator: the same torch.manual_seed gives
    the same output and gradients, another seed another mask; over many draws the output averages
    to the dropout-free one (kept probabilities are scaled by 1 / (1 - p))."""
    q, k, v = _inputs(2, 2, 8, 64, 16, seed=4)
    q.requires_grad_()
    p = 0.3

    def draw(seed):
        torch.manual_seed(seed)
        with mmkernels.use_path("sdpa"):
            out = mmkernels.cross_attention(q, k, v, dropout_p=p)
        (grad,) = torch.autograd.grad(out.sum(), q)
        return out.detach(), grad

    a, ga = draw(0)
    b, gb = draw(0)
    c, _ = draw(1)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert not torch.equal(a, c)
    with torch.no_grad():
        clean = cross_attention_reference(q.double(), k.double(), v.double())
        torch.manual_seed(2)
        with mmkernels.use_path("sdpa"):
            mean = sum(mmkernels.cross_attention(q, k, v, dropout_p=p).double() for _ in range(400)) / 400
    # each output is a sum of 64 kept-or-dropped terms: the mean of 400 draws is within a few
    # standard errors of the clean output, and far from it without the 1 / (1 - p) scaling
    err = (mean - clean).abs().mean().item()
    assert err < 0.05, err
    assert ((mean * (1 - p) - clean).abs().mean().item()) > 2 * err


def test_sdpa_ineligible_cases_explain_why():
    q, k, v = _inputs(1, 2, 4, 9, 16)
    why = paths.eligibility(q, k, v, None, 0.25, 0.1, torch.Generator(), False)["sdpa"]
    assert "default generator" in why
    assert "log-sum-exp" in paths.eligibility(q, k, v, None, 0.25, 0.0, None, True)["sdpa"]
    with mmkernels.use_path("sdpa"), pytest.raises(RuntimeError, match="default generator"):
        mmkernels.cross_attention(q, k, v, dropout_p=0.1, generator=torch.Generator().manual_seed(0))
    # with a generator, auto runs the kernels whatever the table says: the mask is the hash's
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    with _dispatch.pretend_device("cuda-sm90"), mmkernels.explain() as log:
        a = mmkernels.cross_attention(q, k, v, dropout_p=0.2, generator=g())
    assert log.paths() == ["kernel"]
    seed = make_seed(q.device, g())
    assert_close(a, cross_attention_reference(q.double(), k.double(), v.double(), dropout_p=0.2, seed=seed),
                 torch.float32)


def test_sdpa_dropout_math_fallback_respects_the_memory_budget():
    """On CPU, SDPA runs dropout in its math kernel (Lq x Lk scores): eligible only within the budget."""
    q, k, v = _inputs(2, 2, 32, 257, 16)
    assert paths.eligibility(q, k, v, None, 0.25, 0.1, None, False)["sdpa"] is None
    with tuning.scope():
        tuning.set_option("memory_budget", 4096)
        assert "memory_budget" in paths.eligibility(q, k, v, None, 0.25, 0.1, None, False)["sdpa"]
        assert paths.eligibility(q, k, v, None, 0.25, 0.0, None, False)["sdpa"] is None


def test_shape_classes():
    assert paths.shape_class(32, 257, 64, False) == "lq<=256:lk<=1024"
    assert paths.shape_class(32, 257, 64, True) == "lq<=256:lk<=1024:dropout"
    assert paths.shape_class(257, 1025, 64, False) == "lq>256:lk>1024"


CLASSES = ["lq<=256:lk<=1024", "lq<=256:lk<=1024:dropout", "lq<=256:lk>1024", "lq<=256:lk>1024:dropout",
           "lq>256:lk<=1024", "lq>256:lk>1024", "unheard:of"]


def test_table_rows():
    for kind in ("cpu", "cuda-sm90", "cuda"):
        for cls in CLASSES:
            order = _dispatch.lookup("cross_attention", "cross_attention", kind, "bfloat16", cls)[1].order
            assert "kernel" in order and set(order) <= {"kernel", "sdpa"}
    # never measured on a GPU: SDPA (flash) first there
    x = torch.empty(1, dtype=torch.bfloat16)
    with _dispatch.pretend_device("cuda-sm90"):
        assert _dispatch.choose("cross_attention", "cross_attention", x, CLASSES[0],
                                {"sdpa": None}).path == "sdpa"


@pytest.mark.parametrize("device_kind", ["cpu", "cuda-sm90"])
@pytest.mark.parametrize("lq,lk,dropout", [(32, 257, 0.0), (32, 257, 0.1), (300, 64, 0.0), (8, 1100, 0.0)])
def test_public_api_choices(device_kind, lq, lk, dropout):
    q, k, v = _inputs(1, 2, lq, lk, 16)
    mask = torch.rand(1, lk, generator=torch.Generator().manual_seed(lk)) > 0.3
    mask[0, :3] = True
    cls = paths.shape_class(lq, lk, 16, dropout > 0)
    with _dispatch.pretend_device(device_kind), mmkernels.explain() as log:
        out = mmkernels.cross_attention(q, k, v, key_padding_mask=mask, dropout_p=dropout)
    (decision,) = log
    assert decision.case == (device_kind, "float32", cls)
    order = _dispatch.lookup("cross_attention", "cross_attention", device_kind, "float32", cls)[1].order
    assert decision.path == order[0], str(decision)
    assert torch.isfinite(out).all()
    if dropout == 0:
        assert_close(out, cross_attention_reference(q.double(), k.double(), v.double(), mask), torch.float32)


def test_compile_fullgraph_under_auto():
    q, k, v = (t.requires_grad_() for t in _inputs(2, 2, 300, 40, 16))
    mask = _padding(2, 40)
    fn = torch.compile(lambda a, b, c: mmkernels.cross_attention(a, b, c, key_padding_mask=mask), fullgraph=True)
    out = fn(q, k, v)
    out.sum().backward()
    assert_close(out, cross_attention_reference(q.double(), k.double(), v.double(), mask), torch.float32)
    assert (q.grad[1] == 0).all()


def test_forced_backends_unchanged():
    q, k, v = _inputs(2, 2, 8, 30, 16)
    mask = _padding(2, 30)
    with mmkernels.explain() as log:
        with mmkernels.backend("cpu"):
            a = mmkernels.cross_attention(q, k, v, key_padding_mask=mask)
        with mmkernels.backend("reference"):
            b = mmkernels.cross_attention(q, k, v, key_padding_mask=mask)
        with mmkernels.use_path("sdpa"):
            c = mmkernels.cross_attention(q, k, v, key_padding_mask=mask)
    assert log.paths() == ["kernel", "reference", "sdpa"] and log[0].backend == "cpu"
    ref = cross_attention_reference(q.double(), k.double(), v.double(), mask)
    for t in (a, b, c):
        assert_close(t, ref, torch.float32)


_MEMORY_BODY = """
import torch, mmkernels

def setup():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 256, 64, requires_grad=True)
    k, v = (torch.randn(2, 4, 8192, 64, requires_grad=True) for _ in range(2))
    return q, k, v, torch.rand(2, 8192) > 0.1

def run(state):
    q, k, v, mask = state
    for t in (q, k, v):
        t.grad = None
    with mmkernels.use_path("sdpa"):
        out = mmkernels.cross_attention(q, k, v, key_padding_mask=mask)
    out.sum().backward()
"""


@pytest.mark.slow
def test_sdpa_padding_memory_has_no_scores_tensor():
    """Lq = 256 over Lk = 8192, 2 x 4 heads, with padding: the fp32 scores are 64 MiB; the sdpa
    path (a [B, 1, 1, Lk] mask, SDPA's flash kernel) stays far below them."""
    ours = peak_extra(_MEMORY_BODY)["extra"]
    scores = 2 * 4 * 256 * 8192 * 4
    assert ours <= 16 * 2**20 + scores / 4, f"sdpa path used {ours / 2**20:.0f} MiB"
