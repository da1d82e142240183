"""Every benchmark provider computes the function its case names, so that the speedups compare like
with like: loss and gradients against the family's oracle in float64.

The cases are those ``pytest bench/`` times (``bench.cases.pytest_plan``): ``BENCH_DEVICE``
(default ``cpu``) and ``BENCH_PROFILE`` (default ``pytest``) pick them. Test ids start with the
family, so ``-k "agrees and (experts or cross_attention)"`` narrows the check to families.
"""
from __future__ import annotations

import pytest
import torch

from bench import harness
from mmkernels._dispatch import PathUnavailable
from bench.cases import attention as A
from bench.cases import cross_attention as XA
from bench.cases import experts as X
from bench.cases import pair_id, pytest_plan

# torch.testing (rtol, atol) of the contrastive and attention checks
TOL = {"float32": (2e-4, 1e-5), "bfloat16": (3e-2, 3e-2), "float16": (5e-3, 5e-3)}
# experts: max |provider - oracle| <= tol * max |oracle| per tensor (weight gradients sum over many tokens)
EXPERTS_TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}


def _skip_unless_runs(case, provider) -> None:
    reason = harness.preflight(case, provider, harness.RunOptions())
    if reason:
        pytest.skip(reason)


def _float64(inputs: dict) -> dict:
    """Detached float64 copies of the floating tensors (keeping requires_grad); the rest as is."""
    return {k: (v.detach().double().requires_grad_(v.requires_grad)
                if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in inputs.items()}


def _inputs(case) -> dict:
    torch.manual_seed(case.seed)
    return case.make_inputs(case)


def _agree_with_reference(case, provider) -> None:
    """Loss and the gradient of every input against ``reference`` (contrastive, cross-attention,
    K/V projection)."""
    inputs = _inputs(case)
    out = provider.fn(**inputs)
    out.backward()
    ref_inputs = _float64(inputs)
    ref = case.provider("reference").fn(**ref_inputs)
    ref.backward()
    rtol, atol = TOL[case.dtype]
    torch.testing.assert_close(out.detach().double(), ref.detach(), rtol=rtol, atol=atol)
    for name, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.requires_grad:
            torch.testing.assert_close(v.grad.double(), ref_inputs[name].grad, rtol=rtol, atol=atol,
                                       msg=lambda m: f"grad of {name}: {m}")


def _attention_seen(inputs):
    mask = inputs["ctx"].mask
    if mask is None:
        return None
    return (A.visible_per_row(mask) > 0)[:, None, :, None]


def _agree_attention(case, provider) -> None:
    """Output (rows that see a key), loss and q/k/v gradients against the reference."""
    inputs = _inputs(case)
    ref_inputs = _float64(inputs)
    rtol, atol = TOL[case.dtype]
    if case.mode == "fwd":
        with torch.no_grad():
            out = provider.fn(**inputs)
            ref = case.provider("reference").fn(**ref_inputs)
        seen = _attention_seen(inputs)
        if seen is not None:
            out, ref = torch.where(seen, out, 0), torch.where(seen, ref, 0)
        torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
        return
    out = provider.fn(**inputs)
    out.backward()
    ref = case.provider("reference").fn(**ref_inputs)
    ref.backward()
    torch.testing.assert_close(out.detach().double(), ref.detach(), rtol=rtol, atol=atol * inputs["q"].numel() ** 0.5)
    for name in ("q", "k", "v"):
        torch.testing.assert_close(inputs[name].grad.double(), ref_inputs[name].grad, rtol=rtol, atol=atol,
                                   msg=lambda m: f"grad of {name}: {m}")


def _experts_oracle(case, provider):
    """The provider that defines the function, evaluated in float64: mmkernels' reference where it
    imports (and is not the provider under test), else the boolean-mask loop (CogVLM's, or ``masked``
    for the LayerNorm), or torchscale's split (the sub-LN FFN, on a split layout)."""
    ref = case.provider("reference")
    if provider.name != "reference" and harness.preflight(case, ref, harness.RunOptions()) is None:
        return ref
    names = {p.name for p in case.providers}
    return case.provider(next(n for n in ("cogvlm", "masked", "torchscale") if n in names))


def _close(got, want, tol, what):
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    assert err <= tol * max(scale, 1e-30), f"{what}: max error {err:.3g} > {tol} x max |oracle| {scale:.3g}"


def _agree_experts(case, provider) -> None:
    """Loss and the gradients of x, weights and biases against the oracle (dense: against the
    reference with every token on expert 0, the one function it computes)."""
    oracle = _experts_oracle(case, provider)
    inputs = _inputs(case)
    out = provider.fn(**inputs)
    out.backward()
    ref_inputs = _float64(inputs)
    if provider.name == X.SPEED_OF_LIGHT:
        ref_inputs["ctx"] = inputs["ctx"].all_on_expert0()
    ref = oracle.fn(**ref_inputs)
    ref.backward()
    tol = EXPERTS_TOL[case.dtype]
    n = inputs["dout"].numel()
    assert abs(out.item() - ref.item()) <= tol * max(abs(ref.item()), n**0.5), (out.item(), ref.item(), oracle.name)
    for name, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.requires_grad:
            _close(v.grad, ref_inputs[name].grad, tol, f"grad of {name} (oracle {oracle.name})")


def _agree_qformer(case, provider) -> None:
    """A whole Q-Former step (mmkernels.QFormer, patched HF, HF sdpa) against HF eager (eval mode):
    output and the gradients of the inputs and every parameter."""
    XA.agree(case, provider.name)


def _copy(inputs: dict, dtype=None) -> dict:
    """Detached copies of the tensors (floating ones in ``dtype`` when given), keeping requires_grad."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            c = v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach().clone()
            out[k] = c.requires_grad_(v.requires_grad)
        else:
            out[k] = v
    return out


def _agree_models(case, provider) -> None:
    """A reference model's training step (the mmkernels form) against its plain form evaluated in
    float64 on the same parameters and batch: the loss and the gradient of every parameter, within
    the tolerance or (the project's rule) twice the plain form's own error in the case's dtype."""
    inputs = _inputs(case)
    ref_inputs = _copy(inputs, torch.float64)   # copies before any call: a forward may update
    eager_inputs = _copy(inputs)                # state (ALBEF's momentum encoders and queues)
    results = []
    for fn, ins in ((provider.fn, inputs), (case.provider("reference").fn, ref_inputs),
                    (case.provider("reference").fn, eager_inputs)):
        torch.manual_seed(case.seed)
        loss = fn(**ins)
        loss.backward()
        results.append(loss.item())
    out, ref, eager = results
    tol = EXPERTS_TOL[case.dtype]
    assert abs(out - ref) <= max(tol * max(abs(ref), 1.0), 2 * abs(eager - ref)), (out, ref, eager)
    names = [n for n, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    # a gradient that is zero in exact arithmetic (an attention's key bias) is rounding noise in
    # float32: each tensor is compared at no finer a scale than 1e-3 of the largest gradient
    floor = 1e-3 * max(ref_inputs[n].grad.abs().max().item() for n in names)
    for name in names:
        got, want = inputs[name].grad.double(), ref_inputs[name].grad
        assert torch.isfinite(got).all(), f"grad of {name}: non-finite values"
        err = (got - want).abs().max().item()
        eager_err = (eager_inputs[name].grad.double() - want).abs().max().item()
        scale = max(want.abs().max().item(), floor)
        assert err <= max(tol * scale, 2 * eager_err), \
            f"grad of {name}: max error {err:.3g} > {tol} x {scale:.3g} and > twice eager's {eager_err:.3g}"


def _check(case, provider):
    """The agreement check of a pair, or None where the pair has none (the oracle itself, the
    torch.mm rate probes, the attention mask's construction)."""
    if case.rate_probe:
        return None
    if case.family == "attention":
        return _agree_attention if case.op != A.OP_MASK and provider.name != "reference" else None
    if case.family == "experts":
        return _agree_experts
    if case.family == "models":
        return _agree_models if provider.name != "reference" else None
    if case.family == XA.FAMILY and case.op == XA.OP_QFORMER:
        return _agree_qformer if provider.name != XA.oracle_name(case) else None
    if provider.name != "reference" and any(p.name == "reference" for p in case.providers):
        return _agree_with_reference
    return None


AGREE = [pair for pair in pytest_plan() if _check(*pair) is not None]


@pytest.mark.parametrize("case,provider", AGREE, ids=[f"{c.family}-{pair_id((c, p))}" for c, p in AGREE])
def test_provider_agrees(case, provider):
    _skip_unless_runs(case, provider)
    try:
        _check(case, provider)(case, provider)
    except PathUnavailable as exc:  # a forced path that cannot run this case (say why)
        pytest.skip(str(exc))
