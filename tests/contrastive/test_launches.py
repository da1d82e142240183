"""Launch budget: the fused triton path's fwd+bwd launches at most 10 kernels whatever N; the
blockwise path a small constant per block (counted with mmkernels.testing.launches)."""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels import tuning
from mmkernels.contrastive import paths
from mmkernels.testing.launches import count_launches

from tests.contrastive.cases import features, have_backend, leaf

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]


def _count(fn, n, d=16, dtype=torch.float32, **kw):
    a, b = leaf(features(n, d, dtype, seed=1)), leaf(features(n, d, dtype, seed=2))
    s = torch.tensor(14.3, requires_grad=True)
    with count_launches() as c:
        fn(a, b, s, **kw).backward()
    return c


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_triton_path_launch_budget(dtype):
    if not have_backend("triton"):
        pytest.skip("needs the triton interpreter")
    counts = []
    for n in (64, 1024):
        with mmkernels.backend("triton"):
            c = _count(mmkernels.contrastive_loss, n, dtype=dtype, label_smoothing=0.1)
        assert c.total <= 10, c.summary()
        counts.append(c.total)
    assert counts[0] == counts[1]
    with mmkernels.backend("triton"):
        c = _count(lambda a, b, s: mmkernels.infonce_loss(a, b, s), 200)
    assert c.total <= 10, c.summary()


@pytest.mark.parametrize("arith", ["torch", "triton"])
def test_blockwise_launches_per_block(arith, monkeypatch):
    """Per block: the GEMM and the block's arithmetic (one light kernel with Triton) forward;
    backward the GEMM, one kernel, two GEMMs and an accumulation: bounded by a constant per
    block plus a constant per call."""
    if arith == "triton" and not have_backend("triton"):
        pytest.skip("needs the triton interpreter")
    monkeypatch.setattr(paths, "default_arith", lambda device, dtype: arith)
    n, d = 96, 16
    totals = {}
    for rows in (96, 32, 8):  # 1, 3 and 12 blocks
        with tuning.scope(), mmkernels.use_path("blockwise"):
            bpl = paths.block_bytes_per_logit(torch.device("cpu"), torch.float32, arith)
            tuning.set_option("memory_budget", rows * n * bpl)
            assert paths.block_rows(n, n, bpl) == rows
            c = _count(mmkernels.contrastive_loss, n, d)
        totals[n // rows] = c.total
    per_block = (totals[12] - totals[3]) / 9
    assert per_block == (totals[3] - totals[1]) / 2
    limit = 6 if arith == "triton" else 60  # torch arithmetic: CPU tensors, ops not launches
    assert per_block <= limit, totals
    assert totals[1] - per_block <= 40, totals
    print(arith, "launches by blocks:", totals, "per block:", per_block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_features_take_the_blocks_backward(dtype):
    """Where one grid would recompute the logits per feature chunk more than twice, ``auto``
    computes dq and dk as the blockwise path does (GEMMs over row blocks): same gradients as the
    one-grid backward, a few more launches for one block of rows (6 more per further block, see
    test_blockwise_launches_per_block)."""
    if not have_backend("triton"):
        pytest.skip("needs the triton interpreter")
    n, d = 48, 160
    grads, totals = {}, {}
    for mode in ("one_grid", "auto"):
        a, b = leaf(features(n, d, dtype, seed=3)), leaf(features(n, d, dtype, seed=4))
        s = torch.tensor(14.3, requires_grad=True)
        with tuning.scope(), mmkernels.backend("triton"):
            tuning.set_option("contrastive.backward", mode)
            with count_launches() as c:
                mmkernels.contrastive_loss(a, b, s).backward()
        grads[mode] = (a.grad, b.grad, s.grad)
        totals[mode] = c.total
    for got, want in zip(grads["auto"], grads["one_grid"]):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-4)
    assert totals["one_grid"] <= 10
    assert totals["one_grid"] < totals["auto"] <= totals["one_grid"] + 6, totals  # one block of rows
    with pytest.raises(ValueError, match="contrastive.backward"):
        tuning.set_option("contrastive.backward", "fast")
