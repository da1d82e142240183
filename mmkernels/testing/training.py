"""Parity in training: a reference model's two forms trained side by side.

:func:`train_side_by_side` trains the ``plain`` form in float64 (the truth), and in ``dtype`` the
``mmkernels`` form (and, below float64, the ``plain`` form too: eager PyTorch's own error in that
dtype), from the same initial parameters on the same batches, with AdamW.
:func:`assert_parity` checks the loss at every step and every parameter and buffer at the end with
the project's one comparison rule (:func:`mmkernels.testing.numerics.assert_close`): within the
tolerance table against the float64 truth, or (below float64) at most twice the error of eager
PyTorch in the same dtype. It also checks that training lowered the loss, so a run on data
without structure cannot pass.

Parameter entries the loss does not depend on (the float64 truth's gradient is zero to rounding at
every step: the key bias of an attention, which shifts a whole softmax row) are an exception. In
float32 their gradient is rounding noise, which AdamW normalises into steps of up to ``lr``, so
two float32 runs drift apart there at random; those entries are held to AdamW's bound instead,
``steps * lr`` from the truth.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import _backend
from ..models import common
from .numerics import assert_close


@dataclass
class TrainRun:
    """Losses per step (float64 values) and final state dicts (float64 copies) of the forms."""

    dtype: torch.dtype
    losses: dict = field(default_factory=dict)   # form -> [steps] float64 tensor
    states: dict = field(default_factory=dict)   # form -> {name: float64 tensor}
    grad_max: dict = field(default_factory=dict)  # parameter name -> the truth's max |grad| over steps
    lr: float = 0.0


def _cast(batch: dict, dtype: torch.dtype) -> dict:
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in batch.items()}


def _train(model: torch.nn.Module, batches: list, steps: int, dtype: torch.dtype, lr: float,
           weight_decay: float, backend: str | None, grad_max: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Train ``model`` for ``steps`` AdamW steps; returns the losses and the final state. With
    ``grad_max`` (a dict), record in it each parameter's elementwise max |grad| over the steps."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    losses = []
    for step in range(steps):
        batch = _cast(batches[step % len(batches)], dtype)
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(1000 + step)          # the same draws in forward for every form
        with _backend.backend(backend or _backend.current()):
            loss = model(**batch)
            loss.backward()
        if not torch.isfinite(loss.detach()):
            raise AssertionError(f"{type(model).__name__}: non-finite loss {loss.item()} at step {step}")
        if grad_max is not None:
            for n, p in named:
                if p.grad is not None:
                    g = p.grad.detach().abs().double()
                    grad_max[n] = torch.maximum(grad_max[n], g) if n in grad_max else g
        opt.step()
        losses.append(loss.detach().double())
    state = {k: v.detach().double().clone() if v.is_floating_point() else v.detach().clone()
             for k, v in model.state_dict().items()}
    return torch.stack(losses), state


def train_side_by_side(name, config, *, batch_size: int, steps: int = 30, dtype=torch.float32,
                       num_batches: int = 4, lr: float = 1e-3, weight_decay: float = 0.01,
                       backend: str | None = None, seed: int = 0) -> TrainRun:
    """Train the reference model ``name`` (``mmkernels.models.<name>``, or a module following the
    interface of :mod:`mmkernels.models.common`) at ``config``.

    ``num_batches`` batches of ``synthetic_batch(config, batch_size, seed=seed + i)`` (made in
    float64 and cast) are cycled through for ``steps`` AdamW steps. ``backend`` forces the
    mmkernels form's backend (``"triton"``, ``"cpu"``); the plain forms run on the default one
    (they call no mmkernels op). Returns the losses and final states of ``truth`` (plain, float64),
    ``mmkernels`` (``dtype``) and, when ``dtype`` is not float64, ``plain`` (``dtype``).
    """
    module = common.load(name) if isinstance(name, str) else name
    batches = [module.synthetic_batch(config, batch_size, seed=seed + i, dtype=torch.float64)
               for i in range(num_batches)]
    run = TrainRun(dtype=dtype, lr=lr)
    forms = [("truth", "plain", torch.float64), ("mmkernels", "mmkernels", dtype)]
    if dtype != torch.float64:
        forms.append(("plain", "plain", dtype))
    for label, impl, dt in forms:
        model = common.build(module, config, impl, seed=seed, dtype=dt)
        run.losses[label], run.states[label] = _train(
            model, batches, steps, dt, lr, weight_decay, backend if impl == "mmkernels" else None,
            run.grad_max if label == "truth" else None)
    return run


#: a truth gradient below this at every step (relative to the largest gradient of any parameter)
#: marks an entry the loss does not depend on
GRAD_FREE = 1e-9


def _grad_free(run: TrainRun, name: str) -> torch.Tensor | None:
    """Bool mask of the entries of parameter ``name`` the loss does not depend on, or None."""
    g = run.grad_max.get(name)
    if g is None or run.dtype == torch.float64:
        return None
    largest = max(t.max().item() for t in run.grad_max.values())
    free = g <= GRAD_FREE * max(largest, 1e-30)
    return free if bool(free.any()) else None


def assert_parity(run: TrainRun, *, min_drop: float = 0.1, scale: float = 1.0) -> None:
    """The mmkernels form matches the float64 truth: the loss at every step and each floating
    parameter and buffer at the end, under the tolerance table for ``run.dtype`` (widened by
    ``scale``) or, below float64, within twice the plain form's error in that dtype. Below float64,
    entries the loss does not depend on are held to ``steps * lr`` (module docstring). The truth's
    loss must fall by at least ``min_drop`` (relative) from the first step to the mean of the last
    five."""
    truth = run.losses["truth"]
    drop = 1.0 - truth[-5:].mean().item() / truth[0].item()
    if not drop >= min_drop:
        raise AssertionError(f"the loss did not fall: {truth[0].item():.4g} -> {truth[-5:].mean().item():.4g} "
                             f"(relative drop {drop:.3g} < {min_drop})")
    eager = run.losses.get("plain")
    assert_close(run.losses["mmkernels"], truth, run.dtype, eager=eager, scale=scale, name="loss per step")
    for k, ref in run.states["truth"].items():
        got = run.states["mmkernels"][k]
        if not ref.is_floating_point():
            if not torch.equal(got, ref):
                raise AssertionError(f"buffer {k}: differs from the plain form's")
            continue
        e = run.states["plain"][k] if eager is not None else None
        free = _grad_free(run, k)
        if free is not None:
            drift = (got - ref).abs()[free].max().item()
            bound = len(truth) * run.lr
            if not drift <= bound:
                raise AssertionError(f"final {k}: entries without gradient moved {drift:.3g} > steps * lr = {bound:.3g}")
            got, ref = got.masked_fill(free, 0.0), ref.masked_fill(free, 0.0)
            e = e.masked_fill(free, 0.0) if e is not None else None
        assert_close(got, ref, run.dtype, eager=e, scale=scale, name=f"final {k}")
