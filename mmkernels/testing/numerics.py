"""The project's one tolerance table and comparison rule (DESIGN.md, "Numerics").

An output passes when every element satisfies ``|out - ref| <= atol + rtol * |ref|``
against a float64 reference. Where the problem is ill-conditioned for the
dtype (bf16 gradients of a loss over logits in the hundreds, say) eager PyTorch
fails that bound too; then, when the same computation done by eager PyTorch in
the output's dtype is given, the rule FlashAttention uses decides: the largest
error is at most twice eager's, plus ``atol`` and one rounding step of the dtype at the
tensor's scale (``eps * max|ref|``: FlashAttention's tests add the same slack, the rounding
error of the dtype at the reference's magnitude, so that two equally valid summation orders
whose errors differ by chance near a tensor's largest values do not decide the test). NaN
never passes unless the reference is NaN there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _eps(dtype) -> float:
    """The rounding step of ``dtype`` at 1.0 (``torch.finfo(dtype).eps``; tf32 keeps 10 bits)."""
    return 2.0 ** -10 if dtype == "tf32" else torch.finfo(dtype).eps


#: dtype -> (atol, rtol)
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    "tf32": (3e-4, 3e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}


def tolerance(dtype, scale: float = 1.0) -> tuple[float, float]:
    """``(atol, rtol)`` for ``dtype``; ``scale`` widens both for quantities summed over many terms."""
    atol, rtol = TOLERANCES[dtype]
    return atol * scale, rtol * scale


def assert_close(actual: torch.Tensor, reference: torch.Tensor, dtype=None, *, eager: torch.Tensor | None = None,
                 scale: float = 1.0, name: str = "output", extra: float = 0.0,
                 magnitude: float | None = None) -> None:
    """Assert ``actual`` matches the float64 ``reference`` under the table's tolerance for ``dtype``.

    ``dtype`` defaults to ``actual.dtype``. ``eager``: the same quantity computed by eager
    PyTorch in ``dtype``; when given, an output outside the elementwise bound still passes if
    ``max|actual - ref| <= 2 * max|eager - ref| + atol + eps(dtype) * max|ref|``.
    ``magnitude``: the scale of the terms the quantity sums, when known (the reference run on
    the inputs' absolute values); the rounding step is taken there when larger than
    ``max|ref|``, as an ill-conditioned sum's error follows its terms, not its result.
    ``extra`` widens that bound only for the documented exceptions
    (:data:`NUMERICS_EXCEPTIONS`): the rounding bound of the term that exceeds the rule.
    """
    dtype = actual.dtype if dtype is None else dtype
    atol, rtol = tolerance(dtype, scale)
    if actual.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
    a = actual.detach().to(torch.float64).cpu()
    r = reference.detach().to(torch.float64).cpu()
    nan_ok = torch.isnan(a) == torch.isnan(r)
    if not bool(nan_ok.all()):
        raise AssertionError(f"{name}: NaN pattern differs from the reference")
    finite = ~torch.isnan(r)
    err = torch.where(a == r, torch.zeros_like(a), (a - r).abs())[finite]  # equal infinities: no error
    bound = (atol + rtol * r.abs())[finite]
    if not err.numel() or bool((err <= bound).all()):
        return
    worst = int(torch.argmax(err - bound))
    message = (f"{name} ({dtype}): max error {err.max().item():.3g}, worst element error "
               f"{err[worst].item():.3g} > bound {bound[worst].item():.3g} (atol {atol:g}, rtol {rtol:g})")
    if eager is None:
        raise AssertionError(message)
    ea = eager.detach().to(torch.float64).cpu()
    e = torch.where(ea == r, torch.zeros_like(ea), (ea - r).abs())[finite]
    step = _eps(dtype) * max(float(r[finite].abs().max()) if err.numel() else 0.0, magnitude or 0.0)
    if err.max() > 2 * e.max() + atol + step + extra:
        raise AssertionError(f"{message}, and more than 2x eager PyTorch's max error "
                             f"{e.max().item():.3g} plus one rounding step at the largest value "
                             f"({step:.3g})" + (f" plus the exception's bound {extra:.3g}" if extra else ""))


@dataclass(frozen=True)
class NumericsException:
    """Where an op may exceed twice eager's error, by how much, and why (README, "Numerics").

    It applies to a call of ``op`` that ran ``path`` (``"kernel"`` or a PyTorch-op path;
    ``mmkernels.explain()`` names it) on one of ``backends`` (``"cpu"``, ``"triton"``), in one of
    ``dtypes``, for the outputs or gradients named in ``quantities`` (``"dq"``, ...; ``"*"``: every
    one). Their error
    may exceed the rule by the rounding bound named ``allowance``, which the checking test
    computes from the case's float64 values (``tests/property/common.py``).
    """

    op: str
    path: str
    backends: tuple
    dtypes: tuple
    quantities: tuple
    allowance: str
    why: str


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_ATTENTION_WHY = (
    "two roundings every fast attention carries: the float32 scores (at |s| in the hundreds "
    "their rounding moves each probability by a relative eps32 |s|, in eager too but in another "
    "order), and the backward's delta = rowsum(dO * O) from O rounded to the dtype, as "
    "FlashAttention and PyTorch's SDPA form it, where eager sums P dP from the very dP it "
    "subtracts it from: on nearly one-hot rows dP - delta cancels and that shows in dq and dk")
_ATTENTION_QUANTITIES = ("out", "dq", "dk", "dv")

_UNIT_WHY = ("open: the ITC unit (itc_rows_loss, momentum_itc_loss, blip2_itc_loss, and "
             "contrastive_loss/infonce_loss with token features or distillation) still takes one "
             "rounded log-sum-exp into its backward, and SigLIP's logit_scale and feature gradients "
             "sum their terms in another order than eager; both exceed twice eager's error at "
             "ordinary sizes in some cases and far more at large logits")
_UNIT_PATHS = (("kernel", ("cpu", "triton")), ("blockwise", (None,)), ("materialized", (None,)))

_EXPERTS_WHY = ("ill-conditioned reductions: a LayerNorm whose mean is many times its spread, "
                "or hidden sums whose terms far exceed their result; eager's error there is near "
                "zero by chance on some draws, and the twice-eager rule compares two realisations "
                "of the same rounding")
_EXPERTS_PATHS = (("kernel", ("cpu", "triton")), ("grouped_mm", (None,)), ("batched", (None,)))

#: The documented exceptions to the twice-eager rule; README.md's "Numerics" lists the same.
#: ``allowance="table"``: eight times the tolerance table's bound at the scale of the quantity's
#: largest value or of the terms it sums, or ten times eager's error (computed by the check).
NUMERICS_EXCEPTIONS: tuple[NumericsException, ...] = tuple(
    NumericsException(op, path, backends, _FLOATS, ("out", "*"), "table", _UNIT_WHY)
    for op in ("itc_loss", "siglip_loss") for path, backends in _UNIT_PATHS) + tuple(
    NumericsException(op, path, backends, _FLOATS, ("out", "*"), "table", _EXPERTS_WHY)
    for op in ("modality_linear", "modality_ffn", "modality_layer_norm")
    for path, backends in _EXPERTS_PATHS) + (
    NumericsException("multimodal_attention", "kernel", ("cpu", "triton"), _FLOATS, _ATTENTION_QUANTITIES,
                      "attention", _ATTENTION_WHY),
    NumericsException("cross_attention", "kernel", ("cpu", "triton"), _FLOATS, _ATTENTION_QUANTITIES,
                      "attention", _ATTENTION_WHY),
    NumericsException("multimodal_attention", "sdpa", (None,), _FLOATS, _ATTENTION_QUANTITIES,
                      "attention", _ATTENTION_WHY),
    NumericsException("cross_attention", "sdpa", (None,), _FLOATS, _ATTENTION_QUANTITIES,
                      "attention", _ATTENTION_WHY),
    NumericsException("multimodal_attention", "flex", (None,), _FLOATS, _ATTENTION_QUANTITIES,
                      "attention", _ATTENTION_WHY),
)


def exception_allowance(decisions, dtype: torch.dtype, quantity: str, allowances) -> float:
    """The extra error ``quantity`` may carry for a call that made ``decisions``
    (``mmkernels.explain()``'s records): 0, or the bound of a documented exception, looked up
    as ``allowances()[name][quantity]`` (``allowances``: a callable computing them, or None).
    Raises when an exception applies and the caller did not compute its bound."""
    names = {x.allowance for d in decisions for x in NUMERICS_EXCEPTIONS
             if d.op == x.op and d.path == x.path and d.backend in x.backends and dtype in x.dtypes
             and (quantity in x.quantities or "*" in x.quantities)}
    if not names:
        return 0.0
    if allowances is None:
        raise AssertionError(f"{quantity}: the documented exception(s) {sorted(names)} apply here, "
                             "but the check computed no allowance for them")
    bounds = allowances()
    return max(float(bounds[n][quantity]) for n in names)
