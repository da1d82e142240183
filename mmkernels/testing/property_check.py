"""One drawn case of an op: forward and backward on a backend, the float64 reference and eager.

:func:`check_op` runs ``fn`` three times on the same values: on the backend under test (inputs
in the case's dtype, in the drawn memory layouts), under the ``reference`` backend in float64
(the truth) and under the ``reference`` backend in the case's dtype ("eager": what plain
PyTorch gets in that dtype). It compares the output and the gradient of every differentiable
input with the project's one rule, :func:`mmkernels.testing.numerics.assert_close`: within the
tolerance table, else at most twice eager's error. A case whose float64 outputs do not fit the
dtype, or where eager itself overflows, is :class:`~mmkernels.testing.property.Rejected`.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from .. import _backend, _dispatch
from .numerics import assert_close, exception_allowance, tolerance
from .property import Rejected, laid_out


def _run(fn: Callable, values: dict, grads: tuple, dtypes: dict, layouts: dict, backend: str,
         cotangent: torch.Tensor | None, kwargs: dict) -> dict:
    """``fn(**inputs, **kwargs)`` on ``backend`` and its backward; returns ``{"out": ...,
    "d<name>": ...}``. ``values``: float64 tensors (or anything else, passed through);
    ``dtypes[name]`` the dtype each floating tensor is cast to."""
    args, leaves = {}, {}
    for name, v in values.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.to(dtypes[name])
            if name in grads:
                leaf, view = laid_out(v, layouts.get(name, "contiguous"))
                leaves[name] = (leaf, view)
                v = view(leaf)
        args[name] = v
    with _backend.backend(backend), _dispatch.explain() as log:
        out = fn(**args, **kwargs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    result = {"out": out.detach(), "decisions": list(log)}
    if leaves:
        g = torch.ones((), dtype=out.dtype) if cotangent is None else cotangent.to(out.dtype)
        out.backward(g.expand_as(out))
        for name, (leaf, view) in leaves.items():
            grad = leaf.grad
            result[f"d{name}"] = (torch.zeros_like(view(leaf)) if grad is None else view(grad)).detach()
    return result


def _fits(ref: torch.Tensor, eager: torch.Tensor, dtype: torch.dtype) -> bool:
    """The float64 value is representable in ``dtype`` and eager did not overflow where it is
    finite."""
    finite = torch.isfinite(ref)
    if bool((ref[finite].abs() > torch.finfo(dtype).max / 2).any()):
        return False
    return bool(torch.isfinite(eager.to(torch.float64))[finite].all())


def check_op(fn: Callable, values: dict, *, dtype: torch.dtype, backend: str, grads=(), dtypes=None,
             layouts=None, cotangent: torch.Tensor | None = None, kwargs=None,
             tolerance_dtype: dict | None = None, allowances: Callable[[], dict] | None = None,
             op: str | None = None) -> dict:
    """Check one case of ``fn`` on ``backend`` against the float64 reference with the eager rule.

    Args:
        fn: calls the op, ``fn(**values, **kwargs)``; returns its output (or a tuple whose first
            element is the differentiated output).
        values: the inputs by name; floating tensors in float64 holding values exact in their
            dtype, other values (ints, flags, index tensors) passed as they are.
        dtype: the case's dtype; floating inputs are cast to it unless ``dtypes`` names another.
        grads: names of the inputs whose gradients are checked.
        layouts: ``{name: layout}`` for the backend run (:func:`laid_out`); the reference runs
            read contiguous tensors.
        cotangent: float64 gradient of the output (None: ones).
        tolerance_dtype: ``{"out" | "d<name>": dtype}`` the tolerance row of a quantity computed
            in another precision (default ``dtype``).
        allowances: computes ``{allowance name: {quantity: bound}}`` for the documented
            exceptions (:data:`~mmkernels.testing.numerics.NUMERICS_EXCEPTIONS`) that can apply
            to the op; called only when one does.
        op: the op's name, for an op that records no dispatch decision (it always runs its
            kernels, or the reference under that backend): the exceptions are looked up as
            if it had recorded running ``"kernel"`` on the backend that ran it.

    Returns the backend's results ``{"out": ..., "d<name>": ...}``. Raises ``AssertionError``
    naming the quantity, its error and eager's, or :class:`Rejected`.
    """
    kwargs = kwargs or {}
    dtypes = {name: (dtypes or {}).get(name, dtype) for name in values}
    grads = tuple(grads)
    ref = _run(fn, values, grads, {n: torch.float64 for n in values}, {}, "reference", cotangent, kwargs)
    eager = _run(fn, values, grads, dtypes, {}, "reference", cotangent, kwargs)
    ref.pop("decisions"), eager.pop("decisions")  # the reference backend: no exception applies
    for name, r in ref.items():
        if not _fits(r, eager[name], (tolerance_dtype or {}).get(name, dtype)):
            raise Rejected(name)
    # the scale of the terms each quantity sums: the float64 reference on |inputs|, |cotangent|
    absolute = {n: v.abs() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for n, v in values.items()}
    try:
        terms = _run(fn, absolute, grads, {n: torch.float64 for n in values}, {}, "reference",
                     None if cotangent is None else cotangent.abs(), kwargs)
        terms.pop("decisions")
        magnitudes = {n: float(t.abs().nan_to_num(0, 0, 0).max()) if t.numel() else 0.0
                      for n, t in terms.items()}
    except (RuntimeError, ValueError):  # an op that rejects such inputs: the result's scale
        magnitudes = {}
    actual = _run(fn, values, grads, dtypes, layouts or {}, backend, cotangent, kwargs)
    decisions = actual.pop("decisions")
    if not decisions and op is not None:
        device = next(v.device for v in values.values() if isinstance(v, torch.Tensor))
        with _backend.backend(backend):
            ran = _backend.resolve(device)
        if ran != "reference":
            decisions = [_dispatch.Decision("", op, (), "kernel", ran, "records no decision")]
    user_allowances = allowances

    @functools.lru_cache(maxsize=1)
    def allowances():
        bounds = dict(user_allowances() if user_allowances is not None else {})
        bounds["table"] = {}
        for q, r in ref.items():
            atol, rtol = tolerance((tolerance_dtype or {}).get(q, dtype))
            scale = max(float(r.abs().max()) if r.numel() else 0.0, magnitudes.get(q, 0.0))
            gap = (eager[q].to(torch.float64) - r).abs().nan_to_num(0, 0, 0)
            eager_err = float(gap.max()) if gap.numel() else 0.0
            bounds["table"][q] = 7 * (atol + rtol * scale) + 8 * eager_err
        return bounds
    for name, r in ref.items():
        a = actual[name]
        if a.dtype != eager[name].dtype:
            raise AssertionError(f"{name}: dtype {a.dtype}, eager PyTorch gives {eager[name].dtype}")
        tol = (tolerance_dtype or {}).get(name, dtype)
        mag = magnitudes.get(name)
        try:
            assert_close(a, r, tol, eager=eager[name], name=name, magnitude=mag)
        except AssertionError:
            extra = exception_allowance(decisions, dtype, name, allowances)
            if not extra:
                raise
            assert_close(a, r, tol, eager=eager[name], name=name, extra=extra, magnitude=mag)
    return actual
