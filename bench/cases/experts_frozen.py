"""Experts family, training with a frozen expert: CogVLM's pretraining freezes the language expert
(expert 0 of the ``cogvlm`` layout: BOS and text) and trains the visual one.

Op ``modality_ffn_frozen``: the ``modality_ffn`` case of ``bench/cases/experts.py`` (same inputs,
shape keys and ``loss = sum(out * dout)``) plus the shape key ``frozen``, the experts whose
weights and biases get no gradient (comma-separated ids). The stacked ``[E, ...]`` inputs stay
leaves; each provider reads the frozen experts' slices detached.

Providers:

* ``mmkernels``: ``mmkernels.modality_ffn`` with per-expert weight lists (views of the stacked
  parameters, back to back in one storage, the frozen ones detached): what a
  ``MultiwayFFN(per_expert_parameters=True)`` passes. The op skips the frozen experts'
  weight-gradient GEMMs.
* ``cogvlm``: CogVLM's ``VisionExpertMLP`` as written, on the same per-expert views.
* ``grouped_mm``: the sort + ``torch._grouped_mm`` pipeline on the weights stacked again from those
  views (a copy, as separate expert modules would need).
* ``reference``: the eager reference on the same re-stacked weights.

No ``dense`` speed of light: the frozen case computes less than one dense layer's backward.
FLOPs: forward ``2*T*H*(Fi+F)``, dx the same, and the weight gradients of the trained experts'
tokens only.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from bench.cases import experts as X
from bench.harness import Case, Provider

OP = "modality_ffn_frozen"


def make_inputs(case: Case) -> dict:
    inputs = X.make_ffn_inputs(case)
    inputs["ctx"].frozen = frozen_experts(case.shape["frozen"])
    return inputs


def frozen_experts(spec: str) -> frozenset:
    """``"0"`` or ``"0,2"`` -> the expert ids."""
    return frozenset(int(e) for e in spec.split(","))


def _views(t: Optional[torch.Tensor], ctx) -> list:
    """Per-expert views of a stacked ``[E, ...]`` tensor, the frozen experts' detached."""
    if t is None:
        return [None] * ctx.E
    return [v.detach() if e in ctx.frozen else v for e, v in enumerate(t.unbind(0))]


def _restacked(t: Optional[torch.Tensor], ctx) -> Optional[torch.Tensor]:
    return None if t is None else torch.stack(_views(t, ctx))


def ffn_mmkernels(x, w_in, b_in, w_out, b_out, ctx, dout=None):
    import mmkernels

    lists = [None if t is None else _views(t, ctx) for t in (w_in, b_in, w_out, b_out)]
    return X._loss(mmkernels.modality_ffn(x, ctx.ids, *lists, activation=ctx.activation), dout)


def ffn_cogvlm(x, w_in, b_in, w_out, b_out, ctx, dout=None):
    return X._loss(X.cogvlm_mlp(x, *(_views(t, ctx) for t in (w_in, b_in, w_out, b_out)), ctx), dout)


def ffn_grouped_mm(x, w_in, b_in, w_out, b_out, ctx, dout=None):
    return X.ffn_grouped_mm(x, *(_restacked(t, ctx) for t in (w_in, b_in, w_out, b_out)), ctx, dout)


def ffn_reference(x, w_in, b_in, w_out, b_out, ctx, dout=None):
    return X.ffn_reference(x, *(_restacked(t, ctx) for t in (w_in, b_in, w_out, b_out)), ctx, dout)


def providers() -> tuple:
    return (
        Provider("mmkernels", ffn_mmkernels, check=functools.partial(X.check_mmkernels, "modality_ffn"),
                 mem_estimate=functools.partial(X.est_ffn, 3),
                 note="mmkernels.modality_ffn(x, ids, per-expert weight lists, ...), the frozen experts' views "
                      "detached (MultiwayFFN(per_expert_parameters=True)); no weight-gradient GEMMs for them"),
        Provider("cogvlm", ffn_cogvlm, mem_estimate=functools.partial(X.est_ffn, 6),
                 note="CogVLM VisionExpertMLP as written on the same per-expert views"),
        Provider("grouped_mm", ffn_grouped_mm, check=X.check_grouped_mm, mem_estimate=functools.partial(X.est_ffn, 7),
                 note="sort + torch._grouped_mm pipeline on the weights stacked again from the views (a copy)"),
        Provider("reference", ffn_reference, check=functools.partial(X.check_reference, "modality_ffn_reference"),
                 mem_estimate=functools.partial(X.est_ffn, 6),
                 note="mmkernels.experts.reference.modality_ffn_reference on the re-stacked weights"),
    )


def flops(B: int, layout: str, H: int, Fd: int, act: str, frozen: str) -> float:
    """Forward + dx (2 x 2*T*H*(Fi+F)) + the trained experts' weight gradients (2*T_trained*H*(Fi+F))."""
    Fi = 2 * Fd if act == "swiglu" else Fd
    per = X.expert_tokens(layout, B)
    trained = sum(n for e, n in enumerate(per) if e not in frozen_experts(frozen))
    return 2.0 * 2.0 * B * X.seq_len(layout) * H * (Fi + Fd) + 2.0 * trained * H * (Fi + Fd)


def case(layout: str, B: int, H: int, Fd: int, act: str, bias: bool, dtype: str, device: str,
         frozen: str = "0") -> Case:
    S, E = X.seq_len(layout), X.num_experts(layout)
    return Case(
        family=X.FAMILY,
        op=OP,
        shape={"layout": layout, "E": E, "B": B, "S": S, "H": H, "F": Fd, "act": act, "bias": bool(bias),
               "frozen": frozen},
        dtype=dtype,
        device=device,
        make_inputs=make_inputs,
        providers=providers(),
        mode="fwd+bwd",
        flops=flops(B, layout, H, Fd, act, frozen),
        flops_formula="2*2*T*H*(Fi+F) + 2*T_trained*H*(Fi+F), T=B*S, Fi=2F for swiglu",
        x="B",
        note=f"tokens per expert {X.expert_tokens(layout, B)}, frozen experts {frozen}",
    )
