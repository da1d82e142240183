"""Launch budgets of the Triton kernel paths of attention, cross-attention and the experts:
fwd+bwd launches the same number of kernels whatever the size, within a small bound (counted
through the interpreter with mmkernels.testing.launches; the contrastive budget is in
tests/contrastive/test_launches.py)."""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels import _backend
from mmkernels.testing.launches import count_launches

pytestmark = [
    pytest.mark.skipif(not (_backend.TRITON_AVAILABLE and _backend.TRITON_INTERPRET),
                       reason="needs TRITON_INTERPRET=1"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]


def _leaf(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_()


def _launches(fn, *tensors) -> int:
    with mmkernels.backend("triton"), count_launches() as c:
        out = fn(*tensors)
        (out * torch.ones_like(out)).sum().backward()
    return c


def _count_without_loss(c) -> int:
    """The op's own launches: the test's ``ones_like``, product, sum and autograd seed removed."""
    return c.total - 4


@pytest.mark.parametrize("mask", ["causal", "blip2"])
def test_attention_launches_do_not_grow_with_length(mask, monkeypatch):
    # the tile map as on CUDA: one Triton launch (on CPU tensors it is made of torch ops)
    from mmkernels.attention.tile_kernel import tile_map_triton
    monkeypatch.setattr(mmkernels.MultimodalMask, "tile_map",
                        lambda self, bm, bn: tile_map_triton(self.metadata(), bm, bn))
    totals = []
    for s in (32, 160):
        q, k, v = (_leaf(1, 2, s, 16, seed=i) for i in range(3))
        m = (mmkernels.MultimodalMask.causal(1, s) if mask == "causal"
             else mmkernels.MultimodalMask.blip2(8, torch.tensor([s - 20]), s - 8, objective="itg"))
        c = _launches(lambda a, b, c_: mmkernels.multimodal_attention(a, b, c_, m), q, k, v)
        totals.append(_count_without_loss(c))
    assert totals[0] == totals[1], totals
    assert totals[0] <= 8, c.summary()


def test_cross_attention_launches_do_not_grow_with_keys():
    totals = []
    for lk in (40, 257):
        q = _leaf(2, 2, 8, 16, seed=0)
        k, v = _leaf(2, 2, lk, 16, seed=1), _leaf(2, 2, lk, 16, seed=2)
        c = _launches(lambda a, b, c_: mmkernels.cross_attention(a, b, c_), q, k, v)
        totals.append(_count_without_loss(c))
    assert totals[0] == totals[1], totals
    assert totals[0] <= 6, c.summary()


@pytest.mark.parametrize("split", [True, False], ids=["split", "ids"])
def test_expert_ffn_launches_do_not_grow_with_tokens(split):
    totals = []
    for s in (24, 96):
        x = _leaf(2, s, 16, seed=0)
        w_in, w_out = _leaf(2, 32, 16, seed=1), _leaf(2, 16, 32, seed=2)
        ids = s // 3 if split else (torch.arange(2 * s).reshape(2, s) % 2)
        c = _launches(lambda x_, a, b: mmkernels.modality_ffn(x_, ids, a, None, b, None), x, w_in, w_out)
        totals.append(_count_without_loss(c))
    # small calls may add the zero fill of an expert's chunked weight gradient; never more
    # launches for more tokens
    assert totals[1] <= totals[0] <= 16, (totals, c.summary())
