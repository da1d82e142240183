"""The attention Triton kernels against the float64 reference (out, lse, dq, dk, dv).

Without a GPU the kernels run through Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton); with a
GPU the same tests run on CUDA tensors.  Shapes stay small (<= 129 tokens).  Most
cases force 16 x 16 tiles so that a short sequence already has EMPTY, FULL and
PARTIAL tiles and ragged last tiles; a few run the heuristic configuration.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # normally already done by conftest.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from mmkernels.attention import CAUSAL, FULL, SPAN, BLOCKED, MultimodalMask  # noqa: E402
from mmkernels.attention import kernels as K  # noqa: E402
from mmkernels.attention.reference import multimodal_attention_reference  # noqa: E402
from mmkernels.testing.numerics import assert_close  # noqa: E402
from tests.helpers.attention_checks import check_lse_fp32  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]
SMALL = K.AttnConfig(16, 16, 4, 1)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Sk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Sk, D, generator=g, dtype=torch.float64)
    do = torch.randn(B, Hq, Sq, D, generator=g, dtype=torch.float64)
    return [t.to(dtype).to(DEVICE) for t in (q, k, v, do)]


def reference(q, k, v, do, mask, scale):
    """float64 out, lse, dq, dk, dv from the dtype-rounded inputs."""
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    m = None if mask is None else mask.to("cpu")
    out, lse = multimodal_attention_reference(q64, k64, v64, m, scale=scale, return_lse=True)
    out.backward(do.double().cpu())
    return out.detach(), lse.detach(), q64.grad, k64.grad, v64.grad


def meta_of(mask):
    return [] if mask is None else [t.to(DEVICE) for t in mask._fields()]


def run_case(mask, B, Hq, Hkv, Sq, Sk, D, dtype, *, config=SMALL, seed=0, scale=None,
             grad_scale=1.0, layout=None):
    q, k, v, do = make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype, seed)
    if layout is not None:
        q, k, v, do = (layout(t) for t in (q, k, v, do))
    scale = D ** -0.5 if scale is None else scale
    meta = meta_of(mask)
    out, lse, row_max, row_sum = K.attention_fwd_triton(q, k, v, meta, scale, config=config)
    dq, dk, dv = K.attention_bwd_triton(q, k, v, out, row_max, row_sum, do, meta, scale, config=config)
    r_out, r_lse, r_dq, r_dk, r_dv = reference(q, k, v, do, mask, scale)
    assert out.dtype == dtype and dq.dtype == dtype and dk.dtype == dtype and dv.dtype == dtype
    assert out.shape == q.shape and dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t.float()).all(), f"{name} not finite"
    assert_close(out, r_out, dtype, name="out")
    check_lse_fp32(lse, r_lse)
    seen = row_sum > 0  # the saved statistics: log2-domain row max and row sum, lse made of them
    assert torch.equal(seen, torch.isfinite(lse))
    assert torch.allclose(lse[seen], (row_max * math.log(2.0) + torch.log(row_sum))[seen], rtol=1e-6, atol=1e-6)
    assert_close(dq, r_dq, dtype, scale=grad_scale, name="dq")
    assert_close(dk, r_dk, dtype, scale=grad_scale, name="dk")
    assert_close(dv, r_dv, dtype, scale=grad_scale, name="dv")
    return out, lse, dq, dk, dv


# ---------------------------------------------------------------------------
# masks of the model families
# ---------------------------------------------------------------------------


def _image_spans(B, S, seed=1):
    g = torch.Generator().manual_seed(seed)
    mod = torch.zeros(B, S, dtype=torch.int32)
    for b in range(B):  # two image runs per sample at random places
        for _ in range(2):
            start = int(torch.randint(0, max(1, S - 8), (1,), generator=g))
            mod[b, start:start + int(torch.randint(3, 9, (1,), generator=g))] = 1
    seg = torch.zeros(B, S, dtype=torch.int32)
    seg[-1, S - 5:] = -1  # padding at the end of the last sample
    return MultimodalMask.image_spans_in_causal(mod, segment_ids=seg)


def _random_rules(B, S, seed=2, nm=3):
    g = torch.Generator().manual_seed(seed)
    mod = torch.randint(0, nm, (B, S), generator=g, dtype=torch.int32)
    # sort runs a bit so that runs are longer than one token
    mod = torch.sort(mod, dim=1).values.flip(1) if seed % 2 else mod
    rules = torch.randint(0, 4, (nm, nm), generator=g, dtype=torch.int8)
    rules[0, 0] = CAUSAL
    rules[1, 1] = SPAN
    seg = torch.sort(torch.randint(0, 3, (B, S), generator=g, dtype=torch.int32), dim=1).values
    seg[torch.rand(B, S, generator=g) < 0.1] = -1
    return MultimodalMask(mod, rules, segment_ids=seg)


MASKS = {
    "none": (lambda B, S: None),
    "causal": (lambda B, S: MultimodalMask.causal(B, S)),
    "key_padding": (lambda B, S: MultimodalMask.key_padding([S // 3, S][:B] + [S] * (B - 2), S)),
    "prefix_lm": (lambda B, S: MultimodalMask.prefix_lm([5, S // 2][:B] + [3] * (B - 2),
                                                        [S - 3, S][:B] + [S] * (B - 2), S)),
    "blip2_itg": (lambda B, S: MultimodalMask.blip2(8, [5, S - 8][:B] + [S - 8] * (B - 2), S - 8,
                                                    objective="itg")),
    "blip2_itc": (lambda B, S: MultimodalMask.blip2(8, [S - 8, 4][:B] + [S - 8] * (B - 2), S - 8,
                                                    objective="itc")),
    "beit3_captioning": (lambda B, S: MultimodalMask.beit3_captioning(
        10, [3, S - 10][:B] + [S - 10] * (B - 2), S - 10)),
    "image_spans": (lambda B, S: _image_spans(B, S)),
    "random_rules": (lambda B, S: _random_rules(B, S)),
    "random_rules_sorted": (lambda B, S: _random_rules(B, S, seed=3)),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_masks_fp32(name):
    B, S = 2, 45
    run_case(MASKS[name](B, S), B, 2, 2, S, S, 16, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["causal", "prefix_lm", "random_rules"])
def test_masks_16bit(name, dtype):
    B, S = 2, 40
    run_case(MASKS[name](B, S), B, 2, 1, S, S, 64, dtype, grad_scale=2.0)


def test_packed():
    mask = MultimodalMask.packed(torch.tensor([0, 5, 17, 18, 40]), causal=True, seq_len=47)
    run_case(mask, 1, 2, 1, 47, 47, 16, torch.float32)
    mask = MultimodalMask.packed(torch.tensor([0, 20, 33]), causal=False)
    run_case(mask, 1, 2, 2, 33, 33, 16, torch.float32)


@pytest.mark.parametrize("D", [16, 64, 88])
def test_head_dims_gqa(D):
    B, S = 2, 37
    run_case(MASKS["beit3_captioning"](B, S), B, 4, 2, S, S, D, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_gqa_dtypes_d88(dtype):
    B, S = 1, 33
    run_case(MASKS["image_spans"](B, S), B, 4, 2, S, S, 88, dtype, grad_scale=2.0)


@pytest.mark.parametrize("S", [1, 7, 97])
def test_odd_lengths(S):
    run_case(MultimodalMask.causal(1, S), 1, 2, 1, S, S, 16, torch.float32)


def test_no_mask_odd_lengths_cross():
    run_case(None, 1, 2, 1, 7, 97, 16, torch.float32)
    run_case(None, 1, 2, 2, 97, 7, 16, torch.float32)
    run_case(None, 1, 1, 1, 1, 1, 16, torch.float32)


def _cross_mask(B, Sq, Sk, seed=0):
    g = torch.Generator().manual_seed(seed)
    q_mod = torch.randint(0, 2, (B, Sq), generator=g, dtype=torch.int32)
    k_mod = torch.randint(0, 2, (B, Sk), generator=g, dtype=torch.int32)
    rules = torch.tensor([[CAUSAL, FULL], [SPAN, CAUSAL]], dtype=torch.int8)
    return MultimodalMask(q_mod, rules, key_modality_ids=k_mod)


@pytest.mark.parametrize("Sq,Sk", [(7, 40), (40, 7), (23, 50)])
def test_sq_ne_sk(Sq, Sk):
    """Queries are the last Sq positions (Sq > Sk: early queries see nothing)."""
    B = 2
    causal = MultimodalMask(torch.zeros(B, Sq, dtype=torch.int32), [[CAUSAL]],
                            key_modality_ids=torch.zeros(B, Sk, dtype=torch.int32))
    run_case(causal, B, 4, 2, Sq, Sk, 16, torch.float32)
    run_case(_cross_mask(B, Sq, Sk), B, 2, 1, Sq, Sk, 16, torch.float32)


def test_heuristic_config():
    """The default (heuristic) tiles, for each dtype."""
    mask = MASKS["prefix_lm"](2, 97)
    run_case(mask, 2, 2, 1, 97, 97, 64, torch.float32, config=None)
    run_case(mask, 2, 2, 1, 97, 97, 64, torch.bfloat16, config=None, grad_scale=2.0)
    run_case(MASKS["random_rules"](1, 70), 1, 2, 2, 70, 70, 88, torch.float16, config=None,
             grad_scale=2.0)


def test_any_strides():
    """q/k/v/dout as [B, S, H, D] buffers seen as [B, H, S, D], and a strided head dim."""
    bshd = (lambda t: t.transpose(1, 2).contiguous().transpose(1, 2))
    run_case(MASKS["prefix_lm"](2, 30), 2, 4, 2, 30, 30, 16, torch.float32, layout=bshd)
    every_other = (lambda t: torch.stack([t, torch.zeros_like(t)], -1)[..., 0])
    run_case(MASKS["causal"](1, 30), 1, 2, 1, 30, 30, 16, torch.bfloat16, layout=every_other,
             grad_scale=2.0)


def test_scale_argument():
    run_case(MASKS["causal"](1, 20), 1, 2, 1, 20, 20, 16, torch.float32, scale=0.9)


# ---------------------------------------------------------------------------
# fully masked rows, EMPTY tiles
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_fully_masked_rows(dtype):
    """A sample of length 0 and padding rows: out 0, lse -inf, zero and finite gradients."""
    S = 40
    mask = MultimodalMask.key_padding([0, 25], S)
    out, lse, dq, dk, dv = run_case(mask, 2, 2, 1, S, S, 16, dtype, grad_scale=2.0)
    assert bool((out[0] == 0).all()) and bool((out[1, :, 25:] == 0).all())
    assert bool((lse[0] == float("-inf")).all()) and bool((lse[1, :, 25:] == float("-inf")).all())
    assert bool(torch.isfinite(lse[1, :, :25]).all())
    for t in (dq[0], dk[0], dv[0], dq[1, :, 25:], dk[1, :, 25:], dv[1, :, 25:]):
        assert bool((t == 0).all())


def test_all_masked_no_mask_path_unaffected():
    """Every row masked (rules all BLOCKED): zeros everywhere, no NaN."""
    S = 20
    mask = MultimodalMask(torch.zeros(1, S, dtype=torch.int32), [[BLOCKED]])
    out, lse, dq, dk, dv = run_case(mask, 1, 2, 1, S, S, 16, torch.float32)
    assert bool((lse == float("-inf")).all())
    for t in (out, dq, dk, dv):
        assert bool((t == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_empty_tiles_are_never_read(dtype):
    """K/V of keys in EMPTY tiles (seen by nobody) hold NaN: results equal the clean reference."""
    B, Hq, Hkv, S, D = 2, 2, 1, 64, 16
    mask = MultimodalMask.key_padding([20, 30], S)   # keys >= 32 sit in EMPTY tiles of 16 x 16
    tiles = mask.tile_map(16, 16)
    assert bool((tiles[:, :, 2:] == 0).all()) and bool((tiles[:, 2:, :] == 0).all())
    q, k, v, do = make_qkv(B, Hq, Hkv, S, S, D, dtype)
    r_out, r_lse, r_dq, r_dk, r_dv = reference(q, k, v, do, mask, D ** -0.5)
    k, v = k.clone(), v.clone()
    k[:, :, 32:] = float("nan")
    v[:, :, 32:] = float("nan")
    meta = meta_of(mask)
    out, lse, row_max, row_sum = K.attention_fwd_triton(q, k, v, meta, D ** -0.5, config=SMALL)
    dq, dk, dv = K.attention_bwd_triton(q, k, v, out, row_max, row_sum, do, meta, D ** -0.5, config=SMALL)
    for t in (out, dq, dk, dv):
        assert bool(torch.isfinite(t.float()).all())
    assert_close(out, r_out, dtype, name="out")
    check_lse_fp32(lse, r_lse)
    assert_close(dq, r_dq, dtype, scale=2.0, name="dq")
    assert_close(dk, r_dk, dtype, scale=2.0, name="dk")
    assert_close(dv, r_dv, dtype, scale=2.0, name="dv")


def test_meta_is_the_mask_fields():
    """The launcher's tile map equals the mask's own at the kernel's tile size."""
    mask = MASKS["random_rules"](2, 45)
    rebuilt = K.mask_from_meta(list(mask._fields()))
    assert torch.equal(rebuilt.tile_map(16, 16), mask.tile_map(16, 16))
    assert torch.equal(rebuilt.to_dense(), mask.to_dense())


def test_configs_cover_heuristics():
    for kind in K.KERNEL_KINDS:
        for dtype in DTYPES:
            for prec in K.input_precisions(dtype):
                for D in (1, 16, 64, 80, 88, 96, 128, 200, 256):
                    assert K.heuristic_config(kind, dtype, D, prec) in K.candidate_configs(kind)


def test_split_dkdv():
    """dk and dv in two launches (the large-D configurations), with GQA and a mask."""
    cfg = {"fwd": SMALL, "bwd_dq": SMALL, "bwd_dkdv": K.AttnConfig(16, 16, 4, 1, True)}
    assert K.dkdv_parts(cfg["bwd_dkdv"]) == (1, 2)
    run_case(MASKS["image_spans"](2, 37), 2, 4, 2, 37, 37, 24, torch.float32, config=cfg)
    run_case(None, 1, 2, 1, 20, 33, 24, torch.float16, config=cfg, grad_scale=2.0)


def test_head_dim_256_heuristic():
    """D = 256 with the launchers' own configurations (the 16-bit dk/dv kernel is split there)."""
    assert K.heuristic_config("bwd_dkdv", torch.bfloat16, 256, "tf32").split
    run_case(MASKS["prefix_lm"](1, 20), 1, 2, 1, 20, 20, 256, torch.bfloat16, config=None,
             grad_scale=2.0)


# ---------------------------------------------------------------------------
# tuning: overrides set through mmkernels.tuning reach the launchers
# ---------------------------------------------------------------------------


def test_tuning_override_is_used():
    """explicit config > tuning override > heuristic: an override that breaks the launch
    (BLOCK_M = 24, not a power of two) raises, a small valid one gives correct results."""
    from mmkernels import tuning
    D, dtype = 24, torch.float32
    case = dict(dtype=dtype, head_dim=D, input_precision=K.input_precision(dtype))
    q, k, v, do = make_qkv(1, 2, 1, 20, 20, D, dtype)
    with tuning.scope():
        tuning.set_config("attention", "fwd", K.AttnConfig(24, 16, 4, 1), **case)
        assert K.pick("fwd", dtype, D, case["input_precision"], False) == K.AttnConfig(24, 16, 4, 1)
        assert K.pick("fwd", dtype, D, case["input_precision"], False, SMALL) == SMALL
        with pytest.raises(Exception):
            K.attention_fwd_triton(q, k, v, [], D ** -0.5)
        K.attention_fwd_triton(q, k, v, [], D ** -0.5, config=SMALL)  # the explicit config wins
    assert K.pick("fwd", dtype, D, case["input_precision"], False) == K.heuristic_config("fwd", dtype, D, "ieee", False)
    with tuning.scope():
        for kind in ("fwd", "bwd_dkdv", "bwd_dq"):
            tuning.set_config("attention", kind, {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4,
                                                  "num_stages": 1}, has_mask=True, **case)
        tuning.set_config("attention", "bwd_pre", K.AttnConfig(16, 0, 4, 1), **case)
        for kind in K.KERNEL_KINDS:
            assert K.pick(kind, dtype, D, case["input_precision"], True).BLOCK_M == 16
        run_case(MASKS["prefix_lm"](1, 37), 1, 2, 1, 37, 37, D, dtype, config=None)


def test_tuning_file_round_trip(tmp_path):
    from mmkernels import tuning
    cfg = K.AttnConfig(32, 16, 4, 1, True)
    with tuning.scope():
        tuning.set_config("attention", "bwd_dkdv", cfg, dtype=torch.bfloat16, head_dim=256, has_mask=False)
        tuning.save(str(tmp_path / "tuned.json"))
        tuning.reset()
        assert K.pick("bwd_dkdv", torch.bfloat16, 256, "tf32", False) != cfg
        tuning.load(str(tmp_path / "tuned.json"))
        assert K.pick("bwd_dkdv", torch.bfloat16, 256, "tf32", False) == cfg
        assert K.pick("bwd_dkdv", torch.bfloat16, 256, "tf32", True) != cfg
    assert tuning.kinds()["attention/fwd"]["keys"] == K.TUNING_KEYS
