"""The PyTorch-op paths of multimodal_attention (sdpa, varlen, flex) against the float64 reference,
the mask kinds they read, and the dispatcher's choice per shape class."""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels import MultimodalMask, _dispatch
from mmkernels.attention import multimodal_attention_reference, paths
from mmkernels.attention.mask import KINDS
from mmkernels.testing.numerics import assert_close

from tests.helpers.rss import peak_extra


def _qkv(b, hq, hkv, sq, sk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def _run(path, q, k, v, mask, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if path == "reference":
        out = multimodal_attention_reference(q, k, v, mask)
    else:
        with mmkernels.use_path(path), mmkernels.explain() as log:
            out = mmkernels.multimodal_attention(q, k, v, mask)
        assert log.paths() == [path]
    out.backward(dout.to(out.dtype))
    return out, q.grad, k.grad, v.grad


def _compare_grad(path, q, k, v, mask):
    """Forward and backward of ``path`` against the float64 reference (2x-eager rule for 16-bit)."""
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    got = _run(path, q, k, v, mask, dout)
    ref = _run("reference", q.double(), k.double(), v.double(), mask, dout)
    eager = _run("reference", q, k, v, mask, dout)
    for name, g, r, e in zip(("out", "dq", "dk", "dv"), got, ref, eager):
        assert g.dtype == q.dtype, name
        assert torch.isfinite(g).all(), name
        assert_close(g, r, q.dtype, eager=e, name=name)
    return got


def _forward(path, q, k, v, mask):
    with torch.no_grad(), mmkernels.use_path(path), mmkernels.explain() as log:
        out = mmkernels.multimodal_attention(q, k, v, mask)
    assert log.paths() == [path]
    return out


# ----------------------------------------------------------------------------- mask kinds

BUILDERS = {
    "causal": lambda: MultimodalMask.causal(2, 9),
    "key_padding": lambda: MultimodalMask.key_padding([9, 12], 9),
    "prefix_lm": lambda: MultimodalMask.prefix_lm([3, 2], [9, 6], 9),
    "blip2": lambda: MultimodalMask.blip2(4, [5, 2], 5, objective="itg"),
    "instructblip": lambda: MultimodalMask.instructblip(4, [5, 2], 5),
    "beit3_captioning": lambda: MultimodalMask.beit3_captioning(4, [5, 2], 5),
    "packed": lambda: MultimodalMask.packed(torch.tensor([0, 3, 7]), seq_len=9),
    "image_spans": lambda: MultimodalMask.image_spans_in_causal(torch.tensor([[0, 1, 1, 0, 0, 1, 0, 0, 0]])),
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_builders_set_their_kind_and_to_keeps_it(kind):
    mask = BUILDERS[kind]()
    assert mask.kind == kind and kind in KINDS
    moved = mask.to("cpu")
    assert moved.kind == kind and moved.kind_params.keys() == mask.kind_params.keys()
    assert len(mask.metadata()) == 9
    assert MultimodalMask.from_metadata(mask.metadata()).kind == "custom"
    assert kind in repr(mask)


def test_kind_params_and_custom_masks():
    kp = MultimodalMask.key_padding(torch.tensor([9, 12, 0]), 9)
    assert kp.kind_params["lengths"].tolist() == [9, 9, 0]           # clamped to seq_len
    packed = MultimodalMask.packed(torch.tensor([0, 3, 7]), causal=False, seq_len=9)
    assert packed.kind_params["cu_seqlens"].tolist() == [0, 3, 7] and packed.kind_params["causal"] is False
    assert MultimodalMask.blip2(4, [5], 5, objective="itc").kind_params == {"objective": "itc"}
    assert MultimodalMask(torch.zeros(1, 5, dtype=torch.int32), [[1]]).kind == "custom"


def test_shape_classes():
    assert paths.shape_class("causal", 1024, 1024, 64) == "causal:s<=1024"
    assert paths.shape_class("causal", 1025, 1025, 64) == "causal:s>1024"
    assert paths.shape_class("blip2", 160, 160, 64) == "multimodal:s<=1024"
    assert paths.shape_class("none", 8, 2048, 128) == "none:s>1024"
    assert paths.mask_kind(None) == "none"
    assert paths.mask_kind(BUILDERS["prefix_lm"]()) == "multimodal"
    assert paths.mask_kind(BUILDERS["packed"]()) == "packed"
    assert paths.mask_kind(MultimodalMask.from_metadata(BUILDERS["causal"]().metadata())) == "multimodal"


# ----------------------------------------------------------------------------- sdpa

SDPA_MASKS = {
    "none": lambda b, s: None,
    "causal": lambda b, s: MultimodalMask.causal(b, s),
    # sample 1 has padded rows; sample 2 has no token at all (every row sees nothing)
    "key_padding": lambda b, s: MultimodalMask.key_padding(torch.tensor([s, max(1, s // 2), 0][:b]), s),
}


@pytest.mark.parametrize("name", sorted(SDPA_MASKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("s,d,hq,hkv", [(7, 88, 4, 2), (97, 96, 2, 2), (40, 16, 4, 1)])
def test_sdpa_forward_backward(name, dtype, s, d, hq, hkv):
    b = 3
    q, k, v = _qkv(b, hq, hkv, s, s, d, dtype, seed=s + d)
    out, dq, dk, dv = _compare_grad("sdpa", q, k, v, SDPA_MASKS[name](b, s))
    if name == "key_padding":
        half = max(1, s // 2)
        assert (out[1, :, half:] == 0).all() and (dq[1, :, half:] == 0).all()
        assert (dk[1, :, half:] == 0).all() and (dv[1, :, half:] == 0).all()
        for t in (out, dq, dk, dv):
            assert (t[2] == 0).all()


def test_sdpa_non_contiguous_views():
    base = torch.randn(2, 19, 4, 16, dtype=torch.float64).float()
    q = base.transpose(1, 2)
    k, v = (torch.randn(2, 19, 2, 16).transpose(1, 2) for _ in range(2))
    _compare_grad("sdpa", q, k, v, MultimodalMask.key_padding([19, 6], 19))


def test_sdpa_ineligible_cases_explain_why():
    q, k, v = _qkv(1, 2, 2, 9, 9, 16, torch.float32)
    with mmkernels.use_path("sdpa"):
        with pytest.raises(RuntimeError, match="dense mask"):
            mmkernels.multimodal_attention(q, k, v, MultimodalMask.prefix_lm([3], [9], 9))
        with pytest.raises(RuntimeError, match="log-sum-exp"):
            mmkernels.multimodal_attention(q, k, v, None, return_lse=True)
    # a causal-kind mask with Sq != Sk (made by hand): SDPA's is_causal would align it wrongly
    causal = MultimodalMask.causal(1, 9)
    odd = MultimodalMask(causal.q_mod[:, 4:], causal.rules, key_modality_ids=causal.k_mod)._tag("causal")
    why = paths.eligibility(q[:, :, 4:], k, v, odd, 0.25, False)["sdpa"]
    assert "Sq != Sk" in why


def test_sdpa_over_memory_budget_when_it_would_fall_back_to_math():
    """Dropout-free SDPA runs a fused kernel here; when PyTorch's selector says math (forced by
    the sdp_kernel switches), the Sq x Sk scores must fit the memory budget."""
    q, k, v = _qkv(1, 2, 2, 64, 64, 16, torch.float32)
    from mmkernels import tuning
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        assert paths.eligibility(q, k, v, None, 0.25, False)["sdpa"] is None
        with tuning.scope():
            tuning.set_option("memory_budget", 1024)
            assert "memory_budget" in paths.eligibility(q, k, v, None, 0.25, False)["sdpa"]


_MEMORY_BODY = """
import torch, mmkernels
from mmkernels.attention import multimodal_attention_reference

def setup(which, s):
    s = int(s)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, s, 64, requires_grad=True) for _ in range(3))
    return which, q, k, v, mmkernels.MultimodalMask.key_padding(torch.tensor([s - 100]), s)

def run(state):
    which, q, k, v, mask = state
    for t in (q, k, v):
        t.grad = None
    if which == "reference":
        out = multimodal_attention_reference(q, k, v, mask)
    else:
        with mmkernels.use_path(which):
            out = mmkernels.multimodal_attention(q, k, v, mask)
    out.sum().backward()
"""


@pytest.mark.slow
def test_sdpa_key_padding_memory_grows_with_s_not_s_squared():
    """S = 4096, H = 4: fp32 scores of the 4 heads are 256 MiB. The sdpa path (a [B, 1, 1, S]
    mask, SDPA's flash kernel) stays far below one head's scores; the reference holds several."""
    ours = peak_extra(_MEMORY_BODY, "sdpa", 4096)["extra"]
    ref = peak_extra(_MEMORY_BODY, "reference", 4096)["extra"]
    scores_bytes = 4 * 4096 * 4096 * 4
    assert ref >= scores_bytes, f"reference used only {ref / 2**20:.0f} MiB"
    assert ours <= scores_bytes / 8, f"sdpa path used {ours / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------- flex (forward on CPU)

def _image_spans(b, s):
    g = torch.Generator().manual_seed(3)
    mods = (torch.rand(b, s, generator=g) < 0.1).to(torch.int32)
    mods[:, 20:160] = 1                                      # one long image run across tiles
    return MultimodalMask.image_spans_in_causal(mods)


FLEX_MASKS = {
    "none": lambda b, s: None,
    "causal": lambda b, s: MultimodalMask.causal(b, s),
    "key_padding": lambda b, s: MultimodalMask.key_padding([s, 0][:b], s),
    "prefix_lm": lambda b, s: MultimodalMask.prefix_lm([150, 3][:b], [s, 200][:b], s),
    "blip2_itc": lambda b, s: MultimodalMask.blip2(32, [s - 32, 40][:b], s - 32, objective="itc"),
    "blip2_itg": lambda b, s: MultimodalMask.blip2(32, [s - 32, 140][:b], s - 32, objective="itg"),
    "beit3_captioning": lambda b, s: MultimodalMask.beit3_captioning(197, [s - 197, 5][:b], s - 197),
    "packed": lambda b, s: MultimodalMask.packed(torch.tensor([0, 100, 130, 260]), seq_len=s),
    "image_spans": _image_spans,
}


@pytest.mark.parametrize("name", sorted(FLEX_MASKS))
def test_flex_forward_matches_reference(name):
    """S = 300 spans three 128-row tiles: empty, full and partial tiles all occur."""
    s = 300
    mask = FLEX_MASKS[name](2, s)
    b = 2 if mask is None else mask.shape[0]
    q, k, v = _qkv(b, 4, 2, s, s, 32, torch.float32, seed=5)
    q.requires_grad_()                          # under no_grad the flex path still runs on CPU
    out = _forward("flex", q, k, v, mask)
    ref = multimodal_attention_reference(q.detach().double(), k.double(), v.double(), mask)
    assert torch.isfinite(out).all()
    assert_close(out, ref, torch.float32, scale=4.0)
    if name == "key_padding":
        assert (out[1] == 0).all()


def test_flex_sq_differs_from_sk_and_random_rules():
    nq, nt = 40, 200
    full = MultimodalMask.blip2(nq, [nt, 90], nt, objective="itg")
    mask = MultimodalMask(full.q_mod[:, nq:], full.rules, key_modality_ids=full.k_mod, key_segment_ids=full.k_seg)
    q, k, v = _qkv(2, 2, 2, nt, nq + nt, 16, torch.float32, seed=6)
    assert_close(_forward("flex", q, k, v, mask),
                 multimodal_attention_reference(q.double(), k.double(), v.double(), mask), torch.float32, scale=4.0)
    g = torch.Generator().manual_seed(4)
    s = 200
    seg = torch.sort(torch.randint(0, 3, (2, s), generator=g), dim=1).values
    seg[:, -10:] = -1
    mask = MultimodalMask(torch.randint(0, 3, (2, s), generator=g), torch.randint(0, 4, (3, 3), generator=g),
                          segment_ids=seg)
    q, k, v = _qkv(2, 2, 2, s, s, 16, torch.float32, seed=7)
    assert_close(_forward("flex", q, k, v, mask),
                 multimodal_attention_reference(q.double(), k.double(), v.double(), mask), torch.float32, scale=4.0)


def test_flex_head_dim_88_bf16():
    mask = MultimodalMask.prefix_lm([50], [140], 150)
    q, k, v = _qkv(1, 2, 2, 150, 150, 88, torch.bfloat16, seed=8)
    out = _forward("flex", q, k, v, mask)
    ref = multimodal_attention_reference(q.double(), k.double(), v.double(), mask)
    eager = multimodal_attention_reference(q, k, v, mask)
    assert_close(out, ref, torch.bfloat16, eager=eager)


def test_block_mask_from_tile_map():
    """Empty tiles dropped, full tiles listed as full blocks, partial ones as mask_mod blocks."""
    mask = MultimodalMask.packed(torch.tensor([0, 128, 300]), causal=True, seq_len=384)
    tiles = mask.tile_map(128, 128)[0]
    bm = paths.block_mask(mask)
    kv_num, kv_idx = bm.kv_num_blocks[0, 0], bm.kv_indices[0, 0]
    full_num, full_idx = bm.full_kv_num_blocks[0, 0], bm.full_kv_indices[0, 0]
    for i in range(tiles.shape[0]):
        partial = sorted(kv_idx[i, :kv_num[i]].tolist())
        full = sorted(full_idx[i, :full_num[i]].tolist())
        assert partial == torch.where(tiles[i] == 2)[0].tolist()
        assert full == torch.where(tiles[i] == 1)[0].tolist()


def test_flex_ineligible_on_cpu_with_gradients():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2, 9, 9, 16, torch.float32))
    with mmkernels.use_path("flex"), pytest.raises(RuntimeError, match="no backward on CPU"):
        mmkernels.multimodal_attention(q, k, v, MultimodalMask.causal(1, 9))
    with torch.no_grad():
        assert paths.eligibility(q, k, v, None, 0.25, True)["flex"].endswith("log-sum-exp")
    assert "float32" in paths.eligibility(q.double(), k.double(), v.double(), None, 0.25, False)["flex"]


# ----------------------------------------------------------------------------- varlen (CUDA only)

def test_varlen_ineligible_on_cpu_and_for_other_masks():
    q, k, v = _qkv(1, 2, 2, 9, 9, 16, torch.bfloat16)
    why = paths.eligibility(q, k, v, MultimodalMask.packed(torch.tensor([0, 4, 9])), 0.25, False)["varlen"]
    assert "CUDA only" in why
    assert "packed masks" in paths.eligibility(q, k, v, MultimodalMask.causal(1, 9), 0.25, False)["varlen"]
    with mmkernels.use_path("varlen"), pytest.raises(RuntimeError, match="CUDA only"):
        mmkernels.multimodal_attention(q, k, v, MultimodalMask.packed(torch.tensor([0, 4, 9])))


def test_varlen_layout():
    mask = MultimodalMask.packed(torch.tensor([0, 3, 7]), seq_len=9)
    q, k, v = _qkv(1, 4, 2, 9, 9, 8, torch.float32)
    qp, kp, vp, cu, real = paths.varlen_layout(q, k, v, mask)
    assert qp.shape == (9, 4, 8) and kp.shape == (9, 2, 8) and vp.shape == (9, 2, 8)
    assert torch.equal(qp[5, 3], q[0, 3, 5]) and torch.equal(vp[8, 1], v[0, 1, 8])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 7, 9]   # the padding tail: its own document
    assert real.tolist() == [True] * 7 + [False] * 2
    full = MultimodalMask.packed(torch.tensor([0, 5, 9]), seq_len=9)
    assert paths.varlen_layout(q, k, v, full)[3].tolist() == [0, 5, 9, 9]


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_path_with_varlen_attn_emulated(monkeypatch, causal):
    """The wiring around varlen_attn (layout, window, padding rows) against the reference, with
    varlen_attn replaced by a per-document emulation (the real one needs CUDA)."""
    from torch.nn.attention import varlen

    def emulated(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        assert torch.equal(cu_q, cu_k) and max_q == max_k == q.shape[0]
        assert window_size in ((-1, 0), (-1, -1))
        out = torch.empty_like(q)
        bounds = cu_q.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                out[a:b] = torch.nn.functional.scaled_dot_product_attention(
                    q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                    is_causal=window_size == (-1, 0), scale=scale, enable_gqa=enable_gqa).transpose(0, 1)
        return out

    monkeypatch.setattr(varlen, "varlen_attn", emulated)
    mask = MultimodalMask.packed(torch.tensor([0, 5, 5, 12, 20]), causal=causal, seq_len=23)
    q, k, v = _qkv(1, 4, 2, 23, 23, 16, torch.float32, seed=9)
    out = paths.varlen_attention(q, k, v, mask, 0.25)
    assert_close(out, multimodal_attention_reference(q.double(), k.double(), v.double(), mask, scale=0.25),
                 torch.float32)
    assert (out[0, :, 20:] == 0).all()


# ----------------------------------------------------------------------------- dispatch

CLASS_CASES = {  # shape class -> (mask builder, S)
    "none:s<=1024": (lambda s: None, 64),
    "causal:s<=1024": (lambda s: MultimodalMask.causal(1, s), 64),
    "key_padding:s<=1024": (lambda s: MultimodalMask.key_padding([s - 5], s), 64),
    "packed:s<=1024": (lambda s: MultimodalMask.packed(torch.tensor([0, 20, s])), 64),
    "multimodal:s<=1024": (lambda s: MultimodalMask.blip2(32, [s - 40], s - 32, objective="itg"), 64),
    "none:s>1024": (lambda s: None, 1100),
    "causal:s>1024": (lambda s: MultimodalMask.causal(1, s), 1100),
    "multimodal:s>1024": (lambda s: MultimodalMask.prefix_lm([300], [s], s), 1100),
}


def _table_choice(kind, cls, dtype=torch.bfloat16):
    """The path the table picks for a CUDA-like call on which every path can run."""
    x = torch.empty(1, dtype=dtype)
    with _dispatch.pretend_device(kind), mmkernels.explain() as log:
        decision = _dispatch.choose("attention", "multimodal_attention", x, cls, {p: None for p in paths.PATHS})
    assert log == [decision]
    return decision.path


def test_table_follows_the_gpu_record():
    # the kernels won only at BLIP-2 sizes (short multimodal masks); flex and SDPA elsewhere
    assert _table_choice("cuda-sm90", "multimodal:s<=1024") == "kernel"
    assert _table_choice("cuda-sm90", "multimodal:s>1024") == "flex"
    assert _table_choice("cuda-sm90", "causal:s>1024") in ("sdpa", "flex")
    assert _table_choice("cuda-sm90", "packed:s>1024") == "varlen"
    assert _table_choice("cuda", "none:s<=1024") == "sdpa"
    for kind in ("cpu", "cuda-sm90", "cuda"):
        for cls in list(CLASS_CASES) + ["packed:s>1024", "key_padding:s>1024", "unheard:of"]:
            order = _dispatch.lookup("attention", "multimodal_attention", kind, "bfloat16", cls)[1].order
            assert "kernel" in order and set(order) <= set(paths.PATHS) | {"kernel"}


@pytest.mark.parametrize("device_kind", ["cpu", "cuda-sm90"])
@pytest.mark.parametrize("cls", sorted(CLASS_CASES))
def test_public_api_choices_with_gradients(device_kind, cls):
    """Through the op, with gradients (so flex is out on CPU tensors and varlen always): the
    recorded decision names the class, follows the table, and says what it skipped."""
    build, s = CLASS_CASES[cls]
    mask = build(s)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2, s, s, 16, torch.float32))
    with _dispatch.pretend_device(device_kind), mmkernels.explain() as log:
        mmkernels.multimodal_attention(q, k, v, mask)
    (decision,) = log
    assert decision.case == (device_kind, "float32", cls)
    order = _dispatch.lookup("attention", "multimodal_attention", device_kind, "float32", cls)[1].order
    can = paths.eligibility(q, k, v, mask, 0.25, False)
    can["kernel"] = None
    assert decision.path == next(p for p in order if can[p] is None), str(decision)
    for p in order[:order.index(decision.path)]:
        assert p in decision.reason and can[p] in decision.reason
    assert cls in str(log)


def test_compile_fullgraph_under_auto():
    """The path choice traces: the sdpa path of a key-padding call inside torch.compile(fullgraph)."""
    mask = MultimodalMask.key_padding([24, 10], 24)
    q, k, v = (t.requires_grad_() for t in _qkv(2, 2, 2, 24, 24, 16, torch.float32))
    fn = torch.compile(lambda a, b, c: mmkernels.multimodal_attention(a, b, c, mask), fullgraph=True)
    with _dispatch.pretend_device("cpu"):
        out = fn(q, k, v)
    out.sum().backward()
    assert_close(out, multimodal_attention_reference(q.double(), k.double(), v.double(), mask), torch.float32)
    assert (q.grad[1, :, 10:] == 0).all()


def test_use_path_and_forced_backends():
    mask = MultimodalMask.key_padding([30, 20], 30)
    q, k, v = _qkv(2, 2, 2, 30, 30, 16, torch.float32)
    ref = multimodal_attention_reference(q.double(), k.double(), v.double(), mask)
    with mmkernels.explain() as log:
        with mmkernels.use_path("sdpa"):
            a = mmkernels.multimodal_attention(q, k, v, mask)
        with mmkernels.backend("cpu"):
            b = mmkernels.multimodal_attention(q, k, v, mask)
        with mmkernels.backend("reference"):
            c = mmkernels.multimodal_attention(q, k, v, mask)
    assert log.paths() == ["sdpa", "kernel", "reference"]
    assert log[0].reason == "use_path forced" and log[1].backend == "cpu"
    assert "backend 'cpu' forced" in str(log)
    for t in (a, b, c):
        assert_close(t, ref, torch.float32)
    # a path name of another family does not touch this op
    with mmkernels.use_path("blockwise"), mmkernels.explain() as log:
        mmkernels.multimodal_attention(q, k, v, mask)
    assert log[0].reason != "use_path forced"
