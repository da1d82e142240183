"""The PyTorch-op paths of ``modality_linear`` and ``modality_ffn`` under backend ``auto``.

Besides the family's kernels (``"kernel"``) and the reference, two paths built from PyTorch's own
GEMMs can run a call (``mmkernels/_dispatch.py`` picks one per case from the family's table):

* ``"grouped_mm"``: gather the tokens into expert order (the on-device counting sort's ``perm``),
  ``torch.nn.functional.grouped_mm`` with the int32 end offsets of each expert, the activation
  between the two GEMMs, scatter back to token order. On CUDA bfloat16 with compute capability
  9.x or 10.x (elsewhere PyTorch's grouped GEMM reads the offsets on the host); on CPU bfloat16,
  and float32/float16 where this torch takes them; every GEMM width a multiple of 16 bytes (its
  operands' rows must be 16-byte aligned).
* ``"batched"``: the position split only (``modality_ids`` an int ``p``, ``x [B, S, H]``). Each
  expert's GEMM reads its strided view ``x[:, :p]`` / ``x[:, p:]`` directly (a strided batched
  GEMM) and writes into the matching view of one preallocated output: no split, gather or
  concatenation of ``x``. The FFN keeps its pre-activation in expert order, so the second GEMM
  and the backward read it as one matrix per expert.

Both are registered ops (``mmkernels::modality_{linear,ffn}_{grouped_mm,batched}`` and their
``_bwd``), opaque to ``torch.compile``, with the kernels' gradient semantics: per-expert
weight-gradient flags (a frozen expert's slice is zero and costs no GEMM where the path can skip
it), an expert without tokens gets zero weight and bias gradients.

:func:`shape_class` names the case for the table; :func:`eligibility` says, per path, ``None``
(it can run this call) or why not.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import activations
from ..routing import wanted_experts

GROUPED_MM = "grouped_mm"
BATCHED = "batched"
PATHS = (GROUPED_MM, BATCHED)

#: ``tokens * h_in * f`` below which one call's GEMMs are too small to fill a GPU: launches and
#: routing dominate ("small"); at and above it the GEMMs dominate ("large")
LAUNCH_BOUND_WORK = 1 << 28

_GMM_ALIGN_BYTES = 16


def shape_class(layout: str, tokens: int, h_in: int, f: int) -> str:
    """``"<layout>-small"`` or ``"<layout>-large"``: ``layout`` is ``"split"`` (an int split
    position) or ``"ids"`` (an ids tensor); the size splits launch-bound calls from GEMM-bound
    ones by ``tokens * h_in * f`` (``f`` the first layer's output width: ``H_out`` for a linear,
    ``Fi`` for an FFN)."""
    if layout not in ("split", "ids"):
        raise ValueError(f"layout must be 'split' or 'ids', got {layout!r}")
    return f"{layout}-{'large' if tokens * h_in * f >= LAUNCH_BOUND_WORK else 'small'}"


def _grouped_mm_fn():
    fn = getattr(F, "grouped_mm", None)
    return fn if fn is not None else getattr(torch, "_grouped_mm", None)


_CPU_PROBED: dict[torch.dtype, bool] = {}


def _runs_on_cpu(dtype: torch.dtype) -> bool:
    """Whether this torch's grouped_mm takes ``dtype`` on CPU (float32 and float16 only in newer
    releases): one tiny call, once per dtype, outside ``torch.compile`` (which reads the answer)."""
    if dtype not in (torch.float32, torch.float16):
        return False
    if dtype not in _CPU_PROBED and not torch.compiler.is_compiling():
        try:
            a = torch.ones(4, 8, dtype=dtype)
            b = torch.ones(2, 8, 8, dtype=dtype).transpose(-2, -1)
            _grouped_mm_fn()(a, b, offs=torch.tensor([1, 4], dtype=torch.int32))
            _CPU_PROBED[dtype] = True
        except (RuntimeError, TypeError, NotImplementedError):
            _CPU_PROBED[dtype] = False
    return _CPU_PROBED.get(dtype, False)


def _cpu_dtypes() -> list[str]:
    return [str(d).replace("torch.", "") for d, ok in _CPU_PROBED.items() if ok]


def grouped_mm_reason(x: torch.Tensor, widths: dict[str, int], tokens: int) -> Optional[str]:
    """Why ``grouped_mm`` cannot run a call with main input ``x`` and GEMM ``widths`` (name ->
    size of every operand's inner dimension), or ``None``."""
    if _grouped_mm_fn() is None:
        return "this torch has no grouped_mm (torch.nn.functional.grouped_mm / torch._grouped_mm)"
    name = str(x.dtype).replace("torch.", "")
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16:
            return f"grouped_mm on CUDA runs bfloat16 only, got {name}"
        major, minor = torch.cuda.get_device_capability(x.device)
        if major not in (9, 10):
            return (f"grouped_mm on CUDA needs compute capability 9.x or 10.x, this device is {major}.{minor} "
                    "(PyTorch's fallback there reads the offsets on the host)")
    elif x.device.type == "cpu":
        if x.dtype != torch.bfloat16 and not _runs_on_cpu(x.dtype):
            return f"grouped_mm on CPU runs bfloat16 (this torch's also {', '.join(_cpu_dtypes()) or 'nothing else'}), got {name}"
    else:
        return f"grouped_mm runs CPU and CUDA tensors, got {x.device.type}"
    align = _GMM_ALIGN_BYTES // x.element_size()
    bad = [f"{name} = {n}" for name, n in widths.items() if n % align]
    if bad:
        return (f"grouped_mm needs every GEMM width a multiple of {align} (16-byte rows in "
                f"{name}), got {', '.join(bad)}")
    if tokens == 0:
        return "no tokens"
    return None


def batched_reason(kind: str) -> Optional[str]:
    """Why ``batched`` cannot run a call whose ``modality_ids`` checked as ``kind``, or ``None``."""
    if kind != "split":
        return "batched needs a split position (an int modality_ids), not an ids tensor"
    return None


def eligibility(kind: str, x: torch.Tensor, widths: dict[str, int]) -> dict[str, Optional[str]]:
    """``{path: None or the reason it cannot run}`` for a call (``kind``: ``"split"`` or
    ``"ids"`` as ``routing.check_ids`` returns it)."""
    tokens = x.numel() // x.shape[-1]
    return {GROUPED_MM: grouped_mm_reason(x, widths, tokens), BATCHED: batched_reason(kind)}


# ----------------------------------------------------------------------------- shared pieces

def _act_backward(activation: str, h: torch.Tensor, da: torch.Tensor) -> torch.Tensor:
    """``d act(h) / dh`` applied to ``da`` (the derivatives autograd uses for these functions)."""
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(da, h)
    if activation == "gelu_tanh":
        return torch.ops.aten.gelu_backward(da, h, approximate="tanh")
    if activation == "silu":
        return torch.ops.aten.silu_backward(da, h)
    if activation == "relu":
        return torch.ops.aten.threshold_backward(da, h, 0)
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        dh = torch.empty_like(h)
        dgate, dup = dh.chunk(2, dim=-1)
        torch.mul(da, F.silu(gate), out=dup)
        dgate.copy_(torch.ops.aten.silu_backward(da * up, gate))
        return dh
    raise ValueError(f"activation must be one of {activations.ACTIVATIONS}, got {activation!r}")


def _grad_buffer(w: torch.Tensor, mask: list[bool]) -> torch.Tensor:
    """The ``[E, ...]`` gradient of ``w`` when some flag of ``mask`` is set, else ``empty(0)``;
    zero where an expert's GEMM does not write."""
    return w.new_zeros(w.shape) if any(mask) else w.new_empty(0)


# ----------------------------------------------------------------------------- batched (split)

def _segments(s: int, p: int):
    """``(expert, first position, last position + 1)`` of the experts that own tokens."""
    return [(e, lo, hi) for e, (lo, hi) in enumerate(((0, p), (p, s))) if hi > lo]


def _affine_into(out: torch.Tensor, a: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> None:
    """``out[...] = a @ w.T (+ b)`` for 3-D strided views ``a [B, n, K]``, ``out [B, n, N]``: one
    strided batched GEMM written in place (the weight broadcast over the batch with stride 0)."""
    if b is not None:
        out.copy_(b.expand_as(out))
    out.baddbmm_(a, w.t().expand(a.shape[0], -1, -1), beta=0.0 if b is None else 1.0)


def _wgrad_into(dw: torch.Tensor, g: torch.Tensor, a: torch.Tensor) -> None:
    """``dw += g^T a`` summed over every row of the 3-D views ``g [B, n, N]``, ``a [B, n, K]``.

    A GEMM's contraction strides uniformly, which the rows of a split view do not when ``B > 1``:
    on CPU (and for a few samples) one GEMM per sample accumulates in place; on CUDA with many
    samples each operand's rows are first made one contiguous block (one pass over them) so that a
    single GEMM sums every sample."""
    bsz, n = a.shape[0], a.shape[1]
    g2, a2 = _fold(g), _fold(a)
    if (g2 is None or a2 is None) and (a.device.type == "cpu" or bsz <= 4):
        for i in range(bsz):
            dw.addmm_(g[i].t(), a[i])
        return
    g2 = g.reshape(bsz * n, -1) if g2 is None else g2
    a2 = a.reshape(bsz * n, -1) if a2 is None else a2
    dw.addmm_(g2.t(), a2)


def _fold(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``t [B, n, K]`` as a ``[B*n, K]`` view, or ``None`` when its rows do not stride uniformly."""
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def _rows(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return t[:, lo:hi]


@torch.library.custom_op("mmkernels::modality_linear_batched", mutates_args=())
def linear_batched(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], split: int,
                   dw_experts: list[bool]) -> torch.Tensor:
    """``y [B, S, H_out]`` of the position split ``split`` (expert 0 below it, 1 from it on)."""
    bsz, s, _ = x.shape
    y = x.new_empty(bsz, s, weight.shape[1])
    for e, lo, hi in _segments(s, split):
        _affine_into(_rows(y, lo, hi), _rows(x, lo, hi), weight[e], None if bias is None else bias[e])
    return y


@linear_batched.register_fake
def _(x, weight, bias, split, dw_experts):
    return x.new_empty(x.shape[0], x.shape[1], weight.shape[1])


@torch.library.custom_op("mmkernels::modality_linear_batched_bwd", mutates_args=())
def linear_batched_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       split: int, needs_dx: bool, dw_experts: list[bool]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bsz, s, h_in = x.shape
    dx = x.new_empty(bsz, s, h_in) if needs_dx else x.new_empty(0)
    dw = _grad_buffer(weight, dw_experts)
    db = _grad_buffer(bias, dw_experts) if bias is not None else weight.new_empty(0)
    for e, lo, hi in _segments(s, split):
        g = _rows(dy, lo, hi)
        if needs_dx:
            _affine_into(_rows(dx, lo, hi), g, weight[e].t(), None)
        if dw_experts[e]:
            _wgrad_into(dw[e], g, _rows(x, lo, hi))
            if bias is not None:
                db[e] = g.sum((0, 1))
    return dx, dw, db


@linear_batched_bwd.register_fake
def _(dy, x, weight, bias, split, needs_dx, dw_experts):
    any_w = any(dw_experts)
    return (x.new_empty(x.shape) if needs_dx else x.new_empty(0),
            weight.new_empty(weight.shape) if any_w else weight.new_empty(0),
            bias.new_empty(bias.shape) if any_w and bias is not None else weight.new_empty(0))


def _linear_batched_setup(ctx, inputs, output):
    x, weight, bias, split, dw_experts = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.split, ctx.dw_experts = split, dw_experts


def _linear_batched_backward(ctx, dy):
    x, weight, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = wanted_experts(ctx.dw_experts, needs[1], bias is not None and needs[2])
    if not (needs[0] or any(mask)):
        return (None,) * 5
    dx, dw, db = linear_batched_bwd(dy, x, weight, bias, ctx.split, needs[0], mask)
    return (dx if needs[0] else None, dw if needs[1] else None,
            db if bias is not None and needs[2] else None, None, None)


linear_batched.register_autograd(_linear_batched_backward, setup_context=_linear_batched_setup)


def _sorted_rows(buf: torch.Tensor, bsz: int, s: int, split: int, lo: int, hi: int) -> torch.Tensor:
    """Expert rows of a buffer in expert order (``[B*p]`` rows of expert 0, then ``[B*(S-p)]``)
    as ``[B, hi - lo, width]``."""
    start = bsz * lo  # lo is 0 (expert 0) or the split position (expert 1)
    return buf[start:start + bsz * (hi - lo)].view(bsz, hi - lo, buf.shape[-1])


@torch.library.custom_op("mmkernels::modality_ffn_batched", mutates_args=())
def ffn_batched(x: torch.Tensor, w_in: torch.Tensor, b_in: Optional[torch.Tensor], w_out: torch.Tensor,
                b_out: Optional[torch.Tensor], split: int, activation: str, dw_in_experts: list[bool],
                dw_out_experts: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [B, S, H_out], h [B*S, Fi])``: ``h`` the pre-activation in expert order."""
    bsz, s, _ = x.shape
    h = x.new_empty(bsz * s, w_in.shape[1])
    segs = _segments(s, split)
    for e, lo, hi in segs:
        _affine_into(_sorted_rows(h, bsz, s, split, lo, hi), _rows(x, lo, hi), w_in[e],
                     None if b_in is None else b_in[e])
    a = activations.apply(activation, h)
    y = x.new_empty(bsz, s, w_out.shape[1])
    for e, lo, hi in segs:
        _affine_into(_rows(y, lo, hi), _sorted_rows(a, bsz, s, split, lo, hi), w_out[e],
                     None if b_out is None else b_out[e])
    return y, h


@ffn_batched.register_fake
def _(x, w_in, b_in, w_out, b_out, split, activation, dw_in_experts, dw_out_experts):
    return x.new_empty(x.shape[0], x.shape[1], w_out.shape[1]), x.new_empty(x.shape[0] * x.shape[1], w_in.shape[1])


@torch.library.custom_op("mmkernels::modality_ffn_batched_bwd", mutates_args=())
def ffn_batched_bwd(dy: torch.Tensor, x: torch.Tensor, w_in: torch.Tensor, b_in: Optional[torch.Tensor],
                    w_out: torch.Tensor, b_out: Optional[torch.Tensor], h: torch.Tensor, split: int,
                    activation: str, needs_dx: bool, dw_in_experts: list[bool], dw_out_experts: list[bool]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    bsz, s, h_in = x.shape
    segs = _segments(s, split)
    a = activations.apply(activation, h)
    da = a.new_empty(a.shape)
    dw_out = _grad_buffer(w_out, dw_out_experts)
    db_out = _grad_buffer(b_out, dw_out_experts) if b_out is not None else w_out.new_empty(0)
    for e, lo, hi in segs:
        g = _rows(dy, lo, hi)
        _affine_into(_sorted_rows(da, bsz, s, split, lo, hi), g, w_out[e].t(), None)
        if dw_out_experts[e]:
            _wgrad_into(dw_out[e], g, _sorted_rows(a, bsz, s, split, lo, hi))
            if b_out is not None:
                db_out[e] = g.sum((0, 1))
    del a
    dh = _act_backward(activation, h, da)
    del da
    dx = x.new_empty(bsz, s, h_in) if needs_dx else x.new_empty(0)
    dw_in = _grad_buffer(w_in, dw_in_experts)
    db_in = _grad_buffer(b_in, dw_in_experts) if b_in is not None else w_in.new_empty(0)
    for e, lo, hi in segs:
        g = _sorted_rows(dh, bsz, s, split, lo, hi)
        if needs_dx:
            _affine_into(_rows(dx, lo, hi), g, w_in[e].t(), None)
        if dw_in_experts[e]:
            _wgrad_into(dw_in[e], g, _rows(x, lo, hi))
            if b_in is not None:
                db_in[e] = g.sum((0, 1))
    return dx, dw_in, db_in, dw_out, db_out


def _ffn_grads_fake(x, w_in, b_in, w_out, b_out, needs_dx, mask_in, mask_out):
    def grads(w, b, mask):
        if not any(mask):
            return w.new_empty(0), w.new_empty(0)
        return w.new_empty(w.shape), b.new_empty(b.shape) if b is not None else w.new_empty(0)
    dw_in, db_in = grads(w_in, b_in, mask_in)
    dw_out, db_out = grads(w_out, b_out, mask_out)
    return x.new_empty(x.shape) if needs_dx else x.new_empty(0), dw_in, db_in, dw_out, db_out


@ffn_batched_bwd.register_fake
def _(dy, x, w_in, b_in, w_out, b_out, h, split, activation, needs_dx, dw_in_experts, dw_out_experts):
    return _ffn_grads_fake(x, w_in, b_in, w_out, b_out, needs_dx, dw_in_experts, dw_out_experts)


def _ffn_batched_setup(ctx, inputs, output):
    x, w_in, b_in, w_out, b_out, split, activation, dw_in_experts, dw_out_experts = inputs
    ctx.save_for_backward(x, w_in, b_in, w_out, b_out, output[1])
    ctx.split, ctx.activation, ctx.masks = split, activation, (dw_in_experts, dw_out_experts)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _ffn_batched_backward(ctx, dy, _dh):
    x, w_in, b_in, w_out, b_out, h = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask_in = wanted_experts(ctx.masks[0], needs[1], b_in is not None and needs[2])
    mask_out = wanted_experts(ctx.masks[1], needs[3], b_out is not None and needs[4])
    if dy is None or not (needs[0] or any(mask_in) or any(mask_out)):
        return (None,) * 9
    dx, dw_in, db_in, dw_out, db_out = ffn_batched_bwd(dy, x, w_in, b_in, w_out, b_out, h, ctx.split,
                                                       ctx.activation, needs[0], mask_in, mask_out)
    return (dx if needs[0] else None, dw_in if needs[1] else None,
            db_in if b_in is not None and needs[2] else None, dw_out if needs[3] else None,
            db_out if b_out is not None and needs[4] else None, None, None, None, None)


ffn_batched.register_autograd(_ffn_batched_backward, setup_context=_ffn_batched_setup)


# ----------------------------------------------------------------------------- grouped_mm

def _gmm_weight(w: torch.Tensor) -> torch.Tensor:
    """``w [E, N, K]`` as grouped_mm's ``[E, K, N]`` operand (a transposed view): copied first
    only when its rows are not 16-byte aligned (a strided or offset view)."""
    wt = w.transpose(-2, -1)
    align = _GMM_ALIGN_BYTES // w.element_size()
    ok = (wt.stride(-2) == 1 and wt.stride(-1) % align == 0 and wt.stride(-1) >= wt.shape[-2]
          and (w.storage_offset() * w.element_size()) % _GMM_ALIGN_BYTES == 0)
    return wt if ok else w.clone(memory_format=torch.contiguous_format).transpose(-2, -1)


def _gmm(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return _grouped_mm_fn()(a, b, offs=ends)


def _slot_experts(offsets: torch.Tensor, tokens: int) -> torch.Tensor:
    """The expert of every slot of the sorted order, ``[T]`` int64 (no host synchronisation)."""
    slots = torch.arange(tokens, device=offsets.device, dtype=offsets.dtype)
    return torch.bucketize(slots, offsets[1:], right=True)


def _segment_sums(g: torch.Tensor, sid: torch.Tensor, e: int) -> torch.Tensor:
    """``[E, N]``: the sum of the rows of ``g [T, N]`` (expert order) that each expert owns, as
    one small GEMM with a one-hot ``[E, T]`` matrix (deterministic, no atomics)."""
    onehot = (sid[None, :] == torch.arange(e, device=g.device)[:, None]).to(g.dtype)
    return onehot @ g


def _add_bias(t: torch.Tensor, b: Optional[torch.Tensor], sid: torch.Tensor) -> torch.Tensor:
    if b is not None:
        t += b.index_select(0, sid)
    return t


def _unpermute(ys: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return ys.new_empty(ys.shape).index_copy_(0, perm.long(), ys)


def _zero_unwanted(mask: list[bool], *grads: torch.Tensor) -> None:
    """Zero the slices of the experts whose flag is off (the grouped GEMM computes every expert)."""
    for i, wanted in enumerate(mask):
        if not wanted:
            for g in grads:
                if g.numel():
                    g[i].zero_()


def _empty_experts(offsets: torch.Tensor) -> torch.Tensor:
    return (offsets[1:] == offsets[:-1]).view(-1, 1, 1)


@torch.library.custom_op("mmkernels::modality_linear_grouped_mm", mutates_args=())
def linear_grouped_mm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], perm: torch.Tensor,
                      offsets: torch.Tensor, dw_experts: list[bool]) -> torch.Tensor:
    """``y [T, H_out]`` in token order for ``x [T, H_in]`` routed by ``perm``/``offsets``."""
    ends = offsets[1:]
    ys = _gmm(x.index_select(0, perm), _gmm_weight(weight), ends)
    ys = _add_bias(ys, bias, _slot_experts(offsets, x.shape[0]))
    return _unpermute(ys, perm)


@linear_grouped_mm.register_fake
def _(x, weight, bias, perm, offsets, dw_experts):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("mmkernels::modality_linear_grouped_mm_bwd", mutates_args=())
def linear_grouped_mm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          perm: torch.Tensor, offsets: torch.Tensor, needs_dx: bool, dw_experts: list[bool]
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ends, e = offsets[1:], weight.shape[0]
    gs = dy.index_select(0, perm)  # expert order, contiguous
    dx = _unpermute(_gmm(gs, weight, ends), perm) if needs_dx else x.new_empty(0)
    dw, db = weight.new_empty(0), weight.new_empty(0)
    if any(dw_experts):
        dw = _gmm(gs.t(), x.index_select(0, perm), ends).masked_fill_(_empty_experts(offsets), 0)
        if bias is not None:
            db = _segment_sums(gs, _slot_experts(offsets, x.shape[0]), e)
        _zero_unwanted(dw_experts, dw, db)
    return dx, dw, db


@linear_grouped_mm_bwd.register_fake
def _(dy, x, weight, bias, perm, offsets, needs_dx, dw_experts):
    any_w = any(dw_experts)
    return (x.new_empty(x.shape) if needs_dx else x.new_empty(0),
            weight.new_empty(weight.shape) if any_w else weight.new_empty(0),
            bias.new_empty(bias.shape) if any_w and bias is not None else weight.new_empty(0))


def _linear_gmm_setup(ctx, inputs, output):
    x, weight, bias, perm, offsets, dw_experts = inputs
    ctx.save_for_backward(x, weight, bias, perm, offsets)
    ctx.dw_experts = dw_experts


def _linear_gmm_backward(ctx, dy):
    x, weight, bias, perm, offsets = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = wanted_experts(ctx.dw_experts, needs[1], bias is not None and needs[2])
    if not (needs[0] or any(mask)):
        return (None,) * 6
    dx, dw, db = linear_grouped_mm_bwd(dy, x, weight, bias, perm, offsets, needs[0], mask)
    return (dx if needs[0] else None, dw if needs[1] else None,
            db if bias is not None and needs[2] else None, None, None, None)


linear_grouped_mm.register_autograd(_linear_gmm_backward, setup_context=_linear_gmm_setup)


@torch.library.custom_op("mmkernels::modality_ffn_grouped_mm", mutates_args=())
def ffn_grouped_mm(x: torch.Tensor, w_in: torch.Tensor, b_in: Optional[torch.Tensor], w_out: torch.Tensor,
                   b_out: Optional[torch.Tensor], perm: torch.Tensor, offsets: torch.Tensor, activation: str,
                   dw_in_experts: list[bool], dw_out_experts: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [T, H_out] in token order, h [T, Fi] the pre-activation in expert order)``."""
    ends = offsets[1:]
    sid = _slot_experts(offsets, x.shape[0])
    h = _add_bias(_gmm(x.index_select(0, perm), _gmm_weight(w_in), ends), b_in, sid)
    ys = _add_bias(_gmm(activations.apply(activation, h), _gmm_weight(w_out), ends), b_out, sid)
    return _unpermute(ys, perm), h


@ffn_grouped_mm.register_fake
def _(x, w_in, b_in, w_out, b_out, perm, offsets, activation, dw_in_experts, dw_out_experts):
    return x.new_empty(x.shape[0], w_out.shape[1]), x.new_empty(x.shape[0], w_in.shape[1])


@torch.library.custom_op("mmkernels::modality_ffn_grouped_mm_bwd", mutates_args=())
def ffn_grouped_mm_bwd(dy: torch.Tensor, x: torch.Tensor, w_in: torch.Tensor, b_in: Optional[torch.Tensor],
                       w_out: torch.Tensor, b_out: Optional[torch.Tensor], perm: torch.Tensor,
                       offsets: torch.Tensor, h: torch.Tensor, activation: str, needs_dx: bool,
                       dw_in_experts: list[bool], dw_out_experts: list[bool]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ends, e = offsets[1:], w_in.shape[0]
    sid = _slot_experts(offsets, x.shape[0])
    empty = _empty_experts(offsets)

    def wgrad(g, a, w, b, mask):
        if not any(mask):
            return w.new_empty(0), w.new_empty(0)
        dw = _gmm(g.t(), a, ends).masked_fill_(empty, 0)
        db = _segment_sums(g, sid, e) if b is not None else w.new_empty(0)
        _zero_unwanted(mask, dw, db)
        return dw, db

    gs = dy.index_select(0, perm)
    a = activations.apply(activation, h)
    dw_out, db_out = wgrad(gs, a, w_out, b_out, dw_out_experts)
    del a
    dh = _act_backward(activation, h, _gmm(gs, w_out, ends))
    del gs
    dw_in, db_in = wgrad(dh, x.index_select(0, perm), w_in, b_in, dw_in_experts)
    dx = _unpermute(_gmm(dh, w_in, ends), perm) if needs_dx else x.new_empty(0)
    return dx, dw_in, db_in, dw_out, db_out


@ffn_grouped_mm_bwd.register_fake
def _(dy, x, w_in, b_in, w_out, b_out, perm, offsets, h, activation, needs_dx, dw_in_experts, dw_out_experts):
    return _ffn_grads_fake(x, w_in, b_in, w_out, b_out, needs_dx, dw_in_experts, dw_out_experts)


def _ffn_gmm_setup(ctx, inputs, output):
    x, w_in, b_in, w_out, b_out, perm, offsets, activation, dw_in_experts, dw_out_experts = inputs
    ctx.save_for_backward(x, w_in, b_in, w_out, b_out, perm, offsets, output[1])
    ctx.activation, ctx.masks = activation, (dw_in_experts, dw_out_experts)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _ffn_gmm_backward(ctx, dy, _dh):
    x, w_in, b_in, w_out, b_out, perm, offsets, h = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask_in = wanted_experts(ctx.masks[0], needs[1], b_in is not None and needs[2])
    mask_out = wanted_experts(ctx.masks[1], needs[3], b_out is not None and needs[4])
    if dy is None or not (needs[0] or any(mask_in) or any(mask_out)):
        return (None,) * 10
    dx, dw_in, db_in, dw_out, db_out = ffn_grouped_mm_bwd(dy, x, w_in, b_in, w_out, b_out, perm, offsets, h,
                                                          ctx.activation, needs[0], mask_in, mask_out)
    return (dx if needs[0] else None, dw_in if needs[1] else None,
            db_in if b_in is not None and needs[2] else None, dw_out if needs[3] else None,
            db_out if b_out is not None and needs[4] else None, None, None, None, None, None)


ffn_grouped_mm.register_autograd(_ffn_gmm_backward, setup_context=_ffn_gmm_setup)
