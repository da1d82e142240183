"""One call that puts a loaded model on mmkernels: :func:`apply_mmkernels` (its docstring says what
it changes, what it leaves alone and why), :func:`unapply_mmkernels` and the :class:`ApplyReport`
both return or read. transformers is imported only where the model is a transformers model.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable
from typing import NamedTuple

from torch import nn

from . import torchscale as _ts
from . import transformers as _hf

_REPORT = "_mmkernels_apply_report"   # in model.__dict__: the report of the patch in effect
_IMPL = "_attn_implementation_internal"  # a transformers config's own attention field (no propagation)


class Entry(NamedTuple):
    """One line of an :class:`ApplyReport`: a component of the model and what happened to it."""
    component: str
    detail: str


@dataclasses.dataclass(eq=False)
class ApplyReport:
    """What :func:`apply_mmkernels` changed in a model, and what it left alone.

    Attributes:
        model: the model's class name.
        patched: an :class:`Entry` per component put on mmkernels (what changed).
        skipped: an :class:`Entry` per component left as it was (why).
        options: the ``attention`` / ``qformer`` / ``multiway`` arguments of the call.
        undone: whether :meth:`undo` has run.

    ``str(report)`` is a readable summary, one line per component.
    """
    model: str
    patched: list[Entry] = dataclasses.field(default_factory=list)
    skipped: list[Entry] = dataclasses.field(default_factory=list)
    options: dict = dataclasses.field(default_factory=dict)
    undone: bool = False
    # the patched model and the records that undo each step, in the order the steps ran;
    # plain data (no closures), so copy.deepcopy of a patched model carries a working report
    _target: nn.Module | None = dataclasses.field(default=None, repr=False)
    _records: list = dataclasses.field(default_factory=list, repr=False)

    def undo(self) -> None:
        """Restore the model as it was before :func:`apply_mmkernels` (same modules, same forwards,
        same attention settings, so the same outputs). Weights changed while patched are kept: the
        multiway experts' current values are copied back into the original torchscale modules.
        A second call does nothing."""
        if self.undone:
            return
        _run_undo(self._records)
        self._records = []
        self.undone = True
        if self._target is not None and self._target.__dict__.get(_REPORT) is self:
            del self._target.__dict__[_REPORT]

    def __str__(self) -> str:
        state = "undone" if self.undone else f"{len(self.patched)} patched, {len(self.skipped)} left alone"
        lines = [f"mmkernels on {self.model}: {state}"]
        lines += [f"  patched  {e.component}: {e.detail}" for e in self.patched]
        lines += [f"  skipped  {e.component}: {e.detail}" for e in self.skipped]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- undo records

def _run_undo(records: list) -> None:
    """Undo ``(kind, data)`` records, last first."""
    for kind, data in reversed(records):
        if kind == "attention":
            for config, before, after in data:
                if getattr(config, _IMPL, None) == after:  # unless the user changed it since
                    setattr(config, _IMPL, before)
        elif kind == "qformer":
            _hf.unpatch_blip2(data)
        elif kind == "multiway":
            for parent, name, original, adapter in data:
                if parent._modules.get(name) is adapter:
                    _copy_back(adapter, original)
                    original.split_position = adapter.split_position
                    original.train(adapter.training)
                    parent._modules[name] = original


def _copy_back(adapter: nn.Module, original: nn.Module) -> None:
    """The adapter's current weights into the original ``MultiwayNetwork`` 's own parameters (the
    adapter's state dict has torchscale's keys): copies of the values, with the device and dtype
    they have now (the model may have been moved while patched)."""
    state = adapter.state_dict()
    for key, tensor in original.state_dict(keep_vars=True).items():
        if key in state:
            tensor.data = state[key].detach().clone()


# ----------------------------------------------------------------------------- attention

def _pretrained_model_class():
    if "transformers" not in sys.modules:  # the model cannot be a transformers model
        return None
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    return PreTrainedModel


def _causal_lm_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _sub_configs(config) -> list[tuple[str, object]]:
    keys = getattr(config, "sub_configs", None) or {}
    return [(k, getattr(config, k, None)) for k in keys if getattr(config, k, None) is not None]


def _walk_configs(config, key: str = ""):
    """``(dotted key, config)`` for every config of a (composite) model: ``""`` is the top one."""
    yield key, config
    for k, sub in _sub_configs(config):
        yield from _walk_configs(sub, f"{key}.{k}" if key else k)


def _default_role(key: str, config, causal: set[str]) -> str | None:
    """None when the sub-model of ``config`` should run on the mmkernels attention function by
    default, else why it should not."""
    leaf = key.rsplit(".", 1)[-1]
    mtype = getattr(config, "model_type", "?")
    if "qformer" in leaf or "qformer" in mtype:
        return "Q-Former: its attention is put on mmkernels by the Q-Former patch, not by attn_implementation"
    if "vision" in leaf or "vision" in mtype:
        return (f"vision encoder ({mtype}): full bidirectional attention over a fixed set of patches, "
                "no mask to exploit; SDPA is already the fastest path there")
    if mtype in causal:
        return None
    return f"{mtype} is not a decoder-only language model"


def _attention_plan(model, attention, causal: set[str]) -> tuple[list[tuple[str, object]], list[Entry]]:
    """The ``(key, config)`` pairs to switch and the skipped entries. A composite model (one with
    ``sub_configs``) is decided per sub-config, a plain one as a whole (key ``""``)."""
    configs = dict(_walk_configs(model.config))
    if isinstance(attention, bool):
        leaves = [k for k, c in configs.items() if k and not _sub_configs(c)]
        candidates = leaves if _sub_configs(model.config) else [""]
        chosen, skipped = [], []
        for key in candidates:
            why = _default_role(key, configs[key], causal)
            if why is None:
                chosen.append(key)
            else:
                skipped.append(Entry(f"attention of {key or 'the model'}", why))
        return [(k, configs[k]) for k in chosen], skipped
    keys = [attention] if isinstance(attention, str) else list(attention)
    unknown = [k for k in keys if k not in configs]
    if unknown:
        names = ", ".join(repr(k) for k in configs)
        raise ValueError(f"attention names sub-configs {unknown} that {type(model).__name__} does not have; "
                         f"its configs are {names} ('' is the model's own)")
    others = [Entry(f"attention of {k}", "not named in attention=") for k, c in configs.items()
              if k and k not in keys and not _sub_configs(c)]
    return [(k, configs[k]) for k in keys], others


def _nested(keys: list[str], name: str, composite: bool):
    """``set_attn_implementation``'s argument switching exactly ``keys`` (dotted sub-config keys;
    a plain string would switch every sub-model of a composite model)."""
    if not composite:
        return name
    tree: dict = {}
    for key in keys:
        node = tree
        parts = key.split(".") if key else []
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if isinstance(node, str):
                raise ValueError(f"attention: {key!r} lies inside a sub-config that is switched as a whole")
        node[parts[-1] if parts else ""] = name
    return tree


def _holders(model, config, pretrained) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, pretrained) and m.config is config]


def _label(key: str, holders: list[nn.Module]) -> str:
    cls = type(holders[0]).__name__ if holders else "no sub-model"
    return f"attention of {key or 'the model'} ({cls})"


def _switch_attention(model, attention, report: ApplyReport) -> None:
    pretrained = _pretrained_model_class()
    if pretrained is None or not isinstance(model, pretrained):
        report.skipped.append(Entry("attention", "not a transformers PreTrainedModel"))
        return
    plan, skipped = _attention_plan(model, attention, _causal_lm_types())
    report.skipped += skipped
    targets = []
    for key, config in plan:
        holders = _holders(model, config, pretrained)
        refusing = [type(m).__name__ for m in holders if not type(m)._can_set_attn_implementation()]
        if not holders:
            report.skipped.append(Entry(_label(key, holders), "no sub-model of the model holds this config"))
        elif refusing:
            report.skipped.append(Entry(_label(key, holders), f"{refusing[0]} does not dispatch attention "
                                        "through transformers' AttentionInterface"))
        else:
            targets.append((key, config, holders))
    if not targets:
        return
    try:
        from .hf_attention import register_attention
        name = register_attention()
    except ImportError as e:
        report.skipped.append(Entry("attention", f"the mmkernels attention function is unavailable: {e}"))
        return
    configs = [c for _, c in _walk_configs(model.config)]
    configs += [m.config for m in model.modules() if isinstance(m, pretrained)]
    before = {id(c): (c, getattr(c, _IMPL, None)) for c in configs}
    record: list = []
    report._records.append(("attention", record))
    try:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(_nested([k for k, _, _ in targets], name,
                                                  bool(_sub_configs(model.config))))
        else:  # older transformers: the config field is what the model reads
            for _, config, _ in targets:
                config._attn_implementation = name
    finally:  # what changed, also when transformers raised half-way
        record += [(c, old, getattr(c, _IMPL, None)) for c, old in before.values()
                   if getattr(c, _IMPL, None) != old]
    for key, config, holders in targets:
        old = before[id(config)][1]
        if old == name:
            report.skipped.append(Entry(_label(key, holders), f"already {name}; left as it is"))
        elif getattr(config, _IMPL, None) == name:
            report.patched.append(Entry(_label(key, holders), f"{old} -> {name}"))
        else:
            report.skipped.append(Entry(_label(key, holders), f"transformers kept {getattr(config, _IMPL, None)}"))


# ----------------------------------------------------------------------------- Q-Former, multiway

def _patch_qformers(model, report: ApplyReport) -> None:
    classes: tuple = ()
    if "transformers" in sys.modules:
        try:
            classes = _hf._qformer_classes()
        except ImportError:
            classes = ()
    found = [(n, m) for n, m in model.named_modules() if classes and isinstance(m, classes)]
    if not found:
        report.skipped.append(Entry("Q-Former", "the model holds no BLIP-2 / InstructBLIP Q-Former"))
        return
    for name, qformer in found:
        label = f"Q-Former {name or '(the model)'} ({type(qformer).__name__})"
        if _hf.is_patched(qformer):
            report.skipped.append(Entry(label, "already patched by patch_blip2; left to whoever patched it"))
            continue
        _hf.patch_blip2(qformer)
        report._records.append(("qformer", qformer))
        report.patched.append(Entry(label, "attention on mmkernels.cross_attention, cross K/V in one GEMM"))


def _patch_multiway(model, report: ApplyReport) -> None:
    slots = [(parent, name, child) for parent in model.modules() for name, child in parent._modules.items()
             if child is not None and _ts._kind(child) is not None]
    if not slots:
        report.skipped.append(Entry("multiway", "the model holds no torchscale MultiwayNetwork of "
                                    "Linear / LayerNorm / FFN experts"))
        return
    _ts.patch_multiway(model)
    record = [(parent, name, child, parent._modules[name]) for parent, name, child in slots
              if isinstance(parent._modules[name], _ts.MultiwayAdapter)]
    report._records.append(("multiway", record))
    kinds: dict[str, int] = {}
    for adapter in {id(r[3]): r[3] for r in record}.values():
        kinds[adapter.kind] = kinds.get(adapter.kind, 0) + 1
    counts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    report.patched.append(Entry("multiway", f"{sum(kinds.values())} MultiwayNetworks ({counts}) on "
                                "mmkernels' routed Multiway modules"))


# ----------------------------------------------------------------------------- entry points

def apply_mmkernels(model: nn.Module, *, attention: bool | str | Iterable[str] = True, qformer: bool = True,
                    multiway: bool = True, verbose: bool = True) -> ApplyReport:
    """Put everything mmkernels accelerates in a loaded model on mmkernels, in place.

    Args:
        model: a transformers ``PreTrainedModel`` (LLaMA, Qwen2, Gemma, OPT, LLaVA, PaliGemma,
            Gemma 3, BLIP-2, InstructBLIP, ...) or any ``nn.Module`` (a torchscale BEiT-3 / VLMo).
        attention: ``True`` switches the attention implementation of each decoder-only language
            model in ``model`` to ``"mmkernels"`` (the function
            :func:`mmkernels.integrations.hf_attention.register_attention` registers with
            transformers' ``AttentionInterface``); ``False`` leaves attention alone; a sub-config
            name or several (``"text_config"``, ``{"text_config", "vision_config"}``, dotted
            for nested ones, ``""`` for the model's own config) switch exactly those.
        qformer: put every BLIP-2 / InstructBLIP Q-Former in ``model`` on mmkernels'
            cross-attention kernels (:func:`mmkernels.integrations.patch_blip2`).
        multiway: replace torchscale ``MultiwayNetwork`` s of Linear / LayerNorm / FFN experts by
            mmkernels' routed modules (:func:`mmkernels.integrations.patch_multiway`).
        verbose: print the report once.

    Returns:
        An :class:`ApplyReport` listing each component patched and each left alone with the reason;
        ``report.undo()`` (or :func:`unapply_mmkernels`) restores the model exactly.

    Per sub-model, with ``attention=True``: a plain model (no ``sub_configs``) is switched when
    its ``model_type`` is a causal language model's; a composite model is decided per sub-config:
    the language model (``text_config`` of a causal-LM type) is switched, the vision encoder is
    left on its attention (bidirectional over a fixed set of patches: no mask for mmkernels to
    exploit, and SDPA is the fastest path there), the Q-Former is handled by the Q-Former patch,
    and other sub-models are left alone. A sub-model whose class does not dispatch through
    ``AttentionInterface`` is left alone. The switch uses ``model.set_attn_implementation`` (where
    transformers has it; else the config's ``_attn_implementation`` field), so generation and
    ``from_pretrained``-style loading keep working, and undo restores each config's own field.

    One function serves every model: the patches act on a loaded instance and find what the model
    holds (language model, Q-Former, multiway experts), so per-model variants
    (``apply_mmkernels_to_llava`` ...) would only be aliases.

    Safety: every step is recorded as it is made, and if any step raises, the steps already made
    are undone before the error propagates: the model is never left half-patched. Applying twice
    with the same options returns the report in effect; other options raise until the first
    patch is undone. Parameters change only where multiway experts are replaced (new parameter
    objects: build the optimiser after this call); the patched forwards compute what the
    originals compute within the kernels' tolerance (the documented differences of
    :func:`patch_blip2` and :func:`patch_multiway` apply: e.g. the fused multiway FFN has no
    dropout inside it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_mmkernels takes an nn.Module, got {type(model).__name__}")
    for flag, value in (("qformer", qformer), ("multiway", multiway), ("verbose", verbose)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool, got {type(value).__name__}")
    if not isinstance(attention, (bool, str)):
        attention = tuple(sorted(attention))
        if not all(isinstance(k, str) for k in attention):
            raise TypeError("attention must be a bool, a sub-config name or an iterable of names")
    options = {"attention": attention, "qformer": qformer, "multiway": multiway}
    current = model.__dict__.get(_REPORT)
    if current is not None:
        if current.options != options:
            raise ValueError(f"mmkernels is already applied to this model with {current.options}; call "
                             "unapply_mmkernels(model) before applying it with other options")
        return current
    report = ApplyReport(model=type(model).__name__, options=options, _target=model)
    steps = [(attention is not False, lambda: _switch_attention(model, attention, report)),
             (qformer, lambda: _patch_qformers(model, report)),
             (multiway, lambda: _patch_multiway(model, report))]
    try:
        for wanted, step in steps:
            if wanted:
                step()
    except BaseException:
        _run_undo(report._records)
        raise
    for component, flag, wanted in (("attention", "attention", attention is not False),
                                    ("Q-Former", "qformer", qformer), ("multiway", "multiway", multiway)):
        if not wanted:
            report.skipped.append(Entry(component, f"{flag}=False"))
    model.__dict__[_REPORT] = report
    if verbose:
        print(report)
    return report


def unapply_mmkernels(model: nn.Module) -> bool:
    """Undo :func:`apply_mmkernels` on ``model``; returns whether there was anything to undo."""
    report = model.__dict__.get(_REPORT) if isinstance(model, nn.Module) else None
    if report is None:
        return False
    report.undo()
    return True


def applied_report(model: nn.Module) -> ApplyReport | None:
    """The :class:`ApplyReport` of the :func:`apply_mmkernels` patch in effect on ``model``, or None."""
    return model.__dict__.get(_REPORT) if isinstance(model, nn.Module) else None


__all__ = ["ApplyReport", "Entry", "applied_report", "apply_mmkernels", "unapply_mmkernels"]
