"""PyTorch's fused attention is not chosen under ``auto`` for float32 inputs that need gradients
(its backward loses the twice-eager rule at large scores), yet ``use_path`` still runs it."""
import pytest
import torch

import mmkernels
from mmkernels import _dispatch
from mmkernels.attention import paths as attention_paths
from mmkernels.cross_attention import paths as cross_paths


def _qkv(dtype, grad):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=g).to(dtype) for _ in range(3))
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


@pytest.mark.parametrize("dtype, grad, blocked", [
    (torch.float32, True, True), (torch.float32, False, False),
    (torch.bfloat16, True, False), (torch.float16, True, False)])
def test_sdpa_eligibility(dtype, grad, blocked):
    q, k, v = _qkv(dtype, grad)
    for why in (attention_paths.eligibility(q, k, v, None, 8 ** -0.5, False)["sdpa"],
                cross_paths.eligibility(q, k, v, None, 8 ** -0.5, 0.0, None, False)["sdpa"]):
        assert isinstance(why, _dispatch.NotForAuto) == blocked, why
    with torch.no_grad():
        assert attention_paths.eligibility(q, k, v, None, 8 ** -0.5, False)["sdpa"] is None


def test_auto_skips_sdpa_but_use_path_runs_it():
    q, k, v = _qkv(torch.float32, True)
    with _dispatch.pretend_device("cuda-sm90"), mmkernels.explain() as log:
        mmkernels.cross_attention(q, k, v)
    assert log.paths() != ["sdpa"]
    assert "SDPA's backward" in str(log)
    with mmkernels.use_path("sdpa"), mmkernels.explain() as log:
        out = mmkernels.cross_attention(q, k, v)
    assert log.paths() == ["sdpa"]
    out.sum().backward()
    assert q.grad is not None


def test_a_path_that_cannot_run_still_says_so_under_use_path():
    """The NotForAuto reason never hides a reason the path cannot run the call at all."""
    q, k, v = _qkv(torch.float32, True)
    mask = mmkernels.MultimodalMask.blip2(4, torch.tensor([12, 9]), 12, "itg")
    with pytest.raises(_dispatch.PathUnavailable, match="SDPA serves"):
        with mmkernels.use_path("sdpa"):
            mmkernels.multimodal_attention(q, k, v, mask)
