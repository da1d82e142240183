"""The ``qformer`` op of the cross_attention family: one training step of a whole BLIP-2
Q-Former, ``mmkernels.QFormer`` and the patched HF model against HF transformers' own
``Blip2QFormerModel``. Its cases are built by ``bench.cases.cross_attention.cases`` (the family's
entry point), its agreement checked by ``bench.cases.cross_attention.agree``.

One training step (``model.train()``, HF's dropout 0.1 / 0.1) of a BLIP-2 Q-Former with text input
(``use_qformer_text_input``: ITM/ITG-style ``Q`` queries + ``T`` text tokens, the queries
cross-attending to ``Lk`` image tokens), timed forward + backward (mode ``fwd+bwd``),
``loss = sum(last_hidden_state * dout)``, gradients for ``query_embeds`` and every parameter; the
image features need none (BLIP-2's ViT is frozen). ``attention_mask`` pads the text (lengths drawn
in ``[T/2, T]``, seed 0, first sample full). Shape keys ``B, Q, T, Lk, hidden, heads, layers, inter,
freq, C, drop``.

Providers (every provider binds the same ``nn.Parameter`` objects, the case's inputs, into its own
modules, built on the meta device; so they share weights and the harness clears their gradients
between repeats):

* ``mmkernels``: ``mmkernels.QFormer`` (same config; K/V weights re-shared into one storage after
  binding, as after ``load_state_dict``).
* ``mmkernels_compiled`` (GPU, full profile only: compiling the 12-layer step is too slow for --quick):
  ``torch.compile(mmkernels.QFormer, fullgraph=True)``, the glue around the GEMMs fused by inductor.
* ``mmkernels_patched``: HF ``Blip2QFormerModel`` (``attn_implementation="sdpa"``, transformers'
  default) after ``mmkernels.integrations.transformers.patch_blip2``.
* ``hf_eager``: HF ``Blip2QFormerModel`` with ``attn_implementation="eager"``.
* ``hf_sdpa``: HF ``Blip2QFormerModel`` with ``attn_implementation="sdpa"`` (where the installed
  transformers accepts it).

dtype: fp32 on CPU; on GPU bf16 inputs and bf16 *weights* for every provider (the whole model
``bfloat16``, no autocast): HF keeps the Q-Former in fp32 when it loads BLIP-2 and LAVIS trains it
under autocast, but mmkernels' ops have no autocast rule, and one dtype regime for all providers
keeps the comparison about the kernels.

Agreement: the providers are checked against ``hf_eager`` in float64, in eval mode (dropout masks
differ by design); the step's non-tensor input, :class:`QFormerContext`, is rebuilt for the float64
copies of the parameters (``PARAM_PREFIX`` names them among the case's inputs).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from bench.cases.common import elem_size, first_line, randn
from bench.cases.xattn_common import FAMILY, OP_QFORMER, _loss, mmkernels_xattn_support
from bench.harness import Case, Provider

# qformer: (B, Q, T, Lk, hidden, heads, layers, inter, freq, C, drop)
_BLIP2 = (32, 32, 257, 768, 12, 12, 3072, 2, 1408, 0.1)
GPU_QFORMER = {"full": [(128,) + _BLIP2], "quick": [(128,) + _BLIP2]}
# the CPU target case: "a Q-Former step no slower than HF's on CPU" at the real widths and depth
# (B = 4; --quick B = 2 to keep the family's quick run short on 2 cores)
CPU_QFORMER = {"full": [(4,) + _BLIP2], "quick": [(2,) + _BLIP2]}
PYTEST_QFORMER = [(2, 4, 4, 7, 64, 4, 2, 128, 2, 48, 0.1)]


def pad_lengths(batch: int, n: int) -> torch.Tensor:
    """Text lengths in [n/2, n] (seed 0), the first sample full: a padded batch of captions."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(n // 2, 1), n + 1, (batch,), generator=g, dtype=torch.int64)
    lengths[0] = n
    return lengths


def qformer_config_kwargs(shape: dict) -> dict:
    return dict(
        hidden_size=shape["hidden"],
        num_attention_heads=shape["heads"],
        num_hidden_layers=shape["layers"],
        intermediate_size=shape["inter"],
        cross_attention_frequency=shape["freq"],
        encoder_hidden_size=shape["C"],
        hidden_dropout_prob=shape["drop"],
        attention_probs_dropout_prob=shape["drop"],
        use_qformer_text_input=True,
    )


def hf_config(kwargs: dict, attn_implementation: str):
    from transformers import Blip2QFormerConfig

    return Blip2QFormerConfig(**kwargs, attn_implementation=attn_implementation)


def _bind(model: nn.Module, params: dict) -> nn.Module:
    """Put the given tensors in place of ``model``'s parameters (same objects: shared weights)."""
    names = {n for n, _ in model.named_parameters()}
    if names != set(params):
        missing, extra = sorted(names - set(params))[:4], sorted(set(params) - names)[:4]
        raise RuntimeError(f"{type(model).__name__} parameter names differ from the case's: missing {missing}, "
                           f"unexpected {extra}")
    for name, p in params.items():
        path, _, leaf = name.rpartition(".")
        mod = model.get_submodule(path) if path else model
        mod._parameters[leaf] = p
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__} still has meta tensors after binding: {left[:4]}")
    return model


def _cross_kv_linears(model: nn.Module) -> list:
    return [(l.crossattention.attention.key, l.crossattention.attention.value)
            for l in model.encoder.layer if getattr(l, "has_cross_attention", False)]


class QFormerContext:
    """The non-tensor input of a ``qformer`` case: the config, the shared parameters and each
    provider's model, built by its first (untimed) call and cached."""

    def __init__(self, cfg: dict, params: dict, query_length: int, training: bool = True):
        self.cfg = cfg
        self.params = params
        self.query_length = query_length
        self.training = training
        self.models: dict = {}

    def model(self, impl: str) -> nn.Module:
        m = self.models.get(impl)
        if m is None:
            m = self.models[impl] = build_qformer(impl, self.cfg, self.params)
        m.train(self.training)
        return m


def build_qformer(impl: str, cfg: dict, params: dict) -> nn.Module:
    if impl == "mmkernels_compiled":
        return torch.compile(build_qformer("mmkernels", cfg, params), fullgraph=True)
    if impl == "mmkernels":
        from mmkernels.models import QFormer

        with torch.device("meta"):
            model = QFormer(hf_config(cfg, "eager"))
        _bind(model, params)
        from mmkernels.cross_attention import share_kv_storage

        share_kv_storage(_cross_kv_linears(model))  # as QFormer does after .to() / load_state_dict
        return model
    from transformers import Blip2QFormerModel

    attn = {"hf_eager": "eager", "hf_sdpa": "sdpa", "mmkernels_patched": "sdpa"}[impl]
    with torch.device("meta"):
        model = Blip2QFormerModel(hf_config(cfg, attn))
    _bind(model, params)
    if impl == "mmkernels_patched":
        from mmkernels.integrations.transformers import patch_blip2

        patch_blip2(model)
    return model


def param_spec(cfg: dict) -> list:
    """``(name, shape, kind)`` of every Q-Former parameter (HF names), kind in linear_w, linear_b,
    ln_w, ln_b."""
    from transformers import Blip2QFormerModel

    with torch.device("meta"):
        model = Blip2QFormerModel(hf_config(cfg, "eager"))
    spec = []
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            if isinstance(mod, nn.LayerNorm):
                kind = "ln_w" if pname == "weight" else "ln_b"
            else:
                kind = "linear_w" if p.dim() == 2 else "linear_b"
            spec.append((name, tuple(p.shape), kind))
    return spec


def make_qformer_params(case: Case, dtype: Optional[torch.dtype] = None) -> dict:
    """Every parameter, seeded from the case, uniform with the standard deviation of: HF's init for
    linear weights (0.02), 0.02 for linear biases, 1 +- 0.1 for LayerNorm weights and 0.1 for their
    biases (not HF's zeros/ones, so that a misplaced bias or norm shows in the agreement check).
    Uniform rather than normal: 160M normal draws take seconds on one CPU core."""
    dev, dt = case.device, dtype or case.torch_dtype
    g = torch.Generator(device=dev).manual_seed(case.seed + 1)
    params = {}
    for name, shape, kind in param_spec(qformer_config_kwargs(case.shape)):
        std = 0.02 if kind in ("linear_w", "linear_b") else 0.1
        a = std * 3.0**0.5
        t = torch.empty(shape, device=dev).uniform_(-a, a, generator=g)
        if kind == "ln_w":
            t.add_(1.0)
        params[name] = nn.Parameter(t.to(dt))
    return params


PARAM_PREFIX = "param:"


def make_qformer_inputs(case: Case) -> dict:
    s = case.shape
    B, Q, T, Lk = s["B"], s["Q"], s["T"], s["Lk"]
    S = Q + T
    dev, dt = case.device, case.torch_dtype
    g = torch.Generator(device=dev).manual_seed(case.seed)
    mask = torch.ones(B, S, dtype=torch.int64)
    if T:
        text = torch.arange(T)[None, :] < pad_lengths(B, T)[:, None]
        mask[:, Q:] = text.to(torch.int64)
    params = make_qformer_params(case)
    inputs = {
        "query_embeds": randn((B, S, s["hidden"]), g, dev).to(dt).requires_grad_(),
        "image_embeds": randn((B, Lk, s["C"]), g, dev).to(dt),  # frozen ViT: no gradient
        "attention_mask": mask.to(dev),
        "dout": randn((B, S, s["hidden"]), g, dev).to(dt),
        "ctx": QFormerContext(qformer_config_kwargs(s), params, Q),
    }
    inputs.update({PARAM_PREFIX + n: p for n, p in params.items()})
    return inputs


def qformer_step(query_embeds, image_embeds, attention_mask, dout, ctx, *, impl: str, **params):
    model = ctx.model(impl)
    if impl in ("mmkernels", "mmkernels_compiled"):
        out = model(query_embeds, image_embeds, query_length=ctx.query_length, attention_mask=attention_mask)
    else:
        out = model(query_embeds=query_embeds, query_length=ctx.query_length, attention_mask=attention_mask,
                    encoder_hidden_states=image_embeds).last_hidden_state
    return _loss(out, dout)


def _check_transformers() -> Optional[str]:
    try:
        from transformers import Blip2QFormerConfig, Blip2QFormerModel  # noqa: F401
    except Exception as exc:
        return f"transformers (Blip2QFormerModel) not importable ({first_line(exc)})"
    return None


@functools.lru_cache(maxsize=None)
def hf_sdpa_support() -> Optional[str]:
    reason = _check_transformers()
    if reason:
        return reason
    from transformers import Blip2QFormerModel

    if not getattr(Blip2QFormerModel, "_supports_sdpa", False):
        return "the installed transformers' Blip2QFormerModel does not support attn_implementation='sdpa'"
    try:
        cfg = hf_config(dict(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, intermediate_size=16,
                             encoder_hidden_size=8, use_qformer_text_input=True), "sdpa")
        with torch.device("meta"):
            model = Blip2QFormerModel(cfg)
        got = getattr(model.config, "_attn_implementation", "sdpa")
        if got != "sdpa":
            return f"transformers built the Q-Former with attn_implementation={got!r} when asked for 'sdpa'"
    except Exception as exc:
        return f"attn_implementation='sdpa' rejected ({first_line(exc)[:200]})"
    return None


def check_qformer(impl: str, case: Case) -> Optional[str]:
    reason = _check_transformers()
    if reason:
        return reason
    if impl == "hf_sdpa" or impl == "mmkernels_patched":
        reason = hf_sdpa_support()
        if reason:
            return reason
    if impl in ("mmkernels", "mmkernels_compiled"):
        try:
            from mmkernels.models import QFormer  # noqa: F401
        except Exception as exc:
            return f"mmkernels.models.QFormer not importable ({first_line(exc)[:200]})"
    if impl == "mmkernels_patched":
        try:
            from mmkernels.integrations.transformers import patch_blip2  # noqa: F401
        except Exception as exc:
            return f"mmkernels.integrations.transformers.patch_blip2 not importable ({first_line(exc)[:200]})"
    if impl.startswith("mmkernels"):
        return mmkernels_xattn_support(case.device, case.dtype)
    return None


def _qdims(shape: dict) -> tuple:
    s = shape
    return s["B"], s["Q"], s["T"], s["Lk"], s["hidden"], s["heads"], s["layers"], s["inter"], s["freq"], s["C"]


def qformer_flops(shape: dict) -> float:
    """3 x the forward's GEMM and attention-matmul FLOPs, minus the K/V projection's dX GEMM (the
    image features need no gradient)."""
    B, Q, T, Lk, Hd, _nh, L, I, freq, C = _qdims(shape)
    S = Q + T
    n_cross = len(range(0, L, freq))
    per_layer = 2.0 * B * S * Hd * Hd * 4 + 4.0 * B * S * S * Hd + 2.0 * B * S * Hd * I * 2
    cross = 2.0 * B * Q * Hd * Hd * 2 + 4.0 * B * Q * Lk * Hd
    kv = 2.0 * B * Lk * C * 2 * Hd
    return 3.0 * (L * per_layer + n_cross * cross) + 2.0 * n_cross * kv


def est_qformer(factor: float, case: Case) -> int:
    """Activations kept for the backward: per layer ~``factor`` x hidden-wide and 3 x FFN-wide
    tensors per token, the attention probabilities (eager: [B, heads, S, S] and [B, heads, Q, Lk],
    x3 with dropout and gradients), the cross K/V of every cross layer (x2 with gradients)."""
    B, Q, T, Lk, Hd, nh, L, I, freq, C = _qdims(case.shape)
    S = Q + T
    e = elem_size(case)
    n_cross = len(range(0, L, freq))
    per_layer = B * S * (factor * Hd + 3 * I) + 3 * B * nh * (S * S + Q * Lk)
    return int((L * per_layer + n_cross * 2 * B * Lk * 2 * Hd) * e)


def qformer_providers(compiled: bool = False) -> tuple:
    """The Q-Former providers; ``compiled`` adds ``mmkernels_compiled`` (full profile only: compiling
    the 12-layer step costs more time than the quick suite can spend)."""
    return tuple(p for p in (
        Provider("mmkernels", functools.partial(qformer_step, impl="mmkernels"),
                 check=functools.partial(check_qformer, "mmkernels"), mem_estimate=functools.partial(est_qformer, 14),
                 note="mmkernels.models.QFormer (HF Blip2QFormerModel's config and parameters; one fused K/V GEMM "
                      "per forward, cross_attention for cross- and padded self-attention)"),
        Provider("mmkernels_compiled", functools.partial(qformer_step, impl="mmkernels_compiled"),
                 check=functools.partial(check_qformer, "mmkernels_compiled"),
                 mem_estimate=functools.partial(est_qformer, 14),
                 note="torch.compile(mmkernels.models.QFormer, fullgraph=True): inductor fuses the LayerNorm, "
                      "residual, dropout and GELU glue around the GEMMs and the mmkernels ops"),
        Provider("mmkernels_patched", functools.partial(qformer_step, impl="mmkernels_patched"),
                 check=functools.partial(check_qformer, "mmkernels_patched"),
                 mem_estimate=functools.partial(est_qformer, 14),
                 note="HF Blip2QFormerModel (attn_implementation='sdpa') after "
                      "mmkernels.integrations.transformers.patch_blip2"),
        Provider("hf_eager", functools.partial(qformer_step, impl="hf_eager"),
                 check=functools.partial(check_qformer, "hf_eager"), mem_estimate=functools.partial(est_qformer, 16),
                 note="HF transformers Blip2QFormerModel, attn_implementation='eager'"),
        Provider("hf_sdpa", functools.partial(qformer_step, impl="hf_sdpa"),
                 check=functools.partial(check_qformer, "hf_sdpa"), mem_estimate=functools.partial(est_qformer, 16),
                 note="HF transformers Blip2QFormerModel, attn_implementation='sdpa'"),
    ) if compiled or p.name != "mmkernels_compiled")


def qformer_case(B, Q, T, Lk, hidden, heads, layers, inter, freq, C, drop, dtype: str, device: str,
                 compiled: bool = False) -> Case:
    shape = {"B": B, "Q": Q, "T": T, "Lk": Lk, "hidden": hidden, "heads": heads, "layers": layers,
             "inter": inter, "freq": freq, "C": C, "drop": drop}
    return Case(
        family=FAMILY,
        op=OP_QFORMER,
        shape=shape,
        dtype=dtype,
        device=device,
        make_inputs=make_qformer_inputs,
        providers=qformer_providers(compiled),
        mode="fwd+bwd",
        flops=qformer_flops(shape),
        flops_formula="3*fwd GEMM+attention FLOPs - K/V dX",
        x="B",
        note=f"train mode, dropout {drop}; text lengths {pad_lengths(B, T).tolist()[:8]}{'...' if B > 8 else ''}",
    )
