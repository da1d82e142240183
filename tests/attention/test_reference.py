"""multimodal_attention_reference: against SDPA with the dense mask in float64, GQA, lse,
fully masked rows (output 0, lse -inf, zero gradient, no NaN), gradcheck, and bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmkernels.attention import FULL, MultimodalMask, multimodal_attention_reference
from mmkernels.testing.numerics import assert_close


def qkv(b, hq, hkv, sq, sk, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def sdpa_dense(q, k, v, mask, scale=None):
    """SDPA with the dense boolean mask and k/v expanded per query head (float64, math path)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    attn_mask = None if mask is None else mask.to_dense()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def lse_dense(q, k, mask, scale):
    group = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(group, dim=1).transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask.to_dense(), float("-inf"))
    return torch.logsumexp(s, dim=-1)


MASKS = {
    "none": lambda b, s: None,
    "causal": lambda b, s: MultimodalMask.causal(b, s),
    "padding": lambda b, s: MultimodalMask.key_padding(torch.arange(b) * 3 + 1, s),
    "prefix_lm": lambda b, s: MultimodalMask.prefix_lm(torch.full((b,), 3), torch.full((b,), s - 1), s),
    "blip2_itg": lambda b, s: MultimodalMask.blip2(4, torch.arange(b) + s - 6, s - 4, objective="itg"),
    "image_spans": lambda b, s: MultimodalMask.image_spans_in_causal(
        (torch.arange(s)[None].expand(b, s) // 3) % 2),
}


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (3, 1)])
def test_matches_sdpa_on_rows_that_see_something(name, hq, hkv):
    b, s, d = 2, 13, 16
    q, k, v = qkv(b, hq, hkv, s, s, d, seed=hq + hkv)
    mask = MASKS[name](b, s)
    out, lse = multimodal_attention_reference(q, k, v, mask, return_lse=True)
    assert out.dtype == torch.float64 and out.shape == (b, hq, s, d) and lse.shape == (b, hq, s)
    want = sdpa_dense(q, k, v, mask)
    sees = torch.ones(b, 1, s, dtype=torch.bool) if mask is None else mask.to_dense()[:, :, :, :].any(-1)
    sees = sees.expand(b, hq, s)
    assert_close(out[sees], want[sees])
    assert_close(lse[sees], lse_dense(q, k, mask, 1 / math.sqrt(d))[sees])
    assert (out[~sees] == 0).all() and torch.isneginf(lse[~sees]).all()
    assert not torch.isnan(out).any()


def test_gqa_head_mapping():
    # query head h uses kv head h // (Hq // Hkv): compare head by head with plain MHA
    b, hq, hkv, s, d = 1, 6, 2, 9, 8
    q, k, v = qkv(b, hq, hkv, s, s, d, seed=3)
    mask = MultimodalMask.causal(b, s)
    out = multimodal_attention_reference(q, k, v, mask)
    for h in range(hq):
        kv = h // (hq // hkv)
        one = multimodal_attention_reference(q[:, h:h + 1], k[:, kv:kv + 1], v[:, kv:kv + 1], mask)
        assert_close(out[:, h:h + 1], one)


def test_sq_ne_sk_and_scale_and_strided_views():
    # BLIP-2 ITG decoding: 5 text queries over [4 query keys ; 5 text keys]
    b, h, sq, sk, d = 2, 2, 5, 9, 12
    k_mod = torch.tensor([[0] * 4 + [1] * 5] * b)
    mask = MultimodalMask(torch.ones(b, sq, dtype=torch.int64), [[FULL, 0], [FULL, 2]], key_modality_ids=k_mod)
    g = torch.Generator().manual_seed(5)
    # [B, S, H, D] storage viewed as [B, H, S, D]: non-contiguous
    q = torch.randn(b, sq, h, d, generator=g, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(b, sk, h, d, generator=g, dtype=torch.float64).transpose(1, 2)
    v = torch.randn(b, sk, h, d, generator=g, dtype=torch.float64).transpose(1, 2)
    assert not q.is_contiguous()
    out, lse = multimodal_attention_reference(q, k, v, mask, scale=0.3, return_lse=True)
    assert_close(out, sdpa_dense(q, k, v, mask, scale=0.3))
    assert_close(lse, lse_dense(q, k, mask, 0.3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_against_float64(dtype):
    b, hq, hkv, s, d = 2, 4, 2, 17, 16
    q, k, v = qkv(b, hq, hkv, s, s, d, seed=7)
    mask = MultimodalMask.blip2(5, [12, 3], 12, objective="itg")
    lo = [t.to(dtype) for t in (q, k, v)]
    out, lse = multimodal_attention_reference(*lo, mask, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    # inputs are rounded to dtype: compare against the float64 computation on those rounded inputs
    ref_r, ref_lse_r = multimodal_attention_reference(*(t.double() for t in lo), mask, return_lse=True)
    assert_close(out, ref_r)
    fin = torch.isfinite(ref_lse_r)
    assert_close(lse[fin], ref_lse_r[fin], torch.float32, scale=10)
    assert torch.equal(torch.isneginf(lse), ~fin)


def fully_masked_case():
    # sample 0: 2 padding text rows; sample 1: every row padding except the 3 queries
    return MultimodalMask.blip2(3, torch.tensor([2, 0]), 4, objective="itg")


def test_fully_masked_rows_forward_and_backward():
    mask = fully_masked_case()
    b, sq, sk = mask.shape
    q, k, v = qkv(b, 4, 2, sq, sk, 8, seed=11)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = multimodal_attention_reference(q, k, v, mask, return_lse=True)
    sees = mask.to_dense()[:, 0].any(-1)                          # [B, Sq]
    assert (~sees).sum() == 2 + 4
    dead = (~sees)[:, None, :].expand_as(lse)
    assert (out[dead] == 0).all() and torch.isneginf(lse[dead]).all()
    g = torch.Generator().manual_seed(1)
    go = torch.randn(out.shape, generator=g, dtype=out.dtype)
    gl = torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    # a finite loss that also uses lse where it is finite
    loss = (out * go).sum() + torch.where(torch.isfinite(lse), lse * gl, torch.zeros_like(lse)).sum()
    loss.backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[dead] == 0).all()
    # keys seen by nobody (padding) get zero dk, dv
    unseen = ~mask.to_dense()[:, 0].any(1)                       # [B, Sk]
    kd = unseen[:, None, :].expand(b, 2, sk)
    assert (k.grad[kd] == 0).all() and (v.grad[kd] == 0).all()
    # gradients equal those of SDPA where dead rows are given some visible key (so SDPA has no NaN)
    # and their output is multiplied by 0: only live rows contribute, as in the reference
    q1, k1, v1, q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v, q, k, v))
    (multimodal_attention_reference(q1, k1, v1, mask) * go).sum().backward()
    dense_mask = mask.to_dense() | (~sees)[:, None, :, None]
    group = 2
    ref = F.scaled_dot_product_attention(q2, k2.repeat_interleave(group, 1), v2.repeat_interleave(group, 1),
                                         attn_mask=dense_mask)
    (ref * sees[:, None, :, None] * go).sum().backward()
    for name, a, r in (("dq", q1, q2), ("dk", k1, k2), ("dv", v1, v2)):
        assert_close(a.grad, r.grad, name=name)


def test_all_rows_masked_gives_zeros_and_zero_grads():
    mask = MultimodalMask.key_padding([0, 0], 5)
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 2, 5, 5, 4))
    out, lse = multimodal_attention_reference(q, k, v, mask, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out.sum().backward()
    for t in (q, k, v):
        assert (t.grad == 0).all()


def test_gradcheck_float64():
    mask = fully_masked_case()
    b, sq, sk = mask.shape
    q, k, v = (t.requires_grad_() for t in qkv(b, 2, 1, sq, sk, 3, seed=2))

    def fn(q, k, v):
        out, lse = multimodal_attention_reference(q, k, v, mask, return_lse=True)
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_mask_none_is_full_attention():
    q, k, v = qkv(1, 2, 2, 6, 10, 8, seed=4)
    assert_close(multimodal_attention_reference(q, k, v), F.scaled_dot_product_attention(q, k, v))


# ----------------------------------------------------------------------------- bad input

Q, K, V = qkv(2, 4, 2, 5, 7, 8, dtype=torch.float32)


@pytest.mark.parametrize("args,kwargs,err,match", [
    ((Q[0], K, V), {}, ValueError, "q must have 4 dimensions"),
    ((Q, K[0], V), {}, ValueError, "k must have 4 dimensions"),
    ((Q, K, V.double()), {}, TypeError, "dtype"),
    ((Q.long(), K.long(), V.long()), {}, TypeError, "float32, bfloat16"),
    ((Q, K, V[..., :4]), {}, ValueError, "same shape"),
    ((Q, K[..., :4], V[..., :4]), {}, ValueError, "head dim"),
    ((Q[:1], K, V), {}, ValueError, "batch size"),
    ((Q[:, :3], K, V), {}, ValueError, "multiple of the number of key/value heads"),
    ((Q[:, :, :0], K, V), {}, ValueError, "empty"),
    ((Q, K, V), {"mask": torch.ones(2, 1, 5, 7, dtype=torch.bool)}, TypeError, "MultimodalMask"),
    ((Q, K, V), {"mask": MultimodalMask.causal(2, 7)}, ValueError, r"mask has shape"),
    ((Q, K, V), {"scale": "0.1"}, TypeError, "scale"),
    ((Q, K.to("meta"), V.to("meta")), {}, ValueError, "device"),
])
def test_bad_input(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        multimodal_attention_reference(*args, **kwargs)


def test_mask_on_other_device():
    mask = MultimodalMask(torch.zeros(2, 5, dtype=torch.int64), [[FULL]],
                          key_modality_ids=torch.zeros(2, 7, dtype=torch.int64)).to("meta")
    with pytest.raises(ValueError, match="mask.to"):
        multimodal_attention_reference(Q, K, V, mask)
