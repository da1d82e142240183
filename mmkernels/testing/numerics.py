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
                 scale: float = 1.0, name: str = "output", eager_factor: float = 2.0) -> None:
    """Assert ``actual`` matches the float64 ``reference`` under the table's tolerance for ``dtype``.

    ``dtype`` defaults to ``actual.dtype``. ``eager``: the same quantity computed by eager
    PyTorch in ``dtype``; when given, an output outside the elementwise bound still passes if
    ``max|actual - ref| <= 2 * max|eager - ref| + atol + eps(dtype) * max|ref|``.
    ``eager_factor`` replaces the 2 only for the documented exceptions
    (:data:`NUMERICS_EXCEPTIONS`).
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
    step = _eps(dtype) * float(r[finite].abs().max()) if err.numel() else 0.0
    if err.max() > eager_factor * e.max() + atol + step:
        raise AssertionError(f"{message}, and more than {eager_factor:g}x eager PyTorch's max error "
                             f"{e.max().item():.3g} plus one rounding step at the largest value "
                             f"({step:.3g})")


@dataclass(frozen=True)
class NumericsException:
    """Where an op is allowed more than twice eager's error, and why (README, "Numerics").

    It applies to a call of ``op`` that ran ``path`` (``"kernel"`` or a PyTorch-op path such as
    ``"sdpa"``; ``mmkernels.explain()`` names it) on ``backend`` (``"cpu"``, ``"triton"``, or
    None for PyTorch-op paths), in one of ``dtypes``, for the gradients or outputs named in
    ``quantities`` (``"out"``, ``"dq"``, ...): their error may reach ``factor`` times eager's.
    """

    op: str
    path: str
    backends: tuple
    dtypes: tuple
    quantities: tuple
    factor: float
    why: str


#: The documented exceptions to the twice-eager rule; README.md's "Numerics" lists the same.
NUMERICS_EXCEPTIONS: tuple[NumericsException, ...] = ()


def eager_factor(decisions, dtype: torch.dtype, quantity: str) -> float:
    """The factor of eager's error ``quantity`` may reach for a call that made ``decisions``
    (``mmkernels.explain()``'s records): 2, or a documented exception's factor."""
    factor = 2.0
    for d in decisions:
        for x in NUMERICS_EXCEPTIONS:
            if (d.op == x.op and d.path == x.path and d.backend in x.backends and dtype in x.dtypes
                    and quantity in x.quantities):
                factor = max(factor, x.factor)
    return factor
