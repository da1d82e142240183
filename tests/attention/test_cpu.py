"""The C++ CPU attention kernels (mmkernels._C.attention_fwd / attention_bwd) against the dense reference.

These call the extension directly (no dispatch, no autograd wrapper) and pin the kernel interface of
``mmkernels.attention.ops`` (its module docstring). The reference (mmkernels.attention.reference) materialises the
scores and the dense mask in float64; its gradients come from autograd with a random upstream
gradient. For 16-bit and float32 inputs "eager" is the same reference evaluated in the input dtype,
which sets the allowance of mmkernels.testing.numerics.assert_close.
"""
import math

import pytest
import torch

from mmkernels import _ext
from mmkernels.attention.mask import BLOCKED, CAUSAL, FULL, SPAN, MultimodalMask
from mmkernels.attention.reference import multimodal_attention_reference as reference
from mmkernels.testing import cpp
from tests.helpers.attention_checks import check_outputs

C = cpp.kernels()


def meta_of(mask):
    if mask is None:
        return []
    return [mask.q_mod, mask.k_mod, mask.q_seg, mask.k_seg, mask.q_pos, mask.k_pos, mask.q_run,
            mask.k_run, mask.rules]


def ref_all(q, k, v, mask, scale, dout, dtype):
    """(out, lse, dq, dk, dv) of the reference with inputs in ``dtype`` (autograd)."""
    qr, kr, vr = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = reference(qr, kr, vr, mask, scale=scale, return_lse=True)
    dq, dk, dv = torch.autograd.grad(out, (qr, kr, vr), dout.to(dtype))
    return out, lse, dq, dk, dv


def run_case(q, k, v, mask=None, scale=None, seed=0):
    """Run forward and backward on (q, k, v) as given (any dtype/strides) and compare."""
    dtype = q.dtype
    d = q.shape[-1]
    s = 1.0 / math.sqrt(d) if scale is None else scale
    meta = meta_of(mask)
    out, lse, row_max, row_sum = C.attention_fwd(q, k, v, meta, s)
    assert out.dtype == dtype and out.shape == q.shape
    for t in (lse, row_max, row_sum):
        assert t.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert t.shape == q.shape[:3]
    seen = row_sum > 0
    assert bool(torch.equal(seen, torch.isfinite(lse)))
    assert bool(torch.allclose(lse[seen], (row_max + torch.log(row_sum))[seen]))
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64).to(dtype)
    dq, dk, dv = C.attention_bwd(q, k, v, out, row_max, row_sum, dout, meta, s)
    assert (dq.dtype, dk.dtype, dv.dtype) == (dtype,) * 3
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert bool(torch.isfinite(t).all()), f"{name} has non-finite values"

    r = ref_all(q, k, v, mask, s, dout, torch.float64)
    e = None if dtype == torch.float64 else ref_all(q, k, v, mask, s, dout, dtype)
    check_outputs((out, lse, dq, dk, dv), r, e, dtype)
    return out, lse, dq, dk, dv


def rand_qkv(b, hq, hkv, sq, sk, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


# ----------------------------------------------------------------------------- masks

def masks(s):
    """(name, mask) for the builders at sequence length ``s`` (batch 2)."""
    g = torch.Generator().manual_seed(s)
    out = [
        ("none", None),
        ("causal", MultimodalMask.causal(2, s)),
        ("key_padding", MultimodalMask.key_padding([s, max(1, s // 2)], s)),
        ("prefix_lm", MultimodalMask.prefix_lm([min(s, 3), s // 3], [s, max(1, 2 * s // 3)], s)),
    ]
    nq = min(s, 5)
    for obj in ("itc", "itm", "itg"):
        out.append((f"blip2_{obj}", MultimodalMask.blip2(nq, [s - nq, (s - nq) // 2], s - nq, obj)))
    out.append(("beit3", MultimodalMask.beit3_captioning(nq, [s - nq, (s - nq) // 3], s - nq)))
    mod = (torch.rand(2, s, generator=g) < 0.4).to(torch.int32)
    out.append(("image_spans", MultimodalMask.image_spans_in_causal(mod)))
    return out


def packed_mask(s, causal):
    cuts = sorted({0, s // 5, s // 2, s - s // 7})
    cu = torch.tensor(cuts + [s - 1 if s > 2 else s], dtype=torch.int32)
    cu = torch.unique(cu)  # sorted, non-decreasing; the last token(s) may be padding
    return MultimodalMask.packed(cu, causal=causal, seq_len=s)


def random_mask(b, s, nm, seed, positions=False):
    g = torch.Generator().manual_seed(seed)
    rules = torch.randint(0, 4, (nm, nm), generator=g, dtype=torch.int8)
    mod = torch.randint(0, nm, (b, s), generator=g, dtype=torch.int32)
    seg = torch.randint(-1, 3, (b, s), generator=g, dtype=torch.int32).sort(dim=1).values
    pos = torch.stack([torch.randperm(s, generator=g) for _ in range(b)]).to(torch.int32) if positions else None
    return MultimodalMask(mod, rules, segment_ids=seg, positions=pos)


@pytest.mark.parametrize("s", [1, 7, 97, 129])
def test_builders_fp64(s):
    for name, mask in masks(s):
        b = 2 if mask is not None else 1
        q, k, v = rand_qkv(b, 2, 2, s, s, 16, seed=s)
        try:
            run_case(q, k, v, mask)
        except AssertionError as exc:
            raise AssertionError(f"{name}, S={s}: {exc}") from exc


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("s", [7, 200])
def test_packed(s, causal):
    mask = packed_mask(s, causal)
    q, k, v = rand_qkv(1, 2, 1, s, s, 16, seed=3)
    run_case(q, k, v, mask)


@pytest.mark.parametrize("seed", range(6))
def test_random_rules(seed):
    s = [33, 97, 150][seed % 3]
    mask = random_mask(2, s, 3 + seed % 2, seed, positions=seed >= 3)
    q, k, v = rand_qkv(2, 2, 1, s, s, 16, seed=seed)
    run_case(q, k, v, mask)


@pytest.mark.parametrize("sq,sk", [(1, 130), (7, 70), (65, 129), (97, 300)])
def test_queries_are_last_keys(sq, sk):
    g = torch.Generator().manual_seed(sq)
    q, k, v = rand_qkv(2, 4, 2, sq, sk, 16, seed=sk)
    run_case(q, k, v, None)
    causal = MultimodalMask(torch.zeros(2, sq, dtype=torch.int32), [[CAUSAL]],
                            key_modality_ids=torch.zeros(2, sk, dtype=torch.int32))
    run_case(q, k, v, causal)
    # multimodal with segments: prefix of images (mod 1, SPAN) then text (mod 0, causal); padding at the end
    k_mod = (torch.rand(2, sk, generator=g) < 0.5).to(torch.int32)
    k_seg = torch.zeros(2, sk, dtype=torch.int32)
    k_seg[1, sk - sk // 4:] = -1
    k_seg[0, : sk // 3] = 1
    mm = MultimodalMask(k_mod[:, sk - sq:], [[CAUSAL, FULL], [BLOCKED, SPAN]], key_modality_ids=k_mod,
                        key_segment_ids=k_seg)
    run_case(q, k, v, mm)


def test_more_queries_than_keys_no_mask():
    q, k, v = rand_qkv(1, 2, 2, 70, 9, 16)
    run_case(q, k, v, None)


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1), (3, 3)])
def test_gqa(hq, hkv):
    s = 97
    mask = MultimodalMask.image_spans_in_causal((torch.arange(s) % 11 < 4).to(torch.int32)[None].expand(2, s))
    q, k, v = rand_qkv(2, hq, hkv, s, s, 16, seed=hq * 10 + hkv)
    run_case(q, k, v, mask)


@pytest.mark.parametrize("d", [16, 64, 88])
def test_head_dims(d):
    s = 129
    q, k, v = rand_qkv(1, 2, 1, s, s, d, seed=d)
    run_case(q, k, v, MultimodalMask.prefix_lm([40], [120], s))
    run_case(q, k, v, None, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", ["none", "causal", "blip2_itg", "image_spans"])
def test_dtypes(dtype, name):
    s = 129
    mask = dict(masks(s))[name]
    b = 1 if mask is None else 2
    q, k, v = rand_qkv(b, 4, 2, s, s, 64, dtype=dtype, seed=7)
    run_case(q, k, v, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fully_masked_rows(dtype):
    s = 70
    # sample 0 is all padding (every row sees nothing); sample 1 has 20 real tokens
    mask = MultimodalMask.key_padding([0, 20], s)
    q, k, v = rand_qkv(2, 2, 2, s, s, 16, dtype=dtype, seed=5)
    out, lse, dq, dk, dv = run_case(q, k, v, mask)
    assert bool((out[0] == 0).all()) and bool((out[1, :, 20:] == 0).all())
    assert bool(torch.isneginf(lse[0]).all()) and bool(torch.isneginf(lse[1, :, 20:]).all())
    assert bool(torch.isfinite(lse[1, :, :20]).all())
    for t in (dq, dk, dv):
        assert bool((t[0] == 0).all()) and bool((t[1, :, 20:] == 0).all())
    # a rule table under which a modality sees nothing at all
    mod = (torch.arange(s) >= 30).to(torch.int32)[None]
    mask = MultimodalMask(mod, [[FULL, BLOCKED], [BLOCKED, BLOCKED]])
    q, k, v = rand_qkv(1, 2, 1, s, s, 16, dtype=dtype, seed=6)
    out, lse, dq, _, _ = run_case(q, k, v, mask)
    assert bool((out[:, :, 30:] == 0).all()) and bool(torch.isneginf(lse[:, :, 30:]).all())
    assert bool((dq[:, :, 30:] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous(dtype):
    b, h, hkv, s, d = 2, 4, 2, 97, 32
    g = torch.Generator().manual_seed(11)
    q = torch.randn(b, s, h, d, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
    k = torch.randn(b, s, hkv, d, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
    v = torch.randn(b, hkv, s, 2 * d, generator=g, dtype=torch.float64).to(dtype)[..., ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    mask = MultimodalMask.blip2(9, [88, 40], 88, "itg")
    out_nc = run_case(q, k, v, mask)
    out_c = run_case(q.contiguous(), k.contiguous(), v.contiguous(), mask)
    for a, c in zip(out_nc, out_c):
        assert torch.equal(a, c)


def test_tiles_skip_and_match_dense():
    """A long causal sequence (many empty tiles) and a packed one; float32 against float64."""
    s = 300
    q, k, v = rand_qkv(1, 2, 2, s, s, 32, dtype=torch.float32, seed=2)
    run_case(q, k, v, MultimodalMask.causal(1, s))
    run_case(q, k, v, packed_mask(s, True))


def test_bad_meta():
    q, k, v = rand_qkv(1, 1, 1, 8, 8, 16)
    mask = MultimodalMask.causal(1, 8)
    with pytest.raises(RuntimeError):
        C.attention_fwd(q, k, v, meta_of(mask)[:5], 0.25)
    with pytest.raises(RuntimeError):
        C.attention_fwd(q, k, v, meta_of(MultimodalMask.causal(1, 9)), 0.25)
    with pytest.raises(RuntimeError):
        C.attention_fwd(q, k[:, :, :, :8], v, [], 0.25)


@pytest.mark.parametrize("threads", [1, 3])
def test_backward_paths(threads):
    """The backward runs one fused pass over (batch, kv head) when there are at least two such pairs
    per thread and two passes (dq; dk/dv) otherwise; both must agree with the reference."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        mask = MultimodalMask.beit3_captioning(20, [60, 17], 60)
        q, k, v = rand_qkv(2, 4, 2, 80, 80, 16, seed=threads)
        run_case(q, k, v, mask)
        q, k, v = rand_qkv(2, 4, 2, 80, 80, 16, dtype=torch.float32, seed=threads)
        run_case(q, k, v, mask)
    finally:
        torch.set_num_threads(old)


def test_aten_gemm_fallback():
    """With BLAS switched off (``_ext.cpu_blas(False)``) the GEMMs take their ATen fallback (the path
    of a torch that exports no sgemm_/dgemm_); it must give the same results."""
    with _ext.cpu_blas(False):
        q, k, v = rand_qkv(2, 4, 2, 97, 97, 16, seed=1)
        run_case(q, k, v, MultimodalMask.causal(2, 97))
        q, k, v = rand_qkv(1, 2, 1, 70, 130, 32, dtype=torch.float32, seed=2)
        run_case(q, k, v, None)
        assert C.set_cpu_blas(False) is False  # the switch is off inside the block
    assert C.set_cpu_blas(True) is True  # and restored on exit
