"""Cross-attention family: few-query cross-attention, the fused K/V projection and a whole Q-Former step
against SDPA's backends, eager PyTorch and HF transformers' BLIP-2 Q-Former.

Three ops, all timed forward + backward (mode ``fwd+bwd``):

* ``cross_attention``: ``mmkernels.cross_attention(q, k, v)``, shape keys ``model, B, Lq, Lk, H, D``.
  ``q [B, H, Lq, D]``; ``k``/``v`` ``[B, H, Lk, D]`` are strided views of one ``[B, Lk, 2*H*D]``
  projection output (K columns then V columns, the layout the Q-Former's fused projection hands
  its attention), made inside every provider from the ``kv`` input (views are free), so the
  gradient reaches ``kv`` itself. ``loss = sum(out * dout)``, gradients for ``q`` and ``kv``.
  ``model`` names the layout: ``blip2`` (Q-Former cross-attention: 32 queries, 12 x 64, image
  tokens Lk = 257 for ViT-g/14 at 224 px, 677 for 364 px) and ``coca`` (CoCa's attentional
  pooler: 256 queries over 257 ViT tokens, 8 heads of 96).
* ``kv_projection``: ``mmkernels.fused_kv_projection`` over the six cross-attention layers of a
  BLIP-2 Q-Former: ``image_embeds [B, Lk, C]`` and ``L`` pairs ``(W_k, W_v) [H*D, C]`` with biases;
  shape keys ``B, Lk, C, L, H, D``. Every provider returns ``L`` pairs of ``[B, H, Lk, D]``
  tensors. The backward receives a fixed random ``dout`` for each of them directly (an autograd
  function injects it; the loss value, a checksum ``sum(k * dout_k) + sum(v * dout_v)``, is computed
  without autograd): ``sum(out * dout)`` through autograd would add an elementwise pass over every
  output in forward and backward, ~25% of this GEMM-only op. Gradients for ``image_embeds`` and every
  weight and bias.
* ``qformer``: one training step of a BLIP-2 Q-Former with text input, ``mmkernels.QFormer`` and the
  patched HF model against HF's ``Blip2QFormerModel``: its tables, inputs, providers and case live in
  :mod:`bench.cases.qformer_step` (described there); this module builds its cases and checks its
  agreement.

The family and op names and the helpers both modules use live in :mod:`bench.cases.xattn_common`.

Providers, ``cross_attention``:

* ``mmkernels``: ``mmkernels.cross_attention(q, k, v)`` on the strided views.
* ``sdpa_flash``, ``sdpa_efficient``, ``sdpa_cudnn``, ``sdpa_math``:
  ``F.scaled_dot_product_attention(q, k, v)`` under ``torch.nn.attention.sdpa_kernel(backend)``.
  Each is probed once per (device, dtype, layout) with a small forward + backward (B <= 2, the
  case's Lq, Lk, H, D): strided views first, contiguous copies of k/v when the backend rejects
  the strides (the copies are then part of its time), else skipped with SDPA's reason.
* ``eager``: ``softmax(q @ k^T * scale) @ v`` in the input dtype, as HF's eager Q-Former attention
  (BLIP's ``eager_attention_forward``: no fp32 upcast of the scores).
* ``reference``: ``mmkernels.cross_attention.cross_attention_reference`` (eager, fp32 scores).

Providers, ``kv_projection``:

* ``mmkernels``: ``mmkernels.fused_kv_projection`` with the layers' weights and biases moved back to
  back into one storage by ``mmkernels.share_kv_storage`` (done by the provider's
  first, untimed call, as ``mmkernels.QFormer`` and ``patch_blip2`` do once): one GEMM, no copy.
* ``mmkernels_cat``: the same function on the separately allocated weights (what a plain HF model
  holds): it concatenates the weights (and biases) on every call.
* ``separate``: twelve ``F.linear`` + ``view`` + ``transpose``, as HF's Q-Former does per layer.
* ``reference``: the same computation as ``separate``, kept as the float64 oracle of the agreement
  test (``pytest bench/ -k agrees``); skipped when timing (it would duplicate ``separate``).

dtype: fp32 on CPU, bf16 on GPU (the ``qformer`` providers hold bf16 weights too; see
:mod:`bench.cases.qformer_step`).

Agreement: ``cross_attention`` and ``kv_projection`` take only tensors and have a ``reference``
provider, so ``tests/bench/test_agreement.py::test_provider_agrees`` checks every provider
against it in float64. :func:`agree` checks one provider of any case of this family (the
``qformer`` providers against ``hf_eager`` in float64, in eval mode: dropout masks differ by design)
with per-tensor tolerances relative to the oracle's largest value.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from bench.cases import mm
from bench.cases.qformer_step import (CPU_QFORMER, GPU_QFORMER, PARAM_PREFIX, PYTEST_QFORMER, QFormerContext,
                                      qformer_case)
from bench.cases.common import elem_size, first_line, missing, randn
from bench.cases.xattn_common import (FAMILY, OP_KV, OP_QFORMER, OP_XATTN, _loss, mmkernels_xattn_support, split_kv,
                                      xattn_mmkernels)
from bench.harness import Case, Provider

BWD_FLOP_FACTOR = 2.5  # attention forward + backward = 2.5 x forward (as the attention family counts)
SDPA_BACKENDS = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_math": "MATH",
}

# cross_attention: (model, B, Lq, Lk, H, D)
GPU_XATTN = {
    "full": [
        ("blip2", 128, 32, 257, 12, 64),
        ("blip2", 128, 32, 677, 12, 64),
        ("blip2", 256, 32, 257, 12, 64),
        ("blip2", 256, 32, 677, 12, 64),
        ("coca", 128, 256, 257, 8, 96),
    ],
    "quick": [
        ("blip2", 128, 32, 257, 12, 64),
        ("coca", 128, 256, 257, 8, 96),
    ],
}
# (Lk = 677 only with --size Lk=257,677: the family's CPU run stays short on 2 cores)
CPU_XATTN = {
    "full": [
        ("blip2", 8, 32, 257, 12, 64),
        ("coca", 2, 256, 257, 8, 96),
    ],
    "quick": [
        ("blip2", 8, 32, 257, 12, 64),
        ("coca", 2, 256, 257, 8, 96),
    ],
}
PYTEST_XATTN = [
    ("blip2", 2, 5, 13, 2, 16),
    ("coca", 2, 9, 11, 2, 24),  # head dim not a power of two (CoCa's 96, EVA's 88 need masking to BLOCK_D)
]

# kv_projection: (B, Lk, C, L, H, D)
GPU_KV = {
    "full": [(128, 257, 1408, 6, 12, 64), (256, 257, 1408, 6, 12, 64)],
    "quick": [(128, 257, 1408, 6, 12, 64)],
}
CPU_KV = {"full": [(2, 257, 1408, 6, 12, 64)], "quick": [(2, 257, 1408, 6, 12, 64)]}
PYTEST_KV = [(2, 7, 48, 2, 2, 8)]


# --------------------------------------------------------------------------
# cross_attention
# --------------------------------------------------------------------------


def make_xattn_inputs(case: Case) -> dict:
    s = case.shape
    B, Lq, Lk, H, D = s["B"], s["Lq"], s["Lk"], s["H"], s["D"]
    dev, dt = case.device, case.torch_dtype
    g = torch.Generator(device=dev).manual_seed(case.seed)
    return {
        "q": randn((B, H, Lq, D), g, dev).to(dt).requires_grad_(),
        "kv": randn((B, Lk, 2 * H * D), g, dev).to(dt).requires_grad_(),
        "dout": randn((B, H, Lq, D), g, dev).to(dt),
    }



def xattn_reference(q, kv, dout=None):
    from mmkernels.cross_attention import cross_attention_reference

    k, v = split_kv(q, kv)
    return _loss(cross_attention_reference(q, k, v), dout)


def xattn_eager(q, kv, dout=None):
    """HF BLIP ``eager_attention_forward``: matmul, scale, softmax in the input dtype, matmul."""
    k, v = split_kv(q, kv)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    probs = F.softmax(scores, dim=-1)
    return _loss(torch.matmul(probs, v), dout)


def device_key(device) -> str:
    """``cpu`` / ``cuda:<index>`` (the current device for a bare ``cuda``): one probe per device."""
    d = torch.device(device)
    if d.type == "cuda":
        return f"cuda:{d.index if d.index is not None else torch.cuda.current_device()}"
    return d.type


def _sdpa(q, k, v, backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, backend)):
        return F.scaled_dot_product_attention(q, k, v)


def xattn_sdpa(q, kv, dout=None, *, backend: str):
    k, v = split_kv(q, kv)
    how = sdpa_layout(backend, device_key(q.device), str(q.dtype).replace("torch.", ""), q.shape[2], kv.shape[1],
                      q.shape[1], q.shape[3])
    if how == "contiguous":
        k, v = k.contiguous(), v.contiguous()
    return _loss(_sdpa(q, k, v, backend), dout)


def _sdpa_try(backend: str, device: str, dtype: torch.dtype, Lq: int, Lk: int, H: int, D: int,
              contiguous: bool) -> Optional[str]:
    """None when the backend runs forward + backward on this layout, else SDPA's reason."""
    B = 2
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, Lq, D, generator=g, device=device).to(dtype).requires_grad_()
    kv = torch.randn(B, Lk, 2 * H * D, generator=g, device=device).to(dtype).requires_grad_()
    k, v = split_kv(q, kv)
    if contiguous:
        k, v = k.contiguous(), v.contiguous()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = _sdpa(q, k, v, backend)
            out.float().sum().backward()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if not torch.isfinite(out).all():
                return "non-finite output"
            return None
        except Exception as exc:
            why = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
            why = [w for w in why if "kernel" in w.lower() or "support" in w.lower() or "require" in w.lower()]
            text = first_line(exc)
            if why:
                text += " (" + "; ".join(dict.fromkeys(why))[:240] + ")"
            return text


@functools.lru_cache(maxsize=None)
def sdpa_layout(backend: str, device: str, dtype: str, Lq: int, Lk: int, H: int, D: int) -> str:
    """``"strided"`` when the backend takes the strided k/v views, ``"contiguous"`` when it needs
    copies; raises ``RuntimeError`` with SDPA's reason when it runs neither (probed once)."""
    from bench.harness import DTYPES

    dt = DTYPES[dtype]
    why = _sdpa_try(backend, device, dt, Lq, Lk, H, D, contiguous=False)
    if why is None:
        return "strided"
    why2 = _sdpa_try(backend, device, dt, Lq, Lk, H, D, contiguous=True)
    if why2 is None:
        return "contiguous"
    if device == "cpu" and backend in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        raise RuntimeError(f"SDPA {backend} has no CPU kernel ({why2})"[:400])
    raise RuntimeError(f"SDPA {backend} does not run this case on {device} in {dtype}: {why2}"[:400])


def check_sdpa(backend: str, case: Case) -> Optional[str]:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
    except Exception as exc:
        return f"torch.nn.attention.sdpa_kernel not importable ({first_line(exc)})"
    if not hasattr(SDPBackend, backend):
        return f"torch {torch.__version__} has no SDPBackend.{backend}"
    s = case.shape
    try:
        sdpa_layout(backend, device_key(case.device), case.dtype, s["Lq"], s["Lk"], s["H"], s["D"])
    except RuntimeError as exc:
        return str(exc)
    return None


def check_mmkernels_xattn(case: Case) -> Optional[str]:
    return mmkernels_xattn_support(case.device, case.dtype)


def check_reference_xattn(case: Case) -> Optional[str]:
    return missing("mmkernels.cross_attention", "cross_attention_reference")


def _xdims(case: Case) -> tuple:
    s = case.shape
    return s["B"], s["Lq"], s["Lk"], s["H"], s["D"]


def est_xattn_tiled(case: Case) -> int:
    """out, lse, dq, dk, dv (fp32 scratch) and contiguous copies of k/v."""
    B, Lq, Lk, H, D = _xdims(case)
    return 4 * (3 * B * H * Lq * D + 4 * B * H * Lk * D) + 64 * B * H * Lq


def est_xattn_dense(case: Case) -> int:
    """The [B, H, Lq, Lk] scores, probabilities and their gradients (fp32: up to 6 of them)."""
    B, Lq, Lk, H, D = _xdims(case)
    return 6 * B * H * Lq * Lk * 4 + est_xattn_tiled(case)


def xattn_providers() -> tuple:
    sdpa = tuple(
        Provider(name, functools.partial(xattn_sdpa, backend=backend), check=functools.partial(check_sdpa, backend),
                 mem_estimate=est_xattn_dense if backend == "MATH" else est_xattn_tiled,
                 note=f"F.scaled_dot_product_attention under sdpa_kernel(SDPBackend.{backend}) on the strided "
                      "k/v views (contiguous copies, timed, where the backend rejects the strides)")
        for name, backend in SDPA_BACKENDS.items()
    )
    return (
        Provider("mmkernels", xattn_mmkernels, check=check_mmkernels_xattn, mem_estimate=est_xattn_tiled,
                 note="mmkernels.cross_attention(q, k, v) on k/v strided views of the [B, Lk, 2*H*D] projection"),
        *sdpa,
        Provider("eager", xattn_eager, mem_estimate=est_xattn_dense,
                 note="HF eager: softmax(q @ k^T * scale) @ v in the input dtype (BLIP's eager_attention_forward)"),
        Provider("reference", xattn_reference, check=check_reference_xattn, mem_estimate=est_xattn_dense,
                 note="mmkernels.cross_attention.cross_attention_reference (eager, fp32 scores [B, H, Lq, Lk])"),
    )


def xattn_case(model: str, B: int, Lq: int, Lk: int, H: int, D: int, dtype: str, device: str) -> Case:
    fwd = 4.0 * B * H * Lq * Lk * D
    return Case(
        family=FAMILY,
        op=OP_XATTN,
        shape={"model": model, "B": B, "Lq": Lq, "Lk": Lk, "H": H, "D": D},
        dtype=dtype,
        device=device,
        make_inputs=make_xattn_inputs,
        providers=xattn_providers(),
        mode="fwd+bwd",
        flops=BWD_FLOP_FACTOR * fwd,
        flops_formula="2.5*4*B*H*Lq*Lk*D",
        x="Lk",
        note="k/v strided views of one [B, Lk, 2*H*D] projection",
    )


# --------------------------------------------------------------------------
# kv_projection
# --------------------------------------------------------------------------


def _kv_names(L: int) -> tuple:
    ws = [f"w{s}{l}" for l in range(L) for s in "kv"]
    bs = [f"b{s}{l}" for l in range(L) for s in "kv"]
    return ws, bs


def make_kv_inputs(case: Case) -> dict:
    s = case.shape
    B, Lk, C, L, H, D = s["B"], s["Lk"], s["C"], s["L"], s["H"], s["D"]
    dev, dt = case.device, case.torch_dtype
    g = torch.Generator(device=dev).manual_seed(case.seed)
    inputs = {"image_embeds": randn((B, Lk, C), g, dev).to(dt).requires_grad_()}
    ws, bs = _kv_names(L)
    for name in ws:  # separately allocated, as nn.Linear modules hold them
        inputs[name] = nn.Parameter(randn((H * D, C), g, dev, C**-0.5).to(dt))
    for name in bs:
        inputs[name] = nn.Parameter(randn((H * D,), g, dev, 0.1).to(dt))
    inputs["dout"] = randn((L, 2, B, H, Lk, D), g, dev).to(dt)
    return inputs


def _pairs(params: dict, L: int) -> tuple:
    ws, bs = _kv_names(L)
    w = [(params[ws[2 * l]], params[ws[2 * l + 1]]) for l in range(L)]
    b = [(params[bs[2 * l]], params[bs[2 * l + 1]]) for l in range(L)]
    return w, b


class _InjectGrad(torch.autograd.Function):
    """A scalar whose backward hands every output its ``dout`` (no elementwise pass in autograd).
    Its value is the checksum ``sum_i sum(out_i * dout_i)`` (fp32), computed without autograd."""

    @staticmethod
    def forward(ctx, dout, *outs):
        ctx.dout = dout
        with torch.no_grad():
            acc = sum((o * d).sum(dtype=torch.promote_types(o.dtype, torch.float32)) for o, d in zip(outs, dout))
        return acc

    @staticmethod
    def backward(ctx, grad):
        dout = ctx.dout
        del ctx.dout
        return (None, *dout)


def _kv_loss(pairs: list, dout: torch.Tensor):
    outs = [t for pair in pairs for t in pair]
    L = len(pairs)
    douts = [dout[l, s] for l in range(L) for s in range(2)]
    return _InjectGrad.apply(douts, *outs)


def _back_to_back(ts: list) -> bool:
    ptr = ts[0].data_ptr()
    for t in ts:
        if not t.is_contiguous() or t.data_ptr() != ptr:
            return False
        ptr += t.numel() * t.element_size()
    return True


def _shell(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` holding the given tensors (so ``share_kv_storage`` can move them)."""
    lin = nn.Linear(1, 1, device="meta")
    lin._parameters["weight"] = weight
    lin._parameters["bias"] = bias
    return lin


def share_storage(w_pairs: list, b_pairs: list) -> None:
    """Weights and biases back to back in one storage each, via ``share_kv_storage``; a no-op once done."""
    ws = [t for p in w_pairs for t in p]
    bs = [t for p in b_pairs for t in p]
    if _back_to_back(ws) and _back_to_back(bs):
        return
    from mmkernels.cross_attention import share_kv_storage

    share_kv_storage([(_shell(wk, bk), _shell(wv, bv)) for (wk, wv), (bk, bv) in zip(w_pairs, b_pairs)])


def kv_mmkernels(image_embeds, dout, *, shared=True, **params):
    import mmkernels

    L = dout.shape[0]
    w, b = _pairs(params, L)
    if shared:
        share_storage(w, b)  # the first (untimed) call moves them; later calls see them shared
    return _kv_loss(mmkernels.fused_kv_projection(image_embeds, w, b, num_heads=dout.shape[3]), dout)


def kv_separate(image_embeds, dout, **params):
    """HF's per-layer ``self.key(x).view(B, Lk, H, D).transpose(1, 2)`` (and value), twelve GEMMs."""
    L, _two, B, H, Lk, D = dout.shape
    w, b = _pairs(params, L)
    pairs = []
    for (wk, wv), (bk, bv) in zip(w, b):
        k = F.linear(image_embeds, wk, bk).view(B, Lk, H, D).transpose(1, 2)
        v = F.linear(image_embeds, wv, bv).view(B, Lk, H, D).transpose(1, 2)
        pairs.append((k, v))
    return _kv_loss(pairs, dout)


def kv_reference(image_embeds, dout, **params):
    return kv_separate(image_embeds, dout, **params)


def check_mmkernels_kv(case: Case) -> Optional[str]:
    return missing("mmkernels.cross_attention", "share_kv_storage") or missing("mmkernels", "fused_kv_projection")


def check_oracle_only(case: Case) -> Optional[str]:
    return "float64 oracle of the agreement test only (the same twelve F.linear as `separate`)"


def est_kv(factor: float, case: Case) -> int:
    """The ``[B, Lk, L*2*H*D]`` output (and its gradient buffer), ``factor`` of them, plus the
    concatenated weight (and its gradient) for the fused providers."""
    s = case.shape
    e = elem_size(case)
    y = s["B"] * s["Lk"] * s["L"] * 2 * s["H"] * s["D"] * e
    w = s["L"] * 2 * s["H"] * s["D"] * s["C"] * e
    return int(factor * y + 2 * w)


def kv_providers() -> tuple:
    return (
        Provider("mmkernels", kv_mmkernels, check=check_mmkernels_kv, mem_estimate=functools.partial(est_kv, 2),
                 note="mmkernels.fused_kv_projection(x, weights, biases, num_heads=H), the weights and biases "
                      "moved into one storage by share_kv_storage (first, untimed call): one GEMM, no copy"),
        Provider("mmkernels_cat", functools.partial(kv_mmkernels, shared=False), check=check_mmkernels_kv,
                 mem_estimate=functools.partial(est_kv, 2),
                 note="mmkernels.fused_kv_projection on separately allocated weights: torch.cat of the weights "
                      "and biases on every call"),
        Provider("separate", kv_separate, mem_estimate=functools.partial(est_kv, 2),
                 note="HF: per layer F.linear(x, W_k, b_k).view(B, Lk, H, D).transpose(1, 2) and the same for V "
                      "(2L GEMMs)"),
        Provider("reference", kv_reference, check=check_oracle_only, mem_estimate=functools.partial(est_kv, 2),
                 note="the float64 oracle of the agreement test (= separate); not timed"),
    )


def kv_case(B: int, Lk: int, C: int, L: int, H: int, D: int, dtype: str, device: str) -> Case:
    return Case(
        family=FAMILY,
        op=OP_KV,
        shape={"B": B, "Lk": Lk, "C": C, "L": L, "H": H, "D": D},
        dtype=dtype,
        device=device,
        make_inputs=make_kv_inputs,
        providers=kv_providers(),
        mode="fwd+bwd",
        flops=3.0 * 2.0 * B * Lk * C * L * 2 * H * D,
        flops_formula="3*2*B*Lk*C*(L*2*H*D)",
        x="B",
        note=f"{L} layers x (W_k, W_v) [{H * D}, {C}] with biases",
    )


# --------------------------------------------------------------------------
# Agreement (every provider against an oracle in float64)
# --------------------------------------------------------------------------

# max |provider - oracle| <= tol * max |oracle|, per tensor
AGREE_TOL = {"float32": 1e-4, "bfloat16": 4e-2, "float16": 5e-3}
QFORMER_ORACLE = "hf_eager"


def oracle_name(case: Case) -> str:
    return QFORMER_ORACLE if case.op == OP_QFORMER else "reference"


def _double(v):
    if isinstance(v, nn.Parameter):
        return nn.Parameter(v.detach().double())
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.detach().double().requires_grad_(v.requires_grad)
    return v


def _run(case: Case, name: str, inputs: dict):
    out = case.provider(name).fn(**inputs)
    out.backward()
    grads = {k: v.grad for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    return out.detach(), grads


def agree(case: Case, provider: str, tol: Optional[float] = None) -> dict:
    """Run ``provider`` on the case's inputs and the family's oracle (``reference``; ``hf_eager`` for
    ``qformer``, in eval mode) on float64 copies; assert the loss and every gradient agree within
    ``tol`` x the oracle's largest magnitude. Returns ``{tensor: relative error}``."""
    tol = AGREE_TOL[case.dtype] if tol is None else tol
    torch.manual_seed(case.seed)
    inputs = case.make_inputs(case)
    ref_inputs = {k: _double(v) for k, v in inputs.items()}
    if case.op == OP_QFORMER:
        inputs["ctx"].training = False
        params = {k[len(PARAM_PREFIX):]: v for k, v in ref_inputs.items() if k.startswith(PARAM_PREFIX)}
        ref_inputs["ctx"] = QFormerContext(inputs["ctx"].cfg, params, inputs["ctx"].query_length, training=False)
    out, grads = _run(case, provider, inputs)
    ref, ref_grads = _run(case, oracle_name(case), ref_inputs)
    errs = {}
    n = max(inputs["dout"].numel(), 1)
    lerr = abs(out.double().item() - ref.item())
    errs["loss"] = lerr / max(abs(ref.item()), n**0.5)
    assert errs["loss"] <= tol, f"loss {out.item():.6g} vs oracle {ref.item():.6g}"
    assert set(grads) == set(ref_grads), (sorted(grads), sorted(ref_grads))
    assert all(g is not None for g in grads.values()), [k for k, g in grads.items() if g is None]
    assert all(g is not None for g in ref_grads.values()), [k for k, g in ref_grads.items() if g is None]
    top = max((g.abs().max().item() for g in ref_grads.values() if g.numel()), default=0.0)
    for name, g in grads.items():
        want = ref_grads[name]
        got = g.double()
        assert torch.isfinite(got).all(), f"grad of {name}: non-finite values"
        err = (got - want).abs().max().item() if got.numel() else 0.0
        scale = want.abs().max().item() if want.numel() else 0.0
        if scale < 1e-6 * top:
            # zero in exact arithmetic (the attention key biases: softmax ignores a per-row shift):
            # rounding noise, measured against the largest gradient of the step
            scale = 1e-2 * top
        errs[name] = err / max(scale, 1e-30)
        assert err <= tol * max(scale, 1e-30), (
            f"grad of {name}: max error {err:.3g} > {tol} x max |oracle| {scale:.3g} (oracle {oracle_name(case)})")
    return errs


# --------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------


def _tables(device: str, profile: str) -> tuple:
    if profile == "pytest":
        return list(PYTEST_XATTN), list(PYTEST_KV), list(PYTEST_QFORMER)
    gpu = device.startswith("cuda")
    out = []
    for table in ((GPU_XATTN, GPU_KV, GPU_QFORMER) if gpu else (CPU_XATTN, CPU_KV, CPU_QFORMER)):
        out.append(list(table.get(profile, table["full"])))
    return tuple(out)


def _override(rows: list, overrides: dict, idx: dict) -> list:
    """Replace the ``B`` / ``Lk`` column (positions in ``idx``) of every row by each override value."""
    for key, pos in idx.items():
        if overrides.get(key):
            rows = [r[:pos] + (int(v),) + tuple(r[pos + 1:]) for r in rows for v in overrides[key]]
    return list(dict.fromkeys(rows))


def cases(device: str, profile: str, overrides: Optional[dict] = None) -> list:
    """``overrides`` ``B`` and ``Lk`` replace the batch and the image-token count of every case."""
    overrides = overrides or {}
    gpu = device.startswith("cuda")
    dtype = "bfloat16" if gpu else "float32"
    xrows, kvrows, qrows = _tables(device, profile)
    out = []
    for row in _override(xrows, overrides, {"B": 1, "Lk": 3}):
        out.append(xattn_case(*row, dtype, device))
    for row in _override(kvrows, overrides, {"B": 0, "Lk": 1}):
        out.append(kv_case(*row, dtype, device))
    for row in _override(qrows, overrides, {"B": 0, "Lk": 3}):
        out.append(qformer_case(*row, dtype, device, compiled=profile == "full" and gpu))
    # the torch.mm peak rate (GPU: 8192^3, for "% mm"); none on CPU
    return mm.probes_for(device, profile, [], dtype) + out


def notes(device: str, profile: str) -> list:
    gpu = device.startswith("cuda")
    lines = [
        "cross_attention: forward + backward; cross_attention op: q [B, H, Lq, D], k/v strided [B, H, Lk, D] views "
        "of one [B, Lk, 2*H*D] projection (gradient to it), loss sum(out * dout); layouts blip2 (Q-Former "
        "cross-attention, 32 queries, 12 x 64, Lk 257 = ViT-g/14 at 224 px, 677 at 364 px) and coca (CoCa "
        "attentional pooler, 256 queries, 8 x 96, Lk 257). SDPA backends are probed once per layout (forward + "
        "backward at B = 2): strided k/v, else contiguous copies (timed), else skipped with SDPA's reason. "
        "FLOPs 2.5 x 4*B*H*Lq*Lk*D.",
        "cross_attention: kv_projection op: the K/V of the six cross-attention layers of a BLIP-2 Q-Former (C = "
        "1408 -> 6 x 2 x 768, with biases) from image_embeds [B, Lk, C]; the backward gets a fixed dout per "
        "output injected by an autograd function (no elementwise loss pass); gradients for image_embeds, every "
        "weight and bias. mmkernels: the weights moved into one storage by share_kv_storage (by its first, "
        "untimed call, as QFormer / patch_blip2 do once); mmkernels_cat: separately allocated weights, "
        "concatenated per call; separate: 12 F.linear as HF. reference = separate in float64, the agreement "
        "oracle, not timed. FLOPs 3 x 2*B*Lk*C*(L*2*H*D).",
        "cross_attention: qformer op: one training step (train mode, dropout 0.1 / 0.1 as HF's config) of a "
        "BLIP-2 Q-Former with text input: Q = 32 queries + T = 32 text tokens (query_length 32; text padded to "
        "lengths in [T/2, T] through attention_mask), 12 layers, hidden 768, 12 heads, FFN 3072, cross-attention "
        "every 2nd layer to Lk = 257 image tokens of width 1408; loss sum(last_hidden_state * dout); gradients "
        "for query_embeds and all parameters, none for the (frozen-ViT) image features. All four providers bind "
        "the same parameter tensors (HF names). mmkernels_patched patches an attn_implementation='sdpa' HF model. "
        "Dropout draws differ between providers by design (agreement is checked in eval mode)."
        + (" pytest profile: a miniature (2 layers, hidden 64, 4 heads, 4 + 4 tokens, Lk 7)." if profile == "pytest"
           else ""),
    ]
    if gpu:
        lines.append("cross_attention: GPU run in bf16; the qformer providers hold bf16 weights (the whole model in "
                     "bfloat16, no autocast; HF's own default keeps the Q-Former in fp32): the same dtype regime "
                     "for every provider.")
    else:
        lines.append("cross_attention: CPU run in fp32 at small batches (cross_attention B = 8 / CoCa B = 2, "
                     "kv_projection B = 2); the qformer case keeps the real widths and depth at B = 4 (--quick: "
                     "B = 2; the CPU target: a Q-Former step no slower than HF's). The GPU sizes are GPU-only. "
                     "On a shared 2-core machine use --threads 1: two spinning OpenMP threads under load give "
                     "large swings.")
    return lines
