"""Experts family: per-modality FFN and linear layers against the ways models write them.

Two ops, both timed forward + backward (mode ``fwd+bwd``) with ``loss = sum(out * dout)`` for a
fixed random ``dout``, gradients for ``x`` and every weight and bias:

* ``modality_ffn``: ``mmkernels.modality_ffn(x, modality_ids, w_in, b_in, w_out, b_out, activation)``,
  shape keys ``layout, E, B, S, H, F, act, bias`` (x ``[B, S, H]``; ``w_in [E, F, H]``, or
  ``[E, 2F, H]`` for ``act = swiglu`` with the gate rows first; ``w_out [E, H, F]``).
* ``modality_linear``: ``mmkernels.modality_linear(x, modality_ids, weight [E, Hout, Hin], bias)``,
  shape keys ``layout, E, B, S, Hin, Hout, bias``.

``layout`` names how the ``S`` tokens of a sample are routed, ``kind:A+B``:

* ``vlmo:T+I``: VLMo multiway block: T text tokens (expert 0, L-FFN) then I image tokens
  (expert 1, V-FFN). One split position (``T``) for the whole batch.
* ``vlmo_vl:T+I``: VLMo's top (VL-FFN) layers, E = 3, ids in blocks of samples: the first
  ``ceil(B/2)`` samples are a dual-encoder pass (text -> 0 L-FFN, image -> 1 V-FFN), the rest a
  fusion pass where all ``T+I`` tokens go to the VL-FFN (expert 2), as VLMo's pre-training packs
  retrieval (ITC) and fusion (ITM/MLM) work of one step.
* ``beit3:I+T``: BEiT-3 multiway: I image tokens (expert 0, vision "A" way) then T text tokens
  (expert 1, language "B" way); split position ``I`` (torchscale ``multiway_split_position``).
* ``cogvlm:I+T``: CogVLM visual expert: per sample ``[BOS] + I image tokens + (T-1) text tokens``
  with the image tokens on expert 1 (vision) and BOS and text on expert 0 (language). CogVLM's
  ``get_expert_mask`` sends the end-of-image token to the language expert, so ``I = 1226`` image
  tokens for a 490 px image (boi + 35*35 patches; eoi counted as text). Not one split position.

Providers:

* ``mmkernels``: the op, called as the model's integration would: with the split position (an
  int) for the two-way contiguous layouts (``vlmo``, ``beit3``), with the ids tensor otherwise.
* ``mmkernels_ids``: the op with the ids tensor on a split layout (skipped elsewhere: it is the
  same call as ``mmkernels`` there), to show the cost of general routing against the split path.
* ``cogvlm``: CogVLM's code: per expert a boolean mask, ``x[mask]`` -> expert MLP / linear ->
  ``out[mask] = ...`` into a ``torch.empty`` output (gather + index_put, host syncs on CUDA).
* ``torchscale``: torchscale ``MultiwayNetwork``: ``torch.split`` at the position along dim 1, one
  expert per part, ``torch.cat``; only on the two-way contiguous layouts.
* ``grouped_mm``: stable argsort by expert, permuted copy, ``torch._grouped_mm`` with int32 end
  offsets (bias gathered per token), unpermute; only where torch has ``_grouped_mm`` and it runs
  on the device and dtype (probed once with a small fwd+bwd).
* ``dense``: the speed of light: one ordinary dense FFN / linear over all tokens with expert 0's
  weights. Not the same function (one expert only); the report's routing-overhead table divides
  every provider's time by it.
* ``reference``: ``mmkernels.experts.reference.modality_ffn_reference`` /
  ``modality_linear_reference`` (eager, boolean masks), with the ids tensor.

The peers take each expert's weights as views of the stacked ``[E, ...]`` parameters
(``unbind(0)``); autograd then stacks the per-expert weight gradients into the ``[E, ...]``
gradient, one copy of the weight gradients that separate ``nn.Linear`` modules would not make.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from bench.cases import mm
from bench.cases.common import elem_size, first_line, missing, randn, trainable
from mmkernels.experts import activations  # plain torch.nn.functional activations
from bench.harness import Case, Provider

FAMILY = "experts"
OP_FFN, OP_LINEAR = "modality_ffn", "modality_linear"
SPLIT_KINDS = ("vlmo", "beit3")  # two experts, contiguous, one split position for the batch
KINDS = ("vlmo", "vlmo_vl", "beit3", "cogvlm")
SPEED_OF_LIGHT = "dense"

# ("ffn", layout, B, H, F, act, bias) / ("linear", layout, B, Hin, Hout, bias); "ffn_frozen": the
# FFN trained with expert 0 frozen (bench/cases/experts_frozen.py; CogVLM's language expert);
# ("layer_norm", layout, B, H, bias): the per-modality LayerNorm (bench/cases/experts_norm.py);
# ("ffn_subln", layout, B, H, F, bias): the gelu FFN with a LayerNorm between its layers, BEiT-3's
# torchscale default (bench/cases/experts_subln.py)
GPU_CASES = {
    "full": [
        ("ffn", "vlmo:40+197", 64, 768, 3072, "gelu", True),
        ("ffn", "vlmo_vl:40+197", 64, 768, 3072, "gelu", True),
        ("ffn", "beit3:197+64", 32, 1024, 4096, "gelu", True),
        ("ffn", "cogvlm:1226+300", 4, 4096, 11008, "swiglu", False),
        ("ffn_frozen", "cogvlm:1226+300", 4, 4096, 11008, "swiglu", False),  # pretraining
        ("linear", "cogvlm:1226+300", 4, 4096, 3 * 4096, True),  # QKV
        ("linear", "cogvlm:1226+300", 4, 4096, 4096, False),  # dense (attention output)
        ("layer_norm", "vlmo:40+197", 64, 768, True),  # VLMo norm2_text / norm2_imag
        ("layer_norm", "vlmo_vl:40+197", 64, 768, True),  # with norm2_vl
        ("layer_norm", "beit3:197+64", 32, 1024, True),  # BEiT-3 large multiway LayerNorm
        ("ffn_subln", "beit3:197+64", 32, 1024, 4096, True),  # BEiT-3 large FFN as configured (subln)
    ],
    "quick": [
        ("ffn", "vlmo:40+197", 64, 768, 3072, "gelu", True),
        ("ffn", "cogvlm:1226+300", 4, 4096, 11008, "swiglu", False),
        ("layer_norm", "vlmo:40+197", 64, 768, True),  # last: a few seconds; results are saved per row
    ],
}
# CPU (fp32, 2 cores): the models' token layouts at a smaller batch; CogVLM at 1/8 of its width
CPU_CASES = {
    "full": [
        ("ffn", "vlmo:40+197", 2, 768, 3072, "gelu", True),
        ("ffn", "vlmo_vl:40+197", 2, 768, 3072, "gelu", True),
        ("ffn", "beit3:197+64", 1, 1024, 4096, "gelu", True),
        ("ffn", "cogvlm:1226+300", 1, 512, 1376, "swiglu", False),
        ("ffn_frozen", "cogvlm:1226+300", 1, 512, 1376, "swiglu", False),
        ("linear", "cogvlm:1226+300", 1, 512, 3 * 512, True),
        ("linear", "cogvlm:1226+300", 1, 512, 512, False),
        ("layer_norm", "vlmo:40+197", 16, 768, True),
        ("layer_norm", "vlmo_vl:40+197", 16, 768, True),
        ("layer_norm", "beit3:197+64", 8, 1024, True),
        ("ffn_subln", "beit3:197+64", 1, 1024, 4096, True),
    ],
    "quick": [
        ("ffn", "vlmo:40+197", 2, 768, 3072, "gelu", True),
        ("ffn", "cogvlm:1226+300", 1, 512, 1376, "swiglu", False),
        ("layer_norm", "vlmo:40+197", 16, 768, True),
    ],
}
# pytest bench/ (and gpu_check's agreement step on the GPU): every layout and both ops, tiny.
# Widths are multiples of 8 (torch._grouped_mm wants 16-byte strides in bf16); odd token counts.
PYTEST_CASES = [
    ("ffn", "vlmo:5+11", 2, 64, 128, "gelu", True),
    ("ffn", "vlmo_vl:5+11", 3, 64, 128, "gelu", True),
    ("ffn", "beit3:11+6", 2, 64, 96, "gelu", True),
    ("ffn", "cogvlm:9+7", 2, 64, 96, "swiglu", False),
    ("ffn_frozen", "cogvlm:9+7", 2, 64, 96, "swiglu", False),
    ("linear", "cogvlm:9+7", 2, 64, 192, True),
    ("linear", "cogvlm:9+7", 2, 64, 64, False),
    ("linear", "beit3:11+6", 2, 64, 64, True),  # the split path and torchscale for linear
    ("layer_norm", "beit3:11+6", 2, 64, True),
    ("layer_norm", "vlmo_vl:5+11", 3, 40, False),
    ("ffn_subln", "beit3:11+6", 2, 64, 96, True),
]


# --------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------


def parse_layout(layout: str) -> tuple:
    """``(kind, a, b)`` of ``kind:a+b``."""
    kind, _, params = layout.partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown experts layout {layout!r}; known kinds: {', '.join(KINDS)}")
    a, b = params.split("+")
    return kind, int(a), int(b)


def num_experts(layout: str) -> int:
    return 3 if parse_layout(layout)[0] == "vlmo_vl" else 2


def seq_len(layout: str) -> int:
    _kind, a, b = parse_layout(layout)
    return a + b


def split_position(layout: str) -> Optional[int]:
    """The position p (tokens < p on expert 0, the rest on expert 1) of a split layout, else None."""
    kind, a, _b = parse_layout(layout)
    return a if kind in SPLIT_KINDS else None


def layout_ids(layout: str, B: int, device: str = "cpu") -> torch.Tensor:
    """int64 ``[B, S]`` expert id of every token of the layout."""
    kind, a, b = parse_layout(layout)
    S = a + b
    ids = torch.zeros(B, S, dtype=torch.int64)
    if kind in SPLIT_KINDS:
        ids[:, a:] = 1
    elif kind == "vlmo_vl":
        n_sep = (B + 1) // 2
        ids[:n_sep, a:] = 1
        ids[n_sep:] = 2
    elif kind == "cogvlm":
        ids[:, 1 : 1 + a] = 1
    return ids.to(device)


def expert_tokens(layout: str, B: int) -> list:
    """Tokens per expert over the batch."""
    ids = layout_ids(layout, B)
    return [int((ids == e).sum()) for e in range(num_experts(layout))]


class ExpertsContext:
    """The non-tensor input of a case: the routing (ids tensor, split position) and the activation."""

    def __init__(self, layout: str, ids: torch.Tensor, activation: Optional[str] = None):
        self.layout = layout
        self.ids = ids
        self.E = num_experts(layout)
        self.split = split_position(layout)
        self.activation = activation
        self.frozen = frozenset()  # experts whose weights get no gradient (bench/cases/experts_frozen.py)

    def all_on_expert0(self) -> "ExpertsContext":
        """The same context with every token on expert 0 (what ``dense`` computes)."""
        ctx = ExpertsContext(self.layout, torch.zeros_like(self.ids), self.activation)
        ctx.split = ctx.ids.shape[1] if self.split is not None else None
        return ctx


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def make_ffn_inputs(case: Case) -> dict:
    s = case.shape
    B, H, Fd, act, E = s["B"], s["H"], s["F"], s["act"], s["E"]
    S = seq_len(s["layout"])
    Fi = 2 * Fd if act == "swiglu" else Fd
    dev, dt = case.device, case.torch_dtype
    g = torch.Generator(device=dev).manual_seed(case.seed)
    # x like a LayerNorm output; weights scaled so that every activation is O(1); biases never zero
    t = {
        "x": randn((B, S, H), g, dev),
        "w_in": randn((E, Fi, H), g, dev, H**-0.5),
        "b_in": randn((E, Fi), g, dev, 0.1) if s["bias"] else None,
        "w_out": randn((E, H, Fd), g, dev, Fd**-0.5),
        "b_out": randn((E, H), g, dev, 0.1) if s["bias"] else None,
    }
    inputs = trainable(t, dt)
    inputs["dout"] = randn((B, S, H), g, dev).to(dt)
    inputs["ctx"] = ExpertsContext(s["layout"], layout_ids(s["layout"], B, dev), act)
    return inputs


def make_linear_inputs(case: Case) -> dict:
    s = case.shape
    B, Hin, Hout, E = s["B"], s["Hin"], s["Hout"], s["E"]
    S = seq_len(s["layout"])
    dev, dt = case.device, case.torch_dtype
    g = torch.Generator(device=dev).manual_seed(case.seed)
    t = {
        "x": randn((B, S, Hin), g, dev),
        "weight": randn((E, Hout, Hin), g, dev, Hin**-0.5),
        "bias": randn((E, Hout), g, dev, 0.1) if s["bias"] else None,
    }
    inputs = trainable(t, dt)
    inputs["dout"] = randn((B, S, Hout), g, dev).to(dt)
    inputs["ctx"] = ExpertsContext(s["layout"], layout_ids(s["layout"], B, dev))
    return inputs


def _loss(out: torch.Tensor, dout: Optional[torch.Tensor]):
    if dout is None:
        return out
    return (out * dout).sum(dtype=torch.promote_types(out.dtype, torch.float32))


# --------------------------------------------------------------------------
# One expert, eager (what every peer runs per expert)
# --------------------------------------------------------------------------


def expert_ffn(x, w_in, b_in, w_out, b_out, activation: str):
    """One expert's FFN as the models write it (``fc1 -> act -> fc2``; swiglu as LLaMA's MLP:
    ``down(silu(gate(x)) * up(x))`` with gate and up as two linears)."""
    if activation == "swiglu":
        f = w_in.shape[0] // 2
        bg, bu = (b_in[:f], b_in[f:]) if b_in is not None else (None, None)
        a = F.silu(F.linear(x, w_in[:f], bg)) * F.linear(x, w_in[f:], bu)
    else:
        a = activations.apply(activation, F.linear(x, w_in, b_in))
    return F.linear(a, w_out, b_out)


def _experts(t: Optional[torch.Tensor], E: int) -> list:
    return list(t.unbind(0)) if t is not None else [None] * E


# --------------------------------------------------------------------------
# Providers: modality_ffn
# --------------------------------------------------------------------------


def ffn_mmkernels(x, w_in, b_in, w_out, b_out, ctx, dout=None, *, use_split=True):
    import mmkernels

    route = ctx.split if (use_split and ctx.split is not None) else ctx.ids
    return _loss(mmkernels.modality_ffn(x, route, w_in, b_in, w_out, b_out, activation=ctx.activation), dout)


def ffn_reference(x, w_in, b_in, w_out, b_out, ctx, dout=None):
    from mmkernels.experts.reference import modality_ffn_reference

    return _loss(modality_ffn_reference(x, ctx.ids, w_in, b_in, w_out, b_out, activation=ctx.activation), dout)


def ffn_cogvlm(x, w_in, b_in, w_out, b_out, ctx, dout=None):
    """CogVLM ``VisionExpertMLP.forward``: output = torch.empty; per expert output[mask] = mlp(x[mask])."""
    E = ctx.E
    return _loss(cogvlm_mlp(x, _experts(w_in, E), _experts(b_in, E), _experts(w_out, E), _experts(b_out, E), ctx),
                 dout)


def cogvlm_mlp(x, wi: list, bi: list, wo: list, bo: list, ctx):
    """The body of ``VisionExpertMLP.forward`` on per-expert weight lists."""
    out = torch.empty(x.shape[:-1] + (wo[0].shape[0],), dtype=x.dtype, device=x.device)
    for e in range(ctx.E):
        mask = ctx.ids == e
        out[mask] = expert_ffn(x[mask], wi[e], bi[e], wo[e], bo[e], ctx.activation)
    return out


def ffn_torchscale(x, w_in, b_in, w_out, b_out, ctx, dout=None):
    """torchscale ``MultiwayNetwork.forward`` (dim=1) around two FFNs."""
    p, S = ctx.split, x.shape[1]
    wi, bi, wo, bo = _experts(w_in, 2), _experts(b_in, 2), _experts(w_out, 2), _experts(b_out, 2)
    if p == 0:
        out = expert_ffn(x, wi[1], bi[1], wo[1], bo[1], ctx.activation)
    elif p == S:
        out = expert_ffn(x, wi[0], bi[0], wo[0], bo[0], ctx.activation)
    else:
        x1, x2 = torch.split(x, [p, S - p], dim=1)
        y1 = expert_ffn(x1, wi[0], bi[0], wo[0], bo[0], ctx.activation)
        y2 = expert_ffn(x2, wi[1], bi[1], wo[1], bo[1], ctx.activation)
        out = torch.cat([y1, y2], dim=1)
    return _loss(out, dout)


def _sort_by_expert(ids: torch.Tensor, E: int) -> tuple:
    """(perm, inverse perm, sorted ids, int32 end offsets), on the device, no host sync."""
    ids = ids.reshape(-1)
    perm = torch.argsort(ids, stable=True)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=ids.device)
    counts = (ids[:, None] == torch.arange(E, device=ids.device)[None, :]).sum(0)
    offs = counts.cumsum(0).to(torch.int32)
    return perm, inv, ids[perm], offs


def ffn_grouped_mm(x, w_in, b_in, w_out, b_out, ctx, dout=None):
    H = x.shape[-1]
    perm, inv, sid, offs = _sort_by_expert(ctx.ids, ctx.E)
    xs = x.reshape(-1, H)[perm]
    h = torch._grouped_mm(xs, w_in.transpose(-2, -1), offs=offs)
    if b_in is not None:
        h = h + b_in[sid]
    if ctx.activation == "swiglu":
        f = h.shape[-1] // 2
        a = F.silu(h[:, :f]) * h[:, f:]
    else:
        a = activations.apply(ctx.activation, h)
    y = torch._grouped_mm(a, w_out.transpose(-2, -1), offs=offs)
    if b_out is not None:
        y = y + b_out[sid]
    return _loss(y[inv].view(x.shape[:-1] + (y.shape[-1],)), dout)


def ffn_dense(x, w_in, b_in, w_out, b_out, ctx, dout=None):
    """One dense FFN over every token with expert 0's weights (swiglu: one [2F, H] GEMM, then split)."""
    wi, bi, wo, bo = w_in.unbind(0)[0], _experts(b_in, 1)[0], w_out.unbind(0)[0], _experts(b_out, 1)[0]
    h = F.linear(x, wi, bi)
    if ctx.activation == "swiglu":
        f = h.shape[-1] // 2
        a = F.silu(h[..., :f]) * h[..., f:]
    else:
        a = activations.apply(ctx.activation, h)
    return _loss(F.linear(a, wo, bo), dout)


# --------------------------------------------------------------------------
# Providers: modality_linear
# --------------------------------------------------------------------------


def linear_mmkernels(x, weight, bias, ctx, dout=None, *, use_split=True):
    import mmkernels

    route = ctx.split if (use_split and ctx.split is not None) else ctx.ids
    return _loss(mmkernels.modality_linear(x, route, weight, bias), dout)


def linear_reference(x, weight, bias, ctx, dout=None):
    from mmkernels.experts.reference import modality_linear_reference

    return _loss(modality_linear_reference(x, ctx.ids, weight, bias), dout)


def linear_cogvlm(x, weight, bias, ctx, dout=None):
    """CogVLM ``VisionExpertAttention``: mixed = torch.empty; per expert mixed[mask] = linear(x[mask])."""
    ws, bs = _experts(weight, ctx.E), _experts(bias, ctx.E)
    out = torch.empty(x.shape[:-1] + (weight.shape[1],), dtype=x.dtype, device=x.device)
    for e in range(ctx.E):
        mask = ctx.ids == e
        out[mask] = F.linear(x[mask], ws[e], bs[e])
    return _loss(out, dout)


def linear_torchscale(x, weight, bias, ctx, dout=None):
    p, S = ctx.split, x.shape[1]
    ws, bs = _experts(weight, 2), _experts(bias, 2)
    if p in (0, S):
        e = 1 if p == 0 else 0
        return _loss(F.linear(x, ws[e], bs[e]), dout)
    x1, x2 = torch.split(x, [p, S - p], dim=1)
    return _loss(torch.cat([F.linear(x1, ws[0], bs[0]), F.linear(x2, ws[1], bs[1])], dim=1), dout)


def linear_grouped_mm(x, weight, bias, ctx, dout=None):
    perm, inv, sid, offs = _sort_by_expert(ctx.ids, ctx.E)
    y = torch._grouped_mm(x.reshape(-1, x.shape[-1])[perm], weight.transpose(-2, -1), offs=offs)
    if bias is not None:
        y = y + bias[sid]
    return _loss(y[inv].view(x.shape[:-1] + (y.shape[-1],)), dout)


def linear_dense(x, weight, bias, ctx, dout=None):
    return _loss(F.linear(x, weight.unbind(0)[0], _experts(bias, 1)[0]), dout)


# --------------------------------------------------------------------------
# Availability checks and memory estimates
# --------------------------------------------------------------------------


def check_mmkernels(attr: str, case: Case) -> Optional[str]:
    return missing("mmkernels", attr)


def check_mmkernels_ids(attr: str, case: Case) -> Optional[str]:
    if split_position(case.shape["layout"]) is None:
        return "layout has no split position: mmkernels already routes by the ids tensor there"
    return check_mmkernels(attr, case)


def check_reference(attr: str, case: Case) -> Optional[str]:
    return missing("mmkernels.experts.reference", attr)


def check_torchscale(case: Case) -> Optional[str]:
    if split_position(case.shape["layout"]) is None:
        return "torchscale's MultiwayNetwork splits at one position: two contiguous modalities only"
    return None


def _probe_grouped_mm_fn(x, w):
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=torch.tensor([5, 5, 13], dtype=torch.int32, device=x.device))


@functools.lru_cache(maxsize=None)
def grouped_mm_support(device: str, dtype: str) -> Optional[str]:
    """None when ``torch._grouped_mm`` runs forward and backward on ``device`` in ``dtype``, else why not."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    from bench.harness import DTYPES

    try:
        x = torch.randn(13, 16, device=device).to(DTYPES[dtype]).requires_grad_()
        w = torch.randn(3, 32, 16, device=device).to(DTYPES[dtype]).requires_grad_()
        y = _probe_grouped_mm_fn(x, w)
        (y.float() * torch.randn(y.shape, device=device)).sum().backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    except Exception as exc:
        return f"torch._grouped_mm does not run on {device} in {dtype} ({first_line(exc)[:160]})"
    return None


def check_grouped_mm(case: Case) -> Optional[str]:
    reason = grouped_mm_support(case.device, case.dtype)
    if reason:
        return reason
    elem = torch.empty((), dtype=case.torch_dtype).element_size()
    dims = [case.shape[k] for k in ("H", "F", "Hin", "Hout") if k in case.shape]
    if any(d * elem % 16 for d in dims):
        return f"torch._grouped_mm needs 16-byte aligned rows: widths {dims} in {case.dtype}"
    return None


def _tokens(case: Case) -> int:
    return case.shape["B"] * seq_len(case.shape["layout"])


def est_ffn(factor: float, case: Case) -> int:
    """Activations kept for backward and their gradients ([T, Fi] each: pre-activation,
    activation, swiglu parts), token-sized copies (gathers, scatters, permutations) and the
    per-expert weight gradients before they are stacked; ``factor`` scales the [T, Fi] count."""
    s = case.shape
    T, H, Fd = _tokens(case), s["H"], s["F"]
    Fi = 2 * Fd if s["act"] == "swiglu" else Fd
    e = elem_size(case)
    weights = s["E"] * (Fi * H + H * Fd) * e
    return int(factor * T * Fi * e + 6 * T * H * e + weights)


def est_linear(case: Case) -> int:
    s = case.shape
    T = _tokens(case)
    e = elem_size(case)
    return int(4 * T * (s["Hin"] + s["Hout"]) * e + s["E"] * s["Hin"] * s["Hout"] * e)


# --------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------

_ROUTE_NOTE = ("called with the split position (int) on vlmo/beit3 layouts, with the ids tensor [B, S] "
               "otherwise")


def ffn_providers() -> tuple:
    attr = "modality_ffn"
    return (
        Provider("mmkernels", ffn_mmkernels, check=functools.partial(check_mmkernels, attr),
                 mem_estimate=functools.partial(est_ffn, 3),
                 note=f"mmkernels.modality_ffn(x, route, w_in, b_in, w_out, b_out, activation), {_ROUTE_NOTE}"),
        Provider("mmkernels_ids", functools.partial(ffn_mmkernels, use_split=False),
                 check=functools.partial(check_mmkernels_ids, attr), mem_estimate=functools.partial(est_ffn, 3),
                 note="mmkernels.modality_ffn with the ids tensor on a split layout (general routing)"),
        Provider("cogvlm", ffn_cogvlm, mem_estimate=functools.partial(est_ffn, 6),
                 note="CogVLM VisionExpertMLP: per expert mask = ids == e; out[mask] = mlp_e(x[mask]) into "
                      "torch.empty (boolean gather + index_put; swiglu as two linears, LLaMA MLP)"),
        Provider("torchscale", ffn_torchscale, check=check_torchscale, mem_estimate=functools.partial(est_ffn, 5),
                 note="torchscale MultiwayNetwork: torch.split at the position (dim 1), one FFN per part, torch.cat"),
        Provider("grouped_mm", ffn_grouped_mm, check=check_grouped_mm, mem_estimate=functools.partial(est_ffn, 7),
                 note="argsort(ids, stable) + permuted copy + torch._grouped_mm(offs=int32 ends) x2 (bias gathered "
                      "per token) + unpermute"),
        Provider("dense", ffn_dense, mem_estimate=functools.partial(est_ffn, 4),
                 note="speed of light: one dense FFN over all tokens with expert 0's weights (not the same "
                      "function; swiglu as one [2F, H] GEMM)"),
        Provider("reference", ffn_reference, check=functools.partial(check_reference, "modality_ffn_reference"),
                 mem_estimate=functools.partial(est_ffn, 6),
                 note="mmkernels.experts.reference.modality_ffn_reference(x, ids, ...) (eager, boolean masks)"),
    )


def linear_providers() -> tuple:
    attr = "modality_linear"
    return (
        Provider("mmkernels", linear_mmkernels, check=functools.partial(check_mmkernels, attr), mem_estimate=est_linear,
                 note=f"mmkernels.modality_linear(x, route, weight, bias), {_ROUTE_NOTE}"),
        Provider("mmkernels_ids", functools.partial(linear_mmkernels, use_split=False),
                 check=functools.partial(check_mmkernels_ids, attr), mem_estimate=est_linear,
                 note="mmkernels.modality_linear with the ids tensor on a split layout (general routing)"),
        Provider("cogvlm", linear_cogvlm, mem_estimate=est_linear,
                 note="CogVLM VisionExpertAttention: per expert out[mask] = linear_e(x[mask]) into torch.empty"),
        Provider("torchscale", linear_torchscale, check=check_torchscale, mem_estimate=est_linear,
                 note="torchscale MultiwayNetwork around two nn.Linear: split, linear per part, cat"),
        Provider("grouped_mm", linear_grouped_mm, check=check_grouped_mm, mem_estimate=est_linear,
                 note="argsort(ids, stable) + permuted copy + torch._grouped_mm + per-token bias + unpermute"),
        Provider("dense", linear_dense, mem_estimate=est_linear,
                 note="speed of light: one F.linear over all tokens with expert 0's weight"),
        Provider("reference", linear_reference,
                 check=functools.partial(check_reference, "modality_linear_reference"), mem_estimate=est_linear,
                 note="mmkernels.experts.reference.modality_linear_reference(x, ids, weight, bias)"),
    )


def ffn_flops(T: int, H: int, Fd: int, act: str) -> float:
    """Forward + backward: 3 x the forward's 2*T*H*Fi + 2*T*F*H (Fi = 2F for swiglu: 3 GEMMs)."""
    Fi = 2 * Fd if act == "swiglu" else Fd
    return 3.0 * (2.0 * T * H * Fi + 2.0 * T * Fd * H)


def ffn_case(layout: str, B: int, H: int, Fd: int, act: str, bias: bool, dtype: str, device: str) -> Case:
    S, E = seq_len(layout), num_experts(layout)
    per = expert_tokens(layout, B)
    return Case(
        family=FAMILY,
        op=OP_FFN,
        shape={"layout": layout, "E": E, "B": B, "S": S, "H": H, "F": Fd, "act": act, "bias": bool(bias)},
        dtype=dtype,
        device=device,
        make_inputs=make_ffn_inputs,
        providers=ffn_providers(),
        mode="fwd+bwd",
        flops=ffn_flops(B * S, H, Fd, act),
        flops_formula="3*2*T*H*(Fi+F), T=B*S, Fi=2F for swiglu",
        x="B",
        note=f"tokens per expert {per}",
    )


def linear_case(layout: str, B: int, Hin: int, Hout: int, bias: bool, dtype: str, device: str) -> Case:
    S, E = seq_len(layout), num_experts(layout)
    return Case(
        family=FAMILY,
        op=OP_LINEAR,
        shape={"layout": layout, "E": E, "B": B, "S": S, "Hin": Hin, "Hout": Hout, "bias": bool(bias)},
        dtype=dtype,
        device=device,
        make_inputs=make_linear_inputs,
        providers=linear_providers(),
        mode="fwd+bwd",
        flops=3.0 * 2.0 * B * S * Hin * Hout,
        flops_formula="3*2*T*Hin*Hout, T=B*S",
        x="B",
        note=f"tokens per expert {expert_tokens(layout, B)}",
    )


def _table(device: str, profile: str) -> list:
    if profile == "pytest":
        return list(PYTEST_CASES)
    table = GPU_CASES if device.startswith("cuda") else CPU_CASES
    return list(table.get(profile, table["full"]))


def _apply_overrides(rows: list, overrides: dict) -> list:
    """``B`` replaces every row's batch; ``H`` and ``F`` replace the FFN rows' widths (``H`` the
    LayerNorm rows' too)."""
    out = []
    for row in rows:
        variants = [row]
        if overrides.get("B"):
            variants = [(r[0], r[1], b) + tuple(r[3:]) for r in variants for b in overrides["B"]]
        if row[0] in ("ffn", "ffn_frozen", "ffn_subln"):
            if overrides.get("H"):
                variants = [r[:3] + (h,) + tuple(r[4:]) for r in variants for h in overrides["H"]]
            if overrides.get("F"):
                variants = [r[:4] + (f,) + tuple(r[5:]) for r in variants for f in overrides["F"]]
        if row[0] == "layer_norm" and overrides.get("H"):
            variants = [r[:3] + (h,) + tuple(r[4:]) for r in variants for h in overrides["H"]]
        out.extend(variants)
    return out


def cases(device: str, profile: str, overrides: Optional[dict] = None) -> list:
    overrides = overrides or {}
    gpu = device.startswith("cuda")
    dtype = "bfloat16" if gpu else "float32"
    out = []
    for row in _apply_overrides(_table(device, profile), overrides):
        if row[0] == "ffn":
            _op, layout, B, H, Fd, act, bias = row
            out.append(ffn_case(layout, B, H, Fd, act, bias, dtype, device))
        elif row[0] == "ffn_frozen":
            from bench.cases import experts_frozen

            _op, layout, B, H, Fd, act, bias = row
            out.append(experts_frozen.case(layout, B, H, Fd, act, bias, dtype, device))
        elif row[0] == "ffn_subln":
            from bench.cases import experts_subln

            _op, layout, B, H, Fd, bias = row
            out.append(experts_subln.case(layout, B, H, Fd, bias, dtype, device))
        elif row[0] == "layer_norm":
            from bench.cases import experts_norm

            _op, layout, B, H, bias = row
            out.append(experts_norm.case(layout, B, H, bias, dtype, device))
        else:
            _op, layout, B, Hin, Hout, bias = row
            out.append(linear_case(layout, B, Hin, Hout, bias, dtype, device))
    # the torch.mm peak rate (GPU: 8192^3, for "% mm"); none on CPU
    return mm.probes_for(device, profile, [], dtype) + out


def notes(device: str, profile: str) -> list:
    gpu = device.startswith("cuda")
    rows = _table(device, profile)
    per = []
    for row in rows:
        layout, B = row[1], row[2]
        item = f"{layout} B={B}: {expert_tokens(layout, B)}"
        if item not in per:
            per.append(item)
    lines = [
        "experts: modality_ffn / modality_linear, forward + backward of sum(out * dout) with gradients for x and "
        "every weight and bias; x, dout random normal, weights scaled by 1/sqrt(fan-in), biases 0.1 * normal. "
        "FLOPs: 3 x forward; forward 2*T*H*F per GEMM (FFN: two GEMMs, swiglu three), 2*T*Hin*Hout for a linear.",
        "experts: layouts (tokens per expert over the batch: " + "; ".join(per) + "): vlmo:T+I text then image "
        "(L-FFN 0, V-FFN 1, split at T); vlmo_vl:T+I VLMo's top VL-FFN layers, E = 3, ids in blocks of samples "
        "(first half of the batch a dual-encoder pass: text 0, image 1; second half a fusion pass: every token on "
        "the VL-FFN 2); beit3:I+T image then text (split at I); cogvlm:I+T [BOS] + I image tokens (expert 1) + "
        "T-1 text tokens (expert 0; the eoi token counts as text, as CogVLM's get_expert_mask does).",
        "experts: the routing-overhead table divides each provider's time by dense's (one dense FFN / linear "
        "over all tokens with one expert's weights: the speed of light for routed experts); peers take per-expert "
        "weights as unbind(0) views of the stacked [E, ...] parameters.",
        "experts: modality_ffn_frozen is the CogVLM MLP trained with expert 0 (language) frozen, as CogVLM's "
        "pretraining does: no gradient for its weights; mmkernels gets per-expert weight lists "
        "(per_expert_parameters) and skips the frozen expert's weight-gradient GEMMs. FLOPs count the trained "
        "experts' weight gradients only.",
        "experts: modality_layer_norm is the per-modality LayerNorm (VLMo norm2_text/norm2_imag/norm2_vl, BEiT-3 "
        "multiway LayerNorm, eps 1e-6), memory-bound: no FLOPs; its routing-overhead row divides by one "
        "F.layer_norm over all tokens (dense). Peers: torchscale (split, LayerNorm per part, cat) on the split "
        "layouts, masked (boolean gather + index_put per expert) everywhere.",
        "experts: modality_ffn_subln is BEiT-3's multiway FFN as torchscale builds it (subln=True: a LayerNorm "
        "over the F activations before fc2, per expert); mmkernels runs it as three routed ops, torchscale "
        "splits, runs both experts' FFNs and concatenates.",
    ]
    if gpu:
        lines.append("experts: GPU run in bf16 (VLMo-base FFN B=64, BEiT-3 large B=32, CogVLM B=4 at H=4096, "
                     "F=11008); grouped_mm needs torch._grouped_mm on the device (sm90+ in bf16).")
    else:
        lines.append("experts: CPU run in fp32 with the models' token layouts at small batches and CogVLM at 1/8 "
                     "of its width (H=512, F=1376); the GPU sizes are GPU-only.")
    return lines
