"""The experts Triton kernels against the float64 loop-over-experts reference.

Routing (``route_triton``) against a stable argsort; the modality linear and FFN forward and
every gradient, through Triton's interpreter without a GPU, for empty and ragged experts, every
activation, fp32/bf16/fp16, strided inputs and T = 0. Most cases force small tiles so that few
tokens give several row tiles and k steps. Low-precision results follow
mmkernels.testing.numerics.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # normally already done by conftest.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from mmkernels import tuning  # noqa: E402
from mmkernels.experts import routing_kernels as R  # noqa: E402
from mmkernels.experts.grouped_mm.kernels import configs as C  # noqa: E402
from mmkernels.experts.grouped_mm import kernels as K  # noqa: E402
from mmkernels.experts.routing import route_split as route_split_torch  # noqa: E402
from mmkernels.testing.numerics import assert_close  # noqa: E402
from tests.experts.cases import record_launches  # noqa: E402

try:  # the lead's reference (loop over experts with boolean masks)
    from mmkernels.experts.reference import modality_ffn_reference, modality_linear_reference  # noqa: E402
except ImportError:  # pragma: no cover - a local loop with the same definition
    import torch.nn.functional as _F

    def _act(name, h):
        if name == "swiglu":
            g, u = h.chunk(2, dim=-1)
            return _F.silu(g) * u
        return {"gelu": _F.gelu, "gelu_tanh": lambda t: _F.gelu(t, approximate="tanh"),
                "silu": _F.silu, "relu": _F.relu}[name](h)

    def modality_linear_reference(x, ids, weight, bias=None):
        out = x.new_zeros(x.shape[0], weight.shape[1])
        for e in range(weight.shape[0]):
            sel = ids == e
            out[sel] = _F.linear(x[sel], weight[e], None if bias is None else bias[e])
        return out

    def modality_ffn_reference(x, ids, w_in, b_in, w_out, b_out, activation="gelu"):
        out = x.new_zeros(x.shape[0], w_out.shape[1])
        for e in range(w_in.shape[0]):
            sel = ids == e
            h = _F.linear(x[sel], w_in[e], None if b_in is None else b_in[e])
            out[sel] = _F.linear(_act(activation, h), w_out[e], None if b_out is None else b_out[e])
        return out

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SMALL = {**{k: C.MMConfig(16, 32, 16, 4, 1) for k in C.MM_KINDS},
         **{k: C.WGradConfig(32, 16, 16, 4, 1) for k in C.WGRAD_KINDS}}
H_IN, H_OUT, F_W = 20, 36, 44  # not multiples of 16: masked columns


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def make_ids(T, E, pattern, seed=0):
    """Modality ids [T] int64: random, with an empty expert, all in one expert, or in runs."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "rand":
        ids = torch.randint(0, E, (T,), generator=g)
    elif pattern == "empty":  # expert 1 gets no tokens (E >= 2)
        choices = torch.tensor([e for e in range(E) if e != 1])
        ids = choices[torch.randint(0, len(choices), (T,), generator=g)]
    elif pattern == "one":  # every token in the last expert
        ids = torch.full((T,), E - 1, dtype=torch.int64)
    elif pattern == "runs":  # text then image then text ... (contiguous runs)
        ids = (torch.arange(T) * E // max(T, 1)).flip(0)
    else:
        raise ValueError(pattern)
    return ids.to(torch.int64)


def rand(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def routing(ids, E):
    perm, offsets = R.route_triton(ids.to(DEVICE), E)
    return perm, offsets


def linear_case(T, E, dtype, has_bias, pattern, seed=0, h_in=H_IN, h_out=H_OUT):
    ids = make_ids(T, E, pattern, seed)
    x = rand(T, h_in, seed=seed + 1)
    w = rand(E, h_out, h_in, scale=h_in ** -0.5, seed=seed + 2)
    b = rand(E, h_out, seed=seed + 3) if has_bias else None
    dy = rand(T, h_out, seed=seed + 4)
    cast = (lambda t: None if t is None else t.to(dtype))
    return ids, cast(x), cast(w), cast(b), cast(dy)


def ref_linear(ids, x, w, b, dy, dtype=torch.float64):
    """(y, dx, dw, db) of the reference evaluated in ``dtype`` on the given (rounded) inputs."""
    xs = x.detach().cpu().to(dtype).requires_grad_()
    ws = w.detach().cpu().to(dtype).requires_grad_()
    bs = None if b is None else b.detach().cpu().to(dtype).requires_grad_()
    y = modality_linear_reference(xs, ids.cpu(), ws, bs)
    y.backward(dy.detach().cpu().to(dtype))
    return y.detach(), xs.grad, ws.grad, None if bs is None else bs.grad


def check_linear(ids, x, w, b, dy, E, config=SMALL):
    dtype = x.dtype
    perm, offsets = routing(ids, E)
    xd, wd, bd, dyd = (None if t is None else t.to(DEVICE) for t in (x, w, b, dy))
    y = K.linear_fwd_triton(xd, perm, offsets, wd, bd, config=config)
    dx, dw, db = K.linear_bwd_triton(dyd, xd, perm, offsets, wd, bd, True, [True] * E, config=config)
    ref = ref_linear(ids, x, w, b, dy)
    eager = ref_linear(ids, x, w, b, dy, dtype) if dtype != torch.float32 else (None,) * 4
    for name, got, r, ea in zip(("y", "dx", "dw", "db"), (y, dx, dw, db), ref, eager):
        if r is None:
            assert got.numel() == 0, name
            continue
        assert got.dtype == dtype, name
        assert_close(got, r, eager=ea, name=name)


def ffn_case(T, E, dtype, activation, has_bias, pattern, seed=0, f=F_W, h_in=H_IN, h_out=H_OUT):
    ids = make_ids(T, E, pattern, seed)
    fi = 2 * f if activation == "swiglu" else f
    x = rand(T, h_in, seed=seed + 1)
    w_in = rand(E, fi, h_in, scale=h_in ** -0.5, seed=seed + 2)
    b_in = rand(E, fi, scale=0.5, seed=seed + 3) if has_bias else None
    w_out = rand(E, h_out, f, scale=f ** -0.5, seed=seed + 4)
    b_out = rand(E, h_out, scale=0.5, seed=seed + 5) if has_bias else None
    dy = rand(T, h_out, seed=seed + 6)
    cast = (lambda t: None if t is None else t.to(dtype))
    return ids, cast(x), cast(w_in), cast(b_in), cast(w_out), cast(b_out), cast(dy)


def ref_ffn(ids, x, w_in, b_in, w_out, b_out, dy, activation, dtype=torch.float64):
    """(y, dx, dw_in, db_in, dw_out, db_out) of the reference evaluated in ``dtype``."""
    leaves = [None if t is None else t.detach().cpu().to(dtype).requires_grad_()
              for t in (x, w_in, b_in, w_out, b_out)]
    y = modality_ffn_reference(leaves[0], ids.cpu(), *leaves[1:], activation)
    y.backward(dy.detach().cpu().to(dtype))
    return (y.detach(), *[None if t is None else t.grad for t in leaves])


def ref_hidden(ids, x, w_in, b_in, activation, perm):
    """float64 h and a in sorted order (row s = token perm[s])."""
    from mmkernels.experts import activations
    x64, w64 = x.double().cpu(), w_in.double().cpu()
    e = ids.cpu()
    h = torch.einsum("th,tfh->tf", x64, w64[e])
    if b_in is not None:
        h = h + b_in.double().cpu()[e]
    a = activations.apply(activation, h)
    p = perm.long().cpu()
    return h[p], a[p]


def check_ffn(ids, x, w_in, b_in, w_out, b_out, dy, E, activation, config=SMALL, check_hidden=True):
    dtype = x.dtype
    perm, offsets = routing(ids, E)
    xd, wid, bid, wod, bod, dyd = (None if t is None else t.to(DEVICE)
                                   for t in (x, w_in, b_in, w_out, b_out, dy))
    y, h, a = K.ffn_fwd_triton(xd, perm, offsets, wid, bid, wod, bod, activation, config=config)
    grads = K.ffn_bwd_triton(dyd, xd, perm, offsets, wid, bid, wod, bod, h, a, activation,
                             config=config)
    ref = ref_ffn(ids, x, w_in, b_in, w_out, b_out, dy, activation)
    eager = (ref_ffn(ids, x, w_in, b_in, w_out, b_out, dy, activation, dtype)
             if dtype != torch.float32 else (None,) * 6)
    names = ("y", "dx", "dw_in", "db_in", "dw_out", "db_out")
    for name, got, r, ea in zip(names, (y, *grads), ref, eager):
        if r is None:
            assert got.numel() == 0, name
            continue
        assert got.dtype == dtype, name
        assert_close(got, r, eager=ea, name=name)
    if check_hidden:
        h_ref, a_ref = ref_hidden(ids, x, w_in, b_in, activation, perm)
        assert_close(h, h_ref, name="h (sorted)")
        assert_close(a, a_ref, name="a (sorted)")


# ---------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------


ROUTE_CASES = [(E, T, p) for E in (1, 2, 3, 5, 8)
               for T, p in ((1, "rand"), (7, "rand"), (97, "rand"), (97, "empty"), (256, "one"),
                            (200, "runs"), (2500, "rand"))
               if not (p == "empty" and E < 2)]  # T = 2500: three blocks of the sort


@pytest.mark.parametrize("E,T,pattern", ROUTE_CASES, ids=[f"E{e}-T{t}-{p}" for e, t, p in ROUTE_CASES])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
def test_route_matches_stable_argsort(E, T, pattern, id_dtype):
    ids = make_ids(T, E, pattern, seed=T + E).to(id_dtype)
    perm, offsets = R.route_triton(ids.to(DEVICE), E)
    assert perm.dtype == torch.int32 and offsets.dtype == torch.int32
    assert perm.shape == (T,) and offsets.shape == (E + 1,)
    expect = torch.argsort(ids.long(), stable=True)
    assert torch.equal(perm.cpu().long(), expect)
    counts = torch.bincount(ids.long(), minlength=E)
    expect_off = torch.zeros(E + 1, dtype=torch.int64)
    expect_off[1:] = torch.cumsum(counts, 0)
    assert torch.equal(offsets.cpu().long(), expect_off)


def test_route_empty():
    perm, offsets = R.route_triton(torch.zeros(0, dtype=torch.int64, device=DEVICE), 3)
    assert perm.shape == (0,) and perm.dtype == torch.int32
    assert offsets.tolist() == [0, 0, 0, 0]


def test_route_rejects_too_many_experts():
    with pytest.raises(ValueError):
        R.route_triton(torch.zeros(4, dtype=torch.int64, device=DEVICE), R.MAX_EXPERTS + 1)


SPLIT_CASES = [(2, 7, 3), (3, 5, 0), (3, 5, 5), (1, 1, 0), (1, 1, 1), (0, 5, 2), (5, 300, 41),
               (8, 237, 40)]  # 8 x 237: two programs of the split kernel


@pytest.mark.parametrize("B,S,P", SPLIT_CASES, ids=[f"B{b}-S{s}-P{p}" for b, s, p in SPLIT_CASES])
def test_route_split_kernel_matches_the_stable_sort(B, S, P):
    """The one-launch position split gives the permutation and offsets the stable sort of the
    equivalent ids gives (and the torch-op form, routing.route_split)."""
    perm, offsets = R.route_split_triton(B, S, P, DEVICE)
    assert perm.dtype == torch.int32 and offsets.dtype == torch.int32
    assert perm.shape == (B * S,) and offsets.shape == (3,)
    ids = torch.ones(B, S, dtype=torch.int64)
    ids[:, :P] = 0
    assert torch.equal(perm.cpu().long(), torch.argsort(ids.reshape(-1), stable=True))
    assert offsets.cpu().tolist() == [0, B * P, B * S]
    torch_form = route_split_torch(B, S, P, "cpu")
    assert torch.equal(perm.cpu(), torch_form.perm) and torch.equal(offsets.cpu(), torch_form.offsets)


def test_route_split_kernel_rejects_bad_positions():
    for p in (-1, 6):
        with pytest.raises(ValueError, match="split position"):
            R.route_split_triton(2, 5, p, DEVICE)


# ---------------------------------------------------------------------------
# modality linear
# ---------------------------------------------------------------------------

LINEAR_CASES = [  # (T, E, pattern)
    (1, 1, "rand"),
    (7, 2, "rand"),
    (97, 3, "rand"),
    (97, 3, "empty"),
    (64, 3, "one"),
    (50, 2, "runs"),
]


@pytest.mark.parametrize("T,E,pattern", LINEAR_CASES, ids=[f"T{t}-E{e}-{p}" for t, e, p in LINEAR_CASES])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_linear_fp32(T, E, pattern, has_bias):
    ids, x, w, b, dy = linear_case(T, E, torch.float32, has_bias, pattern)
    check_linear(ids, x, w, b, dy, E)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T,E,pattern", [(97, 3, "empty"), (7, 2, "rand")], ids=["T97-E3-empty", "T7-E2"])
def test_linear_low_precision(dtype, T, E, pattern):
    ids, x, w, b, dy = linear_case(T, E, dtype, True, pattern, seed=3)
    check_linear(ids, x, w, b, dy, E)


@pytest.mark.parametrize("dtype", DTYPES, ids=[_DT[d] for d in DTYPES])
@pytest.mark.parametrize("h_in, h_out", [(H_IN, H_OUT), (32, 80)], ids=["unaligned", "aligned"])
def test_linear_heuristic_config(dtype, h_in, h_out):
    """The launchers' own tiles: scalar-load tiles at widths 20/36, the 16-byte aligned tiles
    (grouped GEMM 128 x 128, weight gradient 128 x 128 x 64 in 5 stages) at 32/80."""
    ids, x, w, b, dy = linear_case(150, 3, dtype, True, "rand", seed=5, h_in=h_in, h_out=h_out)
    check_linear(ids, x, w, b, dy, 3, config=None)


def test_linear_eight_experts():
    ids, x, w, b, dy = linear_case(120, 8, torch.float32, True, "rand", seed=7)
    ids[ids == 5] = 6  # one expert empty among eight
    check_linear(ids, x, w, b, dy, 8)


def test_linear_non_contiguous():
    """x and dy as column slices of wider tensors, the weight a transposed view: no copies needed."""
    T, E = 61, 3
    ids, x, w, b, dy = linear_case(T, E, torch.float32, True, "rand", seed=11)
    x_wide = torch.zeros(T, H_IN + 9, dtype=x.dtype)
    x_wide[:, 4:4 + H_IN] = x
    x_nc = x_wide[:, 4:4 + H_IN]
    dy_t = dy.t().contiguous().t()  # column-major
    w_t = w.transpose(1, 2).contiguous().transpose(1, 2)  # [E, Hout, Hin] with stride_k != 1
    assert not x_nc.is_contiguous() and not dy_t.is_contiguous() and not w_t.is_contiguous()
    check_linear(ids, x_nc, w_t, b, dy_t, E)


def test_linear_flags_and_zero_tokens():
    E = 3
    ids, x, w, b, dy = linear_case(9, E, torch.float32, True, "rand")
    perm, offsets = routing(ids, E)
    xd, wd, bd, dyd = (t.to(DEVICE) for t in (x, w, b, dy))
    dx, dw, db = K.linear_bwd_triton(dyd, xd, perm, offsets, wd, bd, True, [False] * E, config=SMALL)
    assert dx.shape == x.shape and dw.numel() == 0 and db.numel() == 0
    dx, dw, db = K.linear_bwd_triton(dyd, xd, perm, offsets, wd, None, False, [True] * E, config=SMALL)
    assert dx.numel() == 0 and dw.shape == w.shape and db.numel() == 0
    # T = 0: empty outputs, zero weight/bias gradients
    ids0 = torch.zeros(0, dtype=torch.int64)
    perm0, off0 = routing(ids0, E)
    x0 = torch.zeros(0, H_IN, device=DEVICE)
    y0 = K.linear_fwd_triton(x0, perm0, off0, wd, bd)
    assert y0.shape == (0, H_OUT)
    dx0, dw0, db0 = K.linear_bwd_triton(torch.zeros(0, H_OUT, device=DEVICE), x0, perm0, off0,
                                        wd, bd, True, [True] * E)
    assert dx0.shape == (0, H_IN)
    assert torch.equal(dw0.cpu(), torch.zeros_like(w)) and torch.equal(db0.cpu(), torch.zeros_like(b))


def test_zero_token_expert_gets_zero_grads():
    """Expert 1 receives no token: its dW/db are exactly zero (not stale memory)."""
    E = 3
    ids, x, w, b, dy = linear_case(40, E, torch.float32, True, "empty")
    perm, offsets = routing(ids, E)
    _, dw, db = K.linear_bwd_triton(dy.to(DEVICE), x.to(DEVICE), perm, offsets, w.to(DEVICE),
                                    b.to(DEVICE), False, [True] * E, config=SMALL)
    assert torch.equal(dw[1].cpu(), torch.zeros_like(dw[1].cpu()))
    assert torch.equal(db[1].cpu(), torch.zeros_like(db[1].cpu()))
    assert dw[0].abs().sum() > 0 and dw[2].abs().sum() > 0


# ---------------------------------------------------------------------------
# modality FFN
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("activation", C.ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=[_DT[d] for d in DTYPES])
def test_ffn_activations(activation, dtype):
    ids, *rest = ffn_case(97, 3, dtype, activation, True, "empty", seed=13)
    check_ffn(ids, *rest, 3, activation)


FFN_CASES = [  # (T, E, pattern, has_bias, activation)
    (1, 1, "rand", True, "gelu"),
    (7, 2, "rand", False, "swiglu"),
    (7, 2, "rand", True, "relu"),
    (97, 3, "rand", False, "silu"),
    (64, 2, "one", True, "swiglu"),
    (80, 3, "runs", True, "gelu_tanh"),
]


@pytest.mark.parametrize("T,E,pattern,has_bias,activation", FFN_CASES,
                         ids=[f"T{t}-E{e}-{p}-{'bias' if b else 'nobias'}-{a}" for t, e, p, b, a in FFN_CASES])
def test_ffn_shapes(T, E, pattern, has_bias, activation):
    ids, *rest = ffn_case(T, E, torch.float32, activation, has_bias, pattern, seed=T)
    check_ffn(ids, *rest, E, activation)


@pytest.mark.parametrize("f", [72, 40], ids=["wide", "narrow"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=[_DT[d] for d in DTYPES])
def test_ffn_heuristic_config(activation, dtype, f):
    """The launchers' own tiles at 16-byte aligned widths (H 32 in, 48 out): for 16-bit inputs
    128 x 128 with the epilogue in four slices (F = 72; swiglu's forward pairs 64 gate with 64
    up columns), and the narrow tiles of outputs <= 64 columns (F = 40: 128 x 64, swiglu
    32 + 32; swiglu's backward with its epilogue in two slices)."""
    for kind, n in (("ffn_fwd_in", f), ("ffn_bwd_dh", f)):
        if dtype != torch.float32:
            cfg = C.pick_config(kind, dtype, "tf32", activation == "swiglu", n, 8)
            narrow_split = 2 if (kind, activation) == ("ffn_bwd_dh", "swiglu") else 1
            assert cfg.BLOCK_N == (128 if f > 64 else 64)
            assert cfg.epilogue_split == (4 if f > 64 else narrow_split)
    ids, *rest = ffn_case(160, 2, dtype, activation, True, "runs", seed=17, f=f, h_in=32, h_out=48)
    check_ffn(ids, *rest, 2, activation, config=None)


@pytest.mark.parametrize("chunk", [1, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_token_chunked_weight_gradients(chunk, dtype):
    """The ``experts.wgrad_chunk`` option: each expert's tokens split across programs (chunks
    rounded up to BLOCK_T = 16), partial tiles summed with fp32 atomics; an empty expert stays
    zero."""
    with tuning.scope():
        tuning.set_option(C.WGRAD_CHUNK_OPTION, chunk)
        ids, x, w, b, dy = linear_case(97, 3, dtype, True, "empty", seed=21)
        check_linear(ids, x, w, b, dy, 3)
        ids, *rest = ffn_case(97, 3, dtype, "swiglu", True, "rand", seed=22)
        check_ffn(ids, *rest, 3, "swiglu", check_hidden=False)


@pytest.mark.parametrize("chunk", ["0", "32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=[_DT[d] for d in DTYPES])
@pytest.mark.parametrize("h_in, h_out", [(32, 64), (32, 40)], ids=["even", "masked"])
def test_wgrad_unmasked_steps_and_partial_last_step(chunk, dtype, h_in, h_out):
    """The weight-gradient loop runs its full BLOCK_T steps without a slot mask and a partial
    last step with one; with tiles dividing the dW shape (32 x 16 tiles of a 64 x 32 dW) it
    drops the row/column masks too (EVEN). 97 ragged tokens give every expert a partial step;
    chunks of 32 give full-step-only programs as well."""
    cfg = SMALL["wgrad_linear"]
    assert (h_out % cfg.BLOCK_N == 0 and h_in % cfg.BLOCK_K == 0) == (h_out == 64)
    E, T = 3, 97
    ids = make_ids(T, E, "rand", seed=31)
    cast = (lambda t: t.to(dtype))
    x = cast(rand(T, h_in, seed=32))
    w = cast(rand(E, h_out, h_in, scale=h_in ** -0.5, seed=33))
    b = cast(rand(E, h_out, seed=34))
    dy = cast(rand(T, h_out, seed=35))
    with tuning.scope():
        tuning.set_option(C.WGRAD_CHUNK_OPTION, chunk)
        check_linear(ids, x, w, b, dy, E)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=[_DT[d] for d in DTYPES])
@pytest.mark.parametrize("h, f", [(32, 64), (32, 40)], ids=["even", "masked"])
def test_ffn_even_tiles(dtype, activation, h, f):
    """Widths the SMALL tiles divide (H = 32, F = 64: EVEN, no k/column masks in the grouped
    GEMMs' loops and no dW masks in the weight gradients) and widths they do not (F = 40)."""
    ids, *rest = ffn_case(97, 3, dtype, activation, True, "rand", seed=41, f=f, h_in=h, h_out=h)
    check_ffn(ids, *rest, 3, activation)


@pytest.mark.parametrize("split", [2, 4])
@pytest.mark.parametrize("activation", C.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ffn_split_epilogue(dtype, activation, split):
    """The grouped GEMMs' epilogue over 2 or 4 column slices of the tile in turn
    (``MMConfig.epilogue_split``): bias, h, activation and act' land on the right columns. 16 x 64
    tiles over H = 40 (two slices of four past the last column) and F = 72 (a tile of 8 valid
    columns, then masked slices), 97 ragged tokens over 3 experts."""
    cfg = {**SMALL, **{k: C.MMConfig(16, 64, 16, 4, 1, 0, split) for k in C.MM_KINDS}}
    ids, *rest = ffn_case(97, 3, dtype, activation, True, "rand", seed=51, f=72, h_in=40, h_out=40)
    check_ffn(ids, *rest, 3, activation, config=cfg)
    ids, x, w, b, dy = linear_case(97, 3, dtype, True, "empty", seed=58)
    check_linear(ids, x, w, b, dy, 3, config=cfg)


def test_wgrad_int64_row_offsets(monkeypatch):
    """Inputs whose element offsets pass 2**31 take the weight gradient's int64 row offsets
    (ROW32 off); the int32 ones are what every smaller launch uses. Same results either way."""
    big = torch.empty_strided((2, 3), (2 ** 31, 1), device="meta")
    assert K.offsets_fit_int32(torch.empty(5, 7), big[:1])
    assert not K.offsets_fit_int32(torch.empty(5, 7), big)
    assert not K.offsets_fit_int32(torch.empty_strided((2 ** 20, 2 ** 11 + 1), (2 ** 11 + 1, 1), device="meta"))
    monkeypatch.setattr(K.launch, "offsets_fit_int32", lambda *ts: False)
    for chunk in (0, 32):
        with tuning.scope():
            tuning.set_option(C.WGRAD_CHUNK_OPTION, chunk)
            ids, x, w, b, dy = linear_case(97, 3, torch.bfloat16, True, "rand", seed=61)
            check_linear(ids, x, w, b, dy, 3)


def test_wgrad_chunk_option_is_checked():
    """``experts.wgrad_chunk``: "auto" (the default) or a token count >= 0."""
    with tuning.scope():
        for bad in (-1, "many", True):
            with pytest.raises(ValueError, match=C.WGRAD_CHUNK_OPTION):
                tuning.set_option(C.WGRAD_CHUNK_OPTION, bad)
        assert C.wgrad_chunk_setting() is None  # auto
        for raw, want in (("AUTO", None), (0, 0), ("2048", 2048)):
            tuning.set_option(C.WGRAD_CHUNK_OPTION, raw)
            assert C.wgrad_chunk_setting() == want
    assert C.wgrad_chunk_setting() is None  # the scope undid it


def test_launch_kinds_are_registered_with_tuning():
    """Every grouped-GEMM launch kind takes a typed override through mmkernels.tuning, matched
    on the launch's case keys; a config of the wrong shape is refused."""
    kinds = tuning.kinds()
    for kind in C.MM_KINDS:
        assert kinds[f"experts/{kind}"] == {"fields": C.MMConfig._fields, "keys": C.MM_KEYS}
    for kind in C.WGRAD_KINDS:
        assert kinds[f"experts/{kind}"] == {"fields": C.WGradConfig._fields, "keys": C.WGRAD_KEYS}
    with tuning.scope():
        with pytest.raises(ValueError, match="unknown config fields"):
            tuning.set_config("experts", "ffn_fwd_in", {"BLOCK_M": 16, "BLOCK_T": 16})
        with pytest.raises(ValueError, match="matches on"):
            tuning.set_config("experts", "ffn_fwd_in", C.MMConfig(16, 32, 16, 4, 1), head_dim=64)
        tuning.set_config("experts", "ffn_fwd_in", {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16,
                                                    "num_warps": 4, "num_stages": 1}, dtype="bfloat16")
        assert tuning.lookup("experts", "ffn_fwd_in", dtype=torch.bfloat16) == C.MMConfig(16, 32, 16, 4, 1)
        assert tuning.lookup("experts", "ffn_fwd_in", dtype=torch.float16) is None


def test_config_overrides_replace_the_heuristic():
    """A tuning override reaches the launches of its kind and case (and only those) and computes
    the same results; an explicit ``config=`` still wins."""
    heur = C.pick_config("ffn_fwd_in", torch.bfloat16, "tf32", False, 4096, 16)
    with tuning.scope():
        tuning.set_config("experts", "ffn_fwd_in", C.MMConfig(16, 32, 16, 4, 1))
        tuning.set_config("experts", "wgrad_ffn_in", C.WGradConfig(32, 16, 16, 4, 1), dtype=torch.float32)
        small = C.MMConfig(16, 32, 16, 4, 1)
        assert C.pick_config("ffn_fwd_in", torch.bfloat16, "tf32", False, 4096, 16) == small
        assert C.pick_config("ffn_fwd_out", torch.bfloat16, "tf32", False, 4096, 16) != small
        assert C.pick_config("ffn_fwd_in", torch.bfloat16, "tf32", False, 4096, 16, heur) == heur
        assert C.pick_config("wgrad_ffn_in", torch.float32, "ieee", False, 64, 16) == C.WGradConfig(32, 16, 16, 4, 1)
        assert C.pick_config("wgrad_ffn_in", torch.bfloat16, "tf32", False, 64, 16) != C.WGradConfig(32, 16, 16, 4, 1)
        ids, *rest = ffn_case(97, 2, torch.float32, "gelu", True, "rand", seed=51)
        check_ffn(ids, *rest, 2, "gelu", config=None)
    assert C.pick_config("ffn_fwd_in", torch.bfloat16, "tf32", False, 4096, 16) == heur


def test_launch_options_register_caps():
    """A grouped-GEMM config's register cap reaches the launch; the weight gradient's 8-warp
    tiles are capped for two programs per SM, its 4-warp ones need no cap."""
    assert C.launch_options("ffn_fwd_in", C.MMConfig(128, 128, 64, 8, 3)) == {}
    assert C.launch_options("ffn_fwd_in", C.MMConfig(128, 128, 64, 8, 3, 168)) == {"maxnreg": 168}
    assert C.launch_options("wgrad_ffn_in", C.WGradConfig(128, 128, 64, 8, 5)) == {"maxnreg": 128}
    assert C.launch_options("wgrad_ffn_in", C.WGradConfig(64, 64, 32, 4, 5)) == {}
    assert C.launch_options("route", None) == {}
    ids, *rest = ffn_case(97, 2, torch.float32, "gelu", True, "rand", seed=52)  # interpreted: no-op
    check_ffn(ids, *rest, 2, "gelu", config={**SMALL, "ffn_fwd_in": C.MMConfig(16, 32, 16, 4, 1, 64)})


def test_auto_wgrad_chunk_policy():
    """The automatic token chunking of the weight gradient (no GPU needed: a pure function)."""
    sms = 132  # H100 / H200
    vlmo_tiles = (3072 // 128) * (768 // 128)  # dW_in of the VLMo FFN at 128 x 128 tiles: 144 per expert
    T = 64 * 237
    chunk = C.auto_wgrad_chunk(T, 2, vlmo_tiles, 64, sms, deterministic=False)
    # about WGRAD_PROGRAMS_PER_SM programs per SM, whole reduction steps
    assert chunk % 64 == 0 and C.WGRAD_MIN_CHUNK <= chunk < T
    programs = vlmo_tiles * T / chunk
    assert 0.9 * C.WGRAD_PROGRAMS_PER_SM * sms <= programs <= C.WGRAD_PROGRAMS_PER_SM * sms
    # CogVLM's MLP (dW_in [2, 22016, 4096]): 11008 tiles already balance themselves
    assert C.auto_wgrad_chunk(4 * 1526, 2, 172 * 32, 64, sms, deterministic=False) == 0
    # deterministic algorithms, an unknown SM count (interpreter), too few tokens: no atomics
    assert C.auto_wgrad_chunk(T, 2, vlmo_tiles, 64, sms, deterministic=True) == 0
    assert C.auto_wgrad_chunk(T, 2, vlmo_tiles, 64, 0, deterministic=False) == 0
    assert C.auto_wgrad_chunk(1000, 2, vlmo_tiles, 64, sms, deterministic=False) == 0  # chunks < 512
    assert C.auto_wgrad_chunk(0, 2, vlmo_tiles, 64, sms, deterministic=False) == 0


def test_auto_wgrad_chunk_on_this_device():
    """auto on a non-CUDA device (the interpreter) never chunks; a number is used as given."""
    assert C.wgrad_chunk(1 << 20, 2, 4, 64, torch.device("cpu")) == 0
    with tuning.scope():
        tuning.set_option(C.WGRAD_CHUNK_OPTION, 96)
        assert C.wgrad_chunk(1 << 20, 2, 4, 64, torch.device("cpu")) == 96


def test_ffn_non_contiguous():
    T, E = 45, 2
    ids, x, w_in, b_in, w_out, b_out, dy = ffn_case(T, E, torch.float32, "swiglu", True, "rand", seed=19)
    x_nc = x.t().contiguous().t()
    dy_wide = torch.zeros(T, 2 * H_OUT, dtype=dy.dtype)
    dy_wide[:, ::2] = dy
    dy_nc = dy_wide[:, ::2]
    w_out_nc = w_out.transpose(1, 2).contiguous().transpose(1, 2)
    b_in_nc = torch.zeros(E, b_in.shape[1], 3, dtype=b_in.dtype)
    b_in_nc[:, :, 1] = b_in
    b_in_nc = b_in_nc[:, :, 1]
    assert not (x_nc.is_contiguous() or dy_nc.is_contiguous() or w_out_nc.is_contiguous()
                or b_in_nc.is_contiguous())
    check_ffn(ids, x_nc, w_in, b_in_nc, w_out_nc, b_out, dy_nc, E, "swiglu")


def test_ffn_zero_tokens():
    E, act = 2, "gelu"
    ids, x, w_in, b_in, w_out, b_out, dy = ffn_case(3, E, torch.float32, act, True, "rand")
    perm, offsets = routing(torch.zeros(0, dtype=torch.int64), E)
    x0 = torch.zeros(0, H_IN, device=DEVICE)
    dev = [t.to(DEVICE) for t in (w_in, b_in, w_out, b_out)]
    y, h, a = K.ffn_fwd_triton(x0, perm, offsets, *dev, act)
    assert y.shape == (0, H_OUT) and h.shape == (0, F_W) and a.shape == (0, F_W)
    dx, dwi, dbi, dwo, dbo = K.ffn_bwd_triton(torch.zeros(0, H_OUT, device=DEVICE), x0, perm,
                                              offsets, *dev, h, a, act)
    assert dx.shape == (0, H_IN)
    for g, ref in ((dwi, w_in), (dbi, b_in), (dwo, w_out), (dbo, b_out)):
        assert torch.equal(g.cpu(), torch.zeros_like(ref))


# ---------------------------------------------------------------------------
# the tests can fail
# ---------------------------------------------------------------------------


def test_wrong_routing_is_detected():
    """Routing every token to the wrong expert must fail the comparison (the checks have teeth)."""
    E = 2
    ids, x, w, b, dy = linear_case(20, E, torch.float32, True, "rand")
    perm, offsets = routing(1 - ids, E)
    y = K.linear_fwd_triton(x.to(DEVICE), perm, offsets, w.to(DEVICE), b.to(DEVICE), config=SMALL)
    with pytest.raises(AssertionError):
        assert_close(y, ref_linear(ids, x, w, b, dy)[0])


def test_heuristic_configs_are_known():
    for kind in C.KERNEL_KINDS:
        for dtype in DTYPES:
            for prec in C.input_precisions(dtype):
                for sw in (False, True):
                    for n in (8, 64, 100, 4096):
                        cfg = C.heuristic_config(kind, dtype, prec, sw, n)
                        assert cfg in C.candidate_configs(kind, dtype, prec, sw)


# ----------------------------------------------------------------------------- weight-gradient masks

@pytest.mark.parametrize("mask", [[True, False, True], [False, True, True], [False, False, True]], ids=str)
def test_linear_wgrad_mask_skips_frozen_experts(monkeypatch, mask):
    """Experts left out of the mask get zero dW/db slices and no programs (one launch per run of
    flagged experts); the flagged experts' gradients are those of the full computation."""
    E = 3
    ids, x, w, b, dy = linear_case(40, E, torch.float32, True, "rand")
    perm, offsets = routing(ids, E)
    xd, wd, bd, dyd = (t.to(DEVICE) for t in (x, w, b, dy))
    full = K.linear_bwd_triton(dyd, xd, perm, offsets, wd, bd, True, [True] * E, config=SMALL)
    seen = record_launches(monkeypatch)
    dx, dw, db = K.linear_bwd_triton(dyd, xd, perm, offsets, wd, bd, True, mask, config=SMALL)
    runs, n = [], 0  # lengths of the runs of consecutive flagged experts
    for flag in mask + [False]:
        if flag:
            n += 1
        elif n:
            runs, n = runs + [n], 0
    assert [e for what, _, e in (s for s in seen if s[0] == "wgrad")] == runs
    assert torch.equal(dx, full[0])
    for e in range(E):
        if mask[e]:
            assert torch.equal(dw[e], full[1][e]) and torch.equal(db[e], full[2][e])
        else:
            assert bool((dw[e] == 0).all()) and bool((db[e] == 0).all()) and bool(full[1][e].abs().sum() > 0)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_ffn_backward_computes_only_what_is_wanted(monkeypatch, activation):
    """needs_dx and the two per-expert masks decide which launches run: frozen weights cost no
    weight-gradient launch, no dx needs no dx launch, and nothing wanted of the first layer
    skips dh too. What is computed equals the full backward's."""
    E = 2
    ids, x, w_in, b_in, w_out, b_out, dy = ffn_case(30, E, torch.float32, activation, True, "rand")
    perm, offsets = routing(ids, E)
    dev = [t.to(DEVICE) for t in (x, w_in, b_in, w_out, b_out, dy)]
    xd, wid, bid, wod, bod, dyd = dev
    y, h, a = K.ffn_fwd_triton(xd, perm, offsets, wid, bid, wod, bod, activation, config=SMALL)
    args = (dyd, xd, perm, offsets, wid, bid, wod, bod, h, a, activation)
    full = K.ffn_bwd_triton(*args, config=SMALL)
    seen = record_launches(monkeypatch)
    # frozen weights (adapter training): dx only
    got = K.ffn_bwd_triton(*args, True, [False] * E, [False] * E, config=SMALL)
    assert seen == [("mm", "ffn_bwd_dh"), ("mm", "ffn_bwd_dx")]
    assert torch.equal(got[0], full[0]) and all(g.numel() == 0 for g in got[1:])
    # the second layer of expert 1 only: no dh, no dx
    seen.clear()
    got = K.ffn_bwd_triton(*args, False, [False] * E, [False, True], config=SMALL)
    assert seen == [("wgrad", "wgrad_ffn_out", 1)]
    assert got[0].numel() == 0 and got[1].numel() == 0 and got[2].numel() == 0
    assert torch.equal(got[3][1], full[3][1]) and torch.equal(got[4][1], full[4][1])
    assert bool((got[3][0] == 0).all()) and bool((got[4][0] == 0).all())
    # the first layer of expert 0: dh but no dx
    seen.clear()
    got = K.ffn_bwd_triton(*args, False, [True, False], [False] * E, config=SMALL)
    assert seen == [("mm", "ffn_bwd_dh"), ("wgrad", "wgrad_ffn_in", 1)]
    assert torch.equal(got[1][0], full[1][0]) and torch.equal(got[2][0], full[2][0])
    assert bool((got[1][1] == 0).all()) and got[3].numel() == 0
