"""The cross_attention Triton kernels against the float64 reference (out, lse, dq, dk, dv).

``cross_attention_fwd_triton`` / ``cross_attention_bwd_triton`` are called directly, through
Triton's interpreter without a GPU. float32 must match at fp32 tolerance, bf16/fp16 within the
project's table or twice eager PyTorch's error (mmkernels.testing.numerics); small forced tiles
exercise the multi-query-block backward and ragged pair groups.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # normally already done by conftest.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from mmkernels.cross_attention import kernels as K  # noqa: E402
from mmkernels.cross_attention.reference import (cross_attention_reference,  # noqa: E402
                                                 dropout_keep_mask)
from mmkernels.testing.numerics import assert_close  # noqa: E402
from tests.helpers.attention_checks import check_lse_fp32  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]
_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def make_inputs(B, H, Lq, Lk, D, dtype, seed=0, kv_layout="contiguous"):
    """q, k, v, dout in ``dtype``; ``kv_layout="fused"``: k/v are views of one [B, Lk, L*2*H*D] GEMM output."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64)
    do = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64)
    if kv_layout == "fused":
        L, layer = 3, 1  # layer 1's K and V of a 3-layer fused projection
        y = torch.randn(B, Lk, L * 2 * H * D, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
        off = layer * 2 * H * D
        k = y[..., off:off + H * D].view(B, Lk, H, D).permute(0, 2, 1, 3)
        v = y[..., off + H * D:off + 2 * H * D].view(B, Lk, H, D).permute(0, 2, 1, 3)
        assert k.stride() == (Lk * L * 2 * H * D, D, L * 2 * H * D, 1)
    else:
        k = torch.randn(B, H, Lk, D, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
        v = torch.randn(B, H, Lk, D, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    return q.to(dtype).to(DEVICE), k, v, do.to(dtype).to(DEVICE)


def make_mask(kind, B, Lk, seed=1):
    """None, random key padding ("pad"), or random padding with the last batch row all padded."""
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, Lk, generator=g) < 0.7
    m[0, 0] = True  # row 0 always sees a key
    if kind == "pad_empty":
        m[-1] = False
    return m.to(DEVICE)


def make_seed(p, seed=(398764591, 1478610112)):
    return torch.tensor(seed, dtype=torch.int64, device=DEVICE) if p > 0 else None


def reference(q, k, v, do, mask, scale, p, seed, dtype=torch.float64):
    """out, lse, dq, dk, dv of the reference evaluated on ``q, k, v`` cast to ``dtype`` (on the CPU)."""
    q_, k_, v_ = (t.detach().cpu().to(dtype).requires_grad_() for t in (q, k, v))
    m = None if mask is None else mask.cpu()
    s = None if seed is None else seed.cpu()
    out, lse = cross_attention_reference(q_, k_, v_, m, scale=scale, dropout_p=p, seed=s, return_lse=True)
    out.backward(do.cpu().to(dtype))
    return out.detach(), lse.detach(), q_.grad, k_.grad, v_.grad


def run_case(B, H, Lq, Lk, D, dtype=torch.float32, mask="none", p=0.0, *, kv_layout="contiguous",
             config=None, pairs=None, scale=None, seed=0, grad_scale=1.0):
    q, k, v, do = make_inputs(B, H, Lq, Lk, D, dtype, seed, kv_layout)
    kpm = make_mask(mask, B, Lk)
    sd = make_seed(p)
    scale = D ** -0.5 if scale is None else scale
    out, lse, m, l = K.cross_attention_fwd_triton(q, k, v, kpm, sd, scale, p, config=config, pairs=pairs)
    dq, dk, dv = K.cross_attention_bwd_triton(q, k, v, out, m, l, do, kpm, sd, scale, p,
                                              config=config, pairs=pairs)
    ref = reference(q, k, v, do, kpm, scale, p, sd)
    eager = None if dtype == torch.float32 else reference(q, k, v, do, kpm, scale, p, sd, dtype)
    assert out.dtype == dtype and dq.dtype == dtype and dk.dtype == dtype and dv.dtype == dtype
    assert out.shape == q.shape and dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    for t in (out, dq, dk, dv):
        assert t.is_contiguous()
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t.float()).all(), f"{name} not finite"
    check_lse_fp32(lse, ref[1])
    for i, (name, t) in enumerate((("out", out), ("dq", dq), ("dk", dk), ("dv", dv))):
        idx = 0 if i == 0 else i + 1
        assert_close(t, ref[idx], dtype, eager=None if eager is None else eager[idx],
                     scale=1.0 if i == 0 else grad_scale, name=name)
    if kpm is not None:
        empty = ~kpm.cpu().any(dim=1)  # batch rows whose keys are all padding
        if bool(empty.any()):
            assert bool((out.cpu()[empty] == 0).all()), "out of an all-padded row must be 0"
            assert bool((lse.cpu()[empty] == float("-inf")).all())
            assert bool((dq.cpu()[empty] == 0).all()), "dq of an all-padded row must be 0"
            assert bool((dk.cpu()[empty] == 0).all()) and bool((dv.cpu()[empty] == 0).all())
        # padded keys get no gradient
        padded = ~kpm.cpu()
        assert bool((dk.cpu().permute(0, 2, 1, 3)[padded] == 0).all())
        assert bool((dv.cpu().permute(0, 2, 1, 3)[padded] == 0).all())
    return out, lse, dq, dk, dv


# ---------------------------------------------------------------------------
# shapes, float32
# ---------------------------------------------------------------------------

# (Lq, Lk, D, mask): the whole grid, Lq in {1, 32, 33} x Lk in {1, 257, 300} x D in {64, 88},
# without padding and with padding that leaves one batch row no key at all
SHAPES = [(lq, lk, d, mask) for lq in (1, 32, 33) for lk in (1, 257, 300) for d in (64, 88)
          for mask in ("none", "pad_empty")]


@pytest.mark.parametrize("Lq,Lk,D,mask", SHAPES, ids=[f"Lq{a}-Lk{b}-D{c}-{m}" for a, b, c, m in SHAPES])
def test_shapes_fp32(Lq, Lk, D, mask):
    run_case(2, 2, Lq, Lk, D, torch.float32, mask)


@pytest.mark.parametrize("D", [96, 128])
def test_head_dims(D):
    run_case(2, 2, 33, 70, D, torch.float32, "pad")


def test_many_query_blocks():
    """Lq = 300: several query blocks in the forward grid and in the backward's dq scratch path."""
    run_case(1, 2, 300, 40, 64, torch.float32, "pad_empty")


# ---------------------------------------------------------------------------
# 16-bit inputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("Lq,Lk,D,mask", [(32, 257, 64, "pad"), (33, 300, 88, "pad_empty"),
                                          (1, 1, 64, "none")],
                         ids=["Lq32-Lk257-D64", "Lq33-Lk300-D88", "Lq1-Lk1-D64"])
def test_16bit(dtype, Lq, Lk, D, mask):
    run_case(2, 2, Lq, Lk, D, dtype, mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_d96_many_query_blocks(dtype):
    run_case(1, 2, 100, 70, 96, dtype, "pad", p=0.1)


# ---------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("Lq,Lk,D,mask", [(32, 257, 64, "pad_empty"), (33, 300, 88, "none")],
                         ids=["Lq32-Lk257-D64", "Lq33-Lk300-D88"])
def test_dropout_fp32(p, Lq, Lk, D, mask):
    run_case(2, 2, Lq, Lk, D, torch.float32, mask, p)


def test_dropout_many_query_blocks():
    run_case(1, 2, 300, 40, 64, torch.float32, "pad", p=0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_dropout_16bit(dtype):
    run_case(2, 2, 32, 257, 64, dtype, "pad", p=0.1)


def test_dropout_keep_mask_is_the_references():
    """Bitwise: q = 0 gives P = 1/Lk and v = I gives out[i, j] = keep_ij / ((1 - p) Lk)."""
    B, H, Lq, Lk, D, p = 2, 2, 33, 64, 64, 0.5
    for s in ((398764591, 1478610112), (0, 2 ** 31 - 1), (12345, 67890)):
        seed = make_seed(p, s)
        q = torch.zeros(B, H, Lq, D, device=DEVICE)
        v = torch.eye(Lk, D, device=DEVICE).expand(B, H, Lk, D)
        k = torch.randn(B, H, Lk, D, device=DEVICE)
        out = K.cross_attention_fwd_triton(q, k, v, None, seed, 1.0, p)[0]
        keep = dropout_keep_mask(seed.cpu(), (B, H, Lq, Lk), p)
        assert torch.equal(out.cpu() > 0, keep)
        torch.testing.assert_close(out.cpu()[keep], torch.full_like(out.cpu()[keep], 1 / ((1 - p) * Lk)))


def test_dropout_is_a_function_of_the_seed():
    q, k, v, _ = make_inputs(1, 2, 32, 64, 64, torch.float32)
    a = K.cross_attention_fwd_triton(q, k, v, None, make_seed(0.3, (1, 2)), 0.125, 0.3)[0]
    b = K.cross_attention_fwd_triton(q, k, v, None, make_seed(0.3, (1, 2)), 0.125, 0.3)[0]
    c = K.cross_attention_fwd_triton(q, k, v, None, make_seed(0.3, (1, 3)), 0.125, 0.3)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---------------------------------------------------------------------------
# layouts, tiles, pair groups
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_projection_views(dtype):
    """k/v are non-contiguous views of one fused K/V GEMM output (row stride L * 2 * H * D)."""
    run_case(2, 2, 32, 257, 64, dtype, "pad", p=0.1, kv_layout="fused")
    run_case(2, 3, 33, 40, 88, dtype, "pad_empty", kv_layout="fused")


def test_noncontiguous_q_and_dout():
    B, H, Lq, Lk, D = 2, 2, 33, 70, 64
    q, k, v, do = make_inputs(B, H, Lq, Lk, D, torch.float32)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, Lq, D] with head stride D
    dot = do.transpose(1, 2).contiguous().transpose(1, 2)
    kpm = make_mask("pad", B, Lk)
    out, _, m, l = K.cross_attention_fwd_triton(qt, k, v, kpm, None, 0.2, 0.0)
    outt = out.transpose(1, 2).contiguous().transpose(1, 2)
    dq, dk, dv = K.cross_attention_bwd_triton(qt, k, v, outt, m, l, dot, kpm, None, 0.2, 0.0)
    ref = reference(q, k, v, do, kpm, 0.2, 0.0, None)
    for name, t, r in (("out", out, ref[0]), ("dq", dq, ref[2]), ("dk", dk, ref[3]), ("dv", dv, ref[4])):
        assert_close(t, r, torch.float32, name=name)


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_small_tiles_and_ragged_pair_groups(p):
    """16 x 16 tiles: Lq = 33 is three query blocks (dq scratch path) and Lk = 257 17 key blocks;
    3 pairs per program over B * H = 4 pairs leaves a ragged last group."""
    cfg = K.XAttnConfig(16, 16, 4, 1)
    run_case(2, 2, 33, 257, 64, torch.float32, "pad_empty", p, config=cfg, pairs=3)


@pytest.mark.parametrize("pairs", [1, 2, 8])
def test_pairs_per_program(pairs):
    run_case(2, 3, 32, 100, 64, torch.float32, "pad", pairs=pairs)


def test_heuristic_configs():
    for kind in K.KERNEL_KINDS:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for prec in K.input_precisions(dtype):
                for D in (1, 16, 64, 88, 96, 128):
                    for Lq in (1, 7, 16, 32, 33, 64, 100, 256, 300, 1000):
                        cfg = K.heuristic_config(kind, dtype, D, prec, Lq)
                        assert 16 <= cfg.BLOCK_M <= 128 and cfg.BLOCK_M & (cfg.BLOCK_M - 1) == 0
                        assert cfg.BLOCK_M >= min(Lq, K.max_block_m(kind, dtype, D, prec))
                        assert cfg in K.candidate_configs(kind, dtype, D, prec)


def test_errors():
    q, k, v, _ = make_inputs(1, 1, 4, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="seed"):
        K.cross_attention_fwd_triton(q, k, v, None, None, 0.25, 0.1)
    with pytest.raises(TypeError):
        K.cross_attention_fwd_triton(q.double(), k.double(), v.double(), None, None, 0.25, 0.0)


# ---------------------------------------------------------------------------
# through the public op (when the lead's ops/api are in place)
# ---------------------------------------------------------------------------


def test_public_op_triton_backend():
    import mmkernels
    if not hasattr(mmkernels, "cross_attention") or not hasattr(mmkernels, "backend"):
        pytest.skip("mmkernels.cross_attention is not exported yet")
    B, H, Lq, Lk, D = 2, 2, 32, 70, 64
    q, k, v, do = make_inputs(B, H, Lq, Lk, D, torch.float32)
    kpm = make_mask("pad_empty", B, Lk)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    with mmkernels.backend("triton"):
        out = mmkernels.cross_attention(qq, kk, vv, key_padding_mask=kpm)
    out.backward(do)
    ref = reference(q, k, v, do, kpm, D ** -0.5, 0.0, None)
    for name, t, r in (("out", out, ref[0]), ("dq", qq.grad, ref[2]), ("dk", kk.grad, ref[3]),
                       ("dv", vv.grad, ref[4])):
        assert_close(t, r, torch.float32, name=name)


# ---------------------------------------------------------------------------
# tuning: overrides set through mmkernels.tuning reach the launchers
# ---------------------------------------------------------------------------


def test_tuning_override_is_used():
    """explicit config > tuning override > heuristic: an override that breaks the launch
    (BLOCK_M = 24, not a power of two) raises, a small valid one gives correct results."""
    from mmkernels import tuning
    D, dtype, Lq = 64, torch.float32, 33
    case = dict(dtype=dtype, head_dim=D, input_precision=K.input_precision(dtype))
    q, k, v, _ = make_inputs(1, 2, Lq, 40, D, dtype, 0, "contiguous")
    small = K.XAttnConfig(16, 16, 4, 1)
    with tuning.scope():
        tuning.set_config("cross_attention", "fwd", K.XAttnConfig(24, 16, 4, 1), queries=Lq, **case)
        assert K.pick("fwd", dtype, D, case["input_precision"], Lq) == K.XAttnConfig(24, 16, 4, 1)
        assert K.pick("fwd", dtype, D, case["input_precision"], Lq + 1) != K.XAttnConfig(24, 16, 4, 1)
        with pytest.raises(Exception):
            K.cross_attention_fwd_triton(q, k, v, None, None, D ** -0.5, 0.0)
        K.cross_attention_fwd_triton(q, k, v, None, None, D ** -0.5, 0.0, config=small)
    with tuning.scope():
        for kind in K.KERNEL_KINDS:
            tuning.set_config("cross_attention", kind, small._asdict(), **case)
            assert K.pick(kind, dtype, D, case["input_precision"], Lq) == small
        run_case(1, 2, Lq, 40, D, dtype, "pad", 0.5)  # three query blocks: the dq scratch path


def test_tuning_file_round_trip(tmp_path):
    from mmkernels import tuning
    cfg = K.XAttnConfig(32, 32, 4, 2)
    with tuning.scope():
        tuning.set_config("cross_attention", "bwd", cfg, dtype="bfloat16", queries=32)
        tuning.save(str(tmp_path / "tuned.json"))
        tuning.reset()
        assert K.pick("bwd", torch.bfloat16, 64, "tf32", 32) != cfg
        tuning.load(str(tmp_path / "tuned.json"))
        assert K.pick("bwd", torch.bfloat16, 64, "tf32", 32) == cfg
        assert K.pick("bwd", torch.bfloat16, 64, "tf32", 64) != cfg
    assert tuning.kinds()["cross_attention/fwd"]["keys"] == K.TUNING_KEYS
