"""GPU tier of the ALBEF / BLIP / BLIP-2 objectives (``pytest -m gpu``): the papers' sizes on every
path against the float64 papers' code, no host syncs and a CUDA graph, the memory bound against
the as-written objective, the sampler's draws equal on every path, compile of the Triton path.

Skipped on machines without CUDA (see conftest.py); run by ``bench/gpu_check.sh``.
"""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.contrastive.itc import reference as R
from mmkernels.testing.cuda_graph import capture, sync_free
from mmkernels.testing.numerics import assert_close

pytestmark = pytest.mark.gpu

SCALE = 1 / 0.07


def _feats(*shape, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(*shape, device="cuda", generator=g)
    return torch.nn.functional.normalize(x, dim=-1).to(dtype)


def _context(path):
    return mmkernels.backend("triton") if path == "kernel" else mmkernels.use_path(path)


def _grads(fn, inputs, grads_of):
    xs = [x.detach().clone().requires_grad_() if i in grads_of else x for i, x in enumerate(inputs)]
    loss = fn(*xs)
    loss.backward()
    return [loss.detach()] + [xs[i].grad for i in grads_of]


def _tol(dtype):
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else dtype


@pytest.mark.parametrize("path", ["kernel", "blockwise", "materialized"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_albef_itc_at_papers_size(path, dtype):
    """B = 64, D = 256, a queue of 57,600, alpha = 0.4."""
    b, k, d = 64, 57600, 256
    ins = [_feats(b, d, dtype=dtype, seed=i) for i in range(4)]
    ins += [_feats(k, d, dtype=dtype, seed=4), _feats(k, d, dtype=dtype, seed=5),
            torch.tensor(SCALE, device="cuda")]

    def ours(i, t, im, tm, iq, tq, s):
        return mmkernels.momentum_itc_loss(i, t, im, tm, s, alpha=0.4, image_queue=iq, text_queue=tq)

    def theirs(i, t, im, tm, iq, tq, s):
        return R.momentum_itc_reference(i, t, im, tm, iq, tq, 1 / s, 0.4)

    if path == "materialized":
        mmkernels.tuning.set_option("memory_budget", 1 << 32)
    try:
        with _context(path):
            out = _grads(ours, ins, (0, 1, 6))
    finally:
        mmkernels.tuning.set_option("memory_budget", None)
    ref = _grads(theirs, [x.double() for x in ins], (0, 1, 6))
    eager = _grads(theirs, [x if x.dim() else x.to(dtype) for x in ins], (0, 1, 6))
    for name, o, r, e in zip(("loss", "d image", "d text", "d scale"), out, ref, eager):
        assert_close(o, r, _tol(dtype), eager=e, scale=4.0, name=name)


@pytest.mark.parametrize("path", ["kernel", "blockwise"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_blip2_itc_at_papers_size(path, dtype):
    """32 queries, D = 256, 256 local rows against a global batch of 2048."""
    b, w, q, d = 256, 8, 32, 256
    img_all, txt_all = _feats(b * w, q, d, dtype=dtype, seed=1), _feats(b * w, d, dtype=dtype, seed=2)
    rank = 3
    img, txt = img_all[rank * b:(rank + 1) * b], txt_all[rank * b:(rank + 1) * b]
    targets = torch.arange(rank * b, rank * b + b, device="cuda")

    def ours(i, t, s):
        return 0.5 * (mmkernels.infonce_loss(i, txt_all, s, targets=targets, label_smoothing=0.1)
                      + mmkernels.infonce_loss(t, img_all, s, targets=targets, label_smoothing=0.1))

    def theirs(i, t, s):
        return R.blip2_itc_reference(i, t, img_all.to(i.dtype), txt_all.to(i.dtype), 1 / s, rank)

    ins = [img, txt, torch.tensor(SCALE, device="cuda")]
    with _context(path):
        out = _grads(ours, ins, (0, 1, 2))
    ref = _grads(theirs, [x.double() for x in ins], (0, 1, 2))
    eager = _grads(theirs, [x if x.dim() else x.to(dtype) for x in ins], (0, 1, 2))
    for name, o, r, e in zip(("loss", "d image", "d text", "d scale"), out, ref, eager):
        assert_close(o, r, _tol(dtype), eager=e, scale=4.0, name=name)


@pytest.mark.parametrize("path", ["kernel", "blockwise", "materialized"])
def test_negatives_same_on_every_path(path):
    img, txt = _feats(1024, 32, 256, seed=3), _feats(1024, 256, seed=4)
    seed = torch.tensor(2024, device="cuda")
    with _context(path):
        got = mmkernels.sample_hard_negatives(img, txt, SCALE, seed=seed)
    want = R.negatives_reference(img.float(), txt.float(), torch.tensor(SCALE, device="cuda"),
                                 torch.arange(1024, device="cuda"), torch.arange(1024, device="cuda"),
                                 seed)
    assert (got != torch.arange(1024, device="cuda")).all()
    # bf16 products accumulate in another order than the reference's fp32 GEMM: a draw may
    # differ only where two keys are within rounding of each other
    assert (got == want).float().mean() > 0.99


@pytest.mark.parametrize("path", ["kernel", "blockwise"])
def test_no_host_sync_and_cuda_graph(path):
    b, k, d = 64, 4096, 256
    i, t, im, tm = (_feats(b, d, seed=s) for s in range(4))
    iq, tq = _feats(k, d, seed=4), _feats(k, d, seed=5)
    s = torch.tensor(SCALE, device="cuda", requires_grad=True)
    a = i.detach().requires_grad_()

    def step():
        loss = mmkernels.momentum_itc_loss(a, t, im, tm, s, alpha=0.4, image_queue=iq, text_queue=tq)
        loss.backward()
        neg = mmkernels.itm_hard_negatives(i, t, SCALE)
        return loss.detach(), neg

    with _context(path):
        sync_free(step)
        graph, (loss, _) = capture(lambda: mmkernels.momentum_itc_loss(
            i, t, im, tm, s.detach(), alpha=0.4, image_queue=iq, text_queue=tq))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(loss, R.momentum_itc_reference(i.double(), t.double(), im.double(), tm.double(),
                                                iq.double(), tq.double(), 1 / SCALE, 0.4), torch.bfloat16)


def test_memory_bound_against_as_written():
    """ALBEF's form at B = 256 with the 57,600 queue and BLIP-2's at 1024 x 8192 x 32: the extra
    memory of the kernels is O((N + M) * D) and at most 2% of the as-written objective's."""
    def extra(fn, *args):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(*args).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    b, k, d = 256, 57600, 256
    i, t, im, tm = (_feats(b, d, seed=s).requires_grad_(s < 2) for s in range(4))
    iq, tq = _feats(k, d, seed=4), _feats(k, d, seed=5)
    s = torch.tensor(SCALE, device="cuda", requires_grad=True)
    with mmkernels.backend("triton"):
        ours = extra(lambda: mmkernels.momentum_itc_loss(i, t, im, tm, s, alpha=0.4, image_queue=iq,
                                                          text_queue=tq))
    theirs = extra(lambda: R.momentum_itc_reference(i, t, im, tm, iq, tq, 1 / s, 0.4))
    assert ours <= 0.02 * theirs, f"ALBEF: {ours / 2**20:.1f} MiB vs {theirs / 2**20:.1f} MiB"

    n, m, q = 1024, 8192, 32
    img, txt_all = _feats(n, q, d, seed=6).requires_grad_(), _feats(m, d, seed=7)
    with mmkernels.backend("triton"):
        ours = extra(lambda: mmkernels.infonce_loss(img, txt_all, s, label_smoothing=0.1))
    small = 1024  # the as-written [n, m, 32] products at m = 1024, scaled by m
    theirs = extra(lambda: torch.nn.functional.cross_entropy(
        torch.matmul(img.unsqueeze(1), txt_all[:small].unsqueeze(-1)).squeeze(-1).max(-1).values * s,
        torch.arange(n, device="cuda") % small, label_smoothing=0.1)) * (m / small)
    assert ours <= 0.02 * theirs, f"BLIP-2: {ours / 2**20:.1f} MiB vs {theirs / 2**20:.1f} MiB"


def test_torch_compile_triton_path():
    img, txt = _feats(512, 32, 256, seed=8), _feats(512, 256, seed=9)
    fn = torch.compile(lambda x, y: mmkernels.blip2_itc_loss(x, y, SCALE), fullgraph=True)
    with mmkernels.backend("triton"):
        out = fn(img, txt)
    want = R.blip2_itc_reference(img.double(), txt.double(), img.double(), txt.double(), 0.07, 0)
    assert_close(out, want, torch.bfloat16)
