"""multimodal_attention on every backend against the float64 reference, through the public API and the ops."""
from __future__ import annotations


import pytest
import torch

import mmkernels
from mmkernels import MultimodalMask
from mmkernels.attention import multimodal_attention_reference
from mmkernels.testing.numerics import assert_close

from tests.helpers.rss import peak_extra

BACKENDS = ["cpu", "triton"]


def _qkv(b, hq, hkv, sq, sk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def _run(backend, q, k, v, mask, dout, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if backend == "reference":
        out, lse = multimodal_attention_reference(q, k, v, mask, return_lse=True, **kw)
    else:
        with mmkernels.backend(backend):
            out, lse = mmkernels.multimodal_attention(q, k, v, mask, return_lse=True, **kw)
    out.backward(dout.to(out.dtype))
    return out, lse, q.grad, k.grad, v.grad


def _compare(backend, q, k, v, mask, **kw):
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    got = _run(backend, q, k, v, mask, dout, **kw)
    ref = _run("reference", q.double(), k.double(), v.double(), mask, dout, **kw)
    eager = _run("reference", q, k, v, mask, dout, **kw)
    for name, g, r, e in zip(("out", "lse", "dq", "dk", "dv"), got, ref, eager):
        assert g.dtype == (e.dtype if name != "lse" else torch.float32), name
        assert torch.isfinite(g[torch.isfinite(r)]).all(), name
        assert_close(g, r, q.dtype if name != "lse" else torch.float32, eager=e if name != "lse" else None,
                     scale=1.0 if name != "lse" else (4.0 if q.dtype == torch.float32 else 100.0), name=name)


MASKS = {
    "none": lambda b, s: None,
    "causal": lambda b, s: MultimodalMask.causal(b, s),
    "key_padding": lambda b, s: MultimodalMask.key_padding(torch.tensor([s, max(1, s // 2)][:b]), s),
    "prefix_lm": lambda b, s: MultimodalMask.prefix_lm([min(5, s), 2][:b], [s, max(1, s - 3)][:b], s),
    "blip2_itg": lambda b, s: MultimodalMask.blip2(min(8, s - 1) if s > 1 else 1, [s - min(8, s - 1), 3][:b],
                                                   s - (min(8, s - 1) if s > 1 else 1), objective="itg"),
    "beit3_captioning": lambda b, s: MultimodalMask.beit3_captioning(min(10, s - 1), [s - min(10, s - 1), 2][:b],
                                                                     s - min(10, s - 1)),
    "packed": lambda b, s: MultimodalMask.packed(torch.tensor([0, s // 3, s // 2, s]), seq_len=s),
}


def _require(backend):
    if backend == "cpu" and not hasattr(mmkernels._ext.C, "attention_fwd"):
        pytest.fail("the C++ attention kernels are not built")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(MASKS))
def test_masks_match_reference(backend, name):
    _require(backend)
    s = 37
    b = 1 if name == "packed" else 2
    mask = MASKS[name](b, s)
    if mask is not None:
        b = mask.shape[0]
    q, k, v = _qkv(b, 4, 2, s, s, 16, torch.float32, seed=1)
    _compare(backend, q, k, v, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("s,d", [(1, 16), (7, 88), (97, 64), (129, 16)])
def test_dtypes_and_odd_sizes_causal(backend, dtype, s, d):
    _require(backend)
    if backend == "triton" and s * d > 97 * 64 and dtype != torch.float32:
        s = 97  # the interpreter is slow; 97 still leaves a ragged last tile
    q, k, v = _qkv(1, 2, 1, s, s, d, dtype, seed=2)
    _compare(backend, q, k, v, MultimodalMask.causal(1, s))


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_spans_and_random_rules(backend):
    _require(backend)
    mods = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]])
    mask = MultimodalMask.image_spans_in_causal(mods)
    q, k, v = _qkv(1, 2, 2, 23, 23, 16, torch.float32, seed=3)
    _compare(backend, q, k, v, mask)
    g = torch.Generator().manual_seed(4)
    s = 41
    rules = torch.randint(0, 4, (3, 3), generator=g)
    seg = torch.sort(torch.randint(0, 3, (2, s), generator=g), dim=1).values
    seg[:, -4:] = -1
    mask = MultimodalMask(torch.randint(0, 3, (2, s), generator=g), rules, segment_ids=seg)
    q, k, v = _qkv(2, 2, 1, s, s, 16, torch.float32, seed=5)
    _compare(backend, q, k, v, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sq_differs_from_sk_blip2_itg_over_cached_query_keys(backend):
    """ITG text queries attend over cached query keys plus text keys (Sq < Sk)."""
    _require(backend)
    nq, nt = 8, 13
    full = MultimodalMask.blip2(nq, [nt, 9], nt, objective="itg")
    mask = MultimodalMask(full.q_mod[:, nq:], full.rules, key_modality_ids=full.k_mod,
                          key_segment_ids=full.k_seg)
    q, k, v = _qkv(2, 4, 4, nt, nq + nt, 16, torch.float32, seed=6)
    _compare(backend, q, k, v, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_fully_masked_rows(backend):
    _require(backend)
    base = torch.randn(2, 19, 4, 16, dtype=torch.float64).float()  # [B, S, H, D] -> [B, H, S, D] views
    q = base.transpose(1, 2)
    k = torch.randn(2, 19, 2, 16).transpose(1, 2)
    v = torch.randn(2, 19, 2, 16).transpose(1, 2)
    mask = MultimodalMask.key_padding(torch.tensor([19, 6]), 19)  # sample 1: rows 6.. see nothing
    _compare(backend, q, k, v, mask)
    with mmkernels.backend(backend):
        out = mmkernels.multimodal_attention(q, k, v, mask)
    assert (out[1, :, 6:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_fills_no_gradient_for_lse(backend):
    """lse [B, H, S] is saved for the backward and has no gradient: autograd must not fill a zero
    one on every backward (set_materialize_grads(False) on the op's context)."""
    from mmkernels.testing.fills import fills
    _require(backend)
    q, k, v = (t.requires_grad_() for t in _qkv(2, 2, 2, 24, 24, 16, torch.float32, seed=3))
    with mmkernels.backend(backend):
        out = mmkernels.multimodal_attention(q, k, v, MultimodalMask.causal(2, 24))
        filled = [(op, s) for op, s in fills(lambda: out.backward(torch.ones_like(out))) if s == (2, 2, 24)]
    assert not filled, filled
    assert q.grad is not None and k.grad is not None and v.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_attention_module(backend):
    _require(backend)
    torch.manual_seed(7)
    att = mmkernels.MultimodalSelfAttention(64, 4, 2)
    x = torch.randn(2, 21, 64)
    mask = MultimodalMask.prefix_lm([5, 3], [21, 17], 21)
    with mmkernels.backend(backend):
        y = att(x, mask)
    with mmkernels.backend("reference"):
        r = att(x.double().float(), mask)
    assert_close(y, r.double(), torch.float32, scale=4.0)


def test_gradcheck_float64_cpu():
    _require("cpu")
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, 6, 6, 3, torch.float64, seed=8))
    mask = MultimodalMask.prefix_lm([2], [5], 6)  # the last row sees nothing
    with mmkernels.backend("cpu"):
        assert torch.autograd.gradcheck(lambda a, b, c: mmkernels.multimodal_attention(a, b, c, mask), (q, k, v))


def test_opcheck_and_compile_cpu():
    _require("cpu")
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, 9, 9, 8, torch.float32, seed=9))
    mask = MultimodalMask.causal(1, 9)
    torch.library.opcheck(torch.ops.mmkernels.attention_fwd.default, (q, k, v, mask.metadata(), 0.3, "cpu"))
    torch.library.opcheck(torch.ops.mmkernels.attention_fwd.default, (q, k, v, [], 0.3, "cpu"))
    fn = torch.compile(lambda a, b, c: mmkernels.multimodal_attention(a, b, c, mask), fullgraph=True)
    with mmkernels.backend("cpu"):
        out = fn(q, k, v)
        out.sum().backward()
    assert_close(out, multimodal_attention_reference(q.double(), k.double(), v.double(), mask))


_MEMORY_BODY = """
import torch, mmkernels
from mmkernels.attention import multimodal_attention_reference

def setup(which, s):
    s = int(s)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, s, 64, requires_grad=True) for _ in range(3))
    return which, q, k, v, mmkernels.MultimodalMask.causal(1, s)

def run(state):
    which, q, k, v, mask = state
    for t in (q, k, v):
        t.grad = None
    if which == "reference":
        out = multimodal_attention_reference(q, k, v, mask)
    else:
        with mmkernels.backend(which):
            out = mmkernels.multimodal_attention(q, k, v, mask)
    out.sum().backward()
"""


def _extra(which, s):
    return peak_extra(_MEMORY_BODY, which, s)["extra"]


@pytest.mark.slow
def test_cpu_memory_grows_with_s_not_s_squared():
    """S = 4096, H = 4: the fp32 scores of the 4 heads alone are 256 MiB. The cpu backend
    (q/k/v gradients, out, per-thread tiles) stays far below one head's S x S scores; the
    reference holds several such tensors."""
    _require("cpu")
    ours, ref = _extra("cpu", 4096), _extra("reference", 4096)
    scores_bytes = 4 * 4096 * 4096 * 4
    assert ref >= scores_bytes, f"reference used only {ref / 2**20:.0f} MiB"
    assert ours <= scores_bytes / 2, f"cpu backend used {ours / 2**20:.0f} MiB"
    assert ours <= 0.1 * ref
