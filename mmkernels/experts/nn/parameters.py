"""How ``MultiwayLinear`` / ``MultiwayFFN`` hold their experts' weights: stacked ``[E, ...]``
parameters (default) or, with ``per_expert_parameters``, ``E`` parameters ``[...]`` that are
views of one ``[E, ...]`` storage (:func:`expert_parameter`, :class:`ExpertModule`).
"""
from __future__ import annotations

import torch
from torch import nn

from ... import _storage
from ..routing import MAX_EXPERTS


def check_num_experts(num_experts: int) -> int:
    """A module constructor's ``num_experts``: an int in ``1..MAX_EXPERTS``."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts must be an int in 1..{MAX_EXPERTS}, got {num_experts!r}")
    return num_experts


def check_experts_list(experts, what: str) -> list:
    """``from_experts``' sequence of per-expert modules (``what`` names them) as a list of 1..8."""
    if isinstance(experts, nn.Module) and not isinstance(experts, (nn.ModuleList, nn.Sequential)):
        raise TypeError(f"from_experts takes a sequence of {what}, got a single {type(experts).__name__}")
    experts = list(experts)
    if not 1 <= len(experts) <= MAX_EXPERTS:
        raise ValueError(f"from_experts takes 1..{MAX_EXPERTS} experts, got {len(experts)}")
    return experts


def same_placement(tensors: list[torch.Tensor], what: str) -> None:
    """The experts' tensors share one dtype and one device (``what`` prefixes the error)."""
    t0 = tensors[0]
    for t in tensors[1:]:
        if t.dtype != t0.dtype:
            raise TypeError(f"{what}: the experts have different dtypes ({t0.dtype} and {t.dtype}); convert them first")
        if t.device != t0.device:
            raise ValueError(f"{what}: the experts live on different devices ({t0.device} and {t.device})")


def expert_parameter(num_experts: int, shape: tuple[int, ...], per_expert: bool, **kw):
    """An uninitialised ``[E, *shape]`` parameter, or (``per_expert``) a ``ParameterList`` of ``E``
    ``[*shape]`` parameters that are views of one ``[E, *shape]`` storage. ``kw``: device, dtype.

    The ops read the per-expert parameters as that stack without a copy (``mmkernels._storage``),
    and each expert is a parameter of its own, so one expert can be frozen
    (``requires_grad=False``, no optimiser state, no weight decay) while the others train:
    CogVLM's pretraining freezes the language expert and trains the visual one. State-dict keys
    gain the expert index (``w_in.0``, ``w_in.1``); a state dict of either layout loads into
    either."""
    data = torch.empty(num_experts, *shape, **kw)
    if not per_expert:
        return nn.Parameter(data)
    return nn.ParameterList([nn.Parameter(d) for d in data.unbind(0)])


def expert_data(param, e: int) -> torch.Tensor:
    """Expert ``e``'s slice of ``param`` (either layout), as plain data to initialise or copy into."""
    return param[e].data if isinstance(param, nn.ParameterList) else param.data[e]


def common_requires_grad(parts: list[tuple[int, torch.Tensor]], what: str) -> bool:
    """Whether the ``(expert, tensor)`` ``parts`` that become one parameter train.

    They must agree: one parameter cannot be partly frozen (zeroed gradients would still see
    weight decay and optimiser state). ``what`` names the parameter in the error.
    """
    frozen = sorted({e for e, t in parts if not t.requires_grad})
    trained = sorted({e for e, t in parts if t.requires_grad})
    if frozen and trained:
        raise ValueError(
            f"from_experts: {what} is frozen (requires_grad=False) in expert(s) {frozen} but trained in "
            f"expert(s) {trained}, and one parameter holds them, so it cannot freeze one expert alone. Pass "
            "per_expert_parameters=True to give each expert its own parameters (then only an expert's gate "
            "and up projections must agree), or freeze all experts or none before converting")
    return not frozen


def set_requires_grad(module: nn.Module, parts: dict[str, list[tuple[int, torch.Tensor]]]) -> None:
    """Copy the source modules' ``requires_grad`` onto ``module``'s parameters.

    ``parts``: parameter name -> the ``(expert, tensor)`` it was built from. Stacked parameters
    take the flag all experts share; per-expert ones each expert's own.
    """
    for name, pieces in parts.items():
        param = getattr(module, name)
        if isinstance(param, nn.ParameterList):
            for e, p in enumerate(param):
                p.requires_grad_(common_requires_grad([(x, t) for x, t in pieces if x == e], name))
        else:
            param.requires_grad_(common_requires_grad(pieces, name))


def copy_experts_(module: nn.Module, parts: dict[str, list[tuple[int, torch.Tensor]]]) -> None:
    """``from_experts``' last step where every expert gives one tensor per parameter: copy each
    ``(expert, tensor)`` of ``parts`` (parameter name -> pieces) into that expert's slice of
    ``module``'s parameter, then copy ``requires_grad`` (:func:`set_requires_grad`)."""
    with torch.no_grad():
        for name, pieces in parts.items():
            for e, t in pieces:
                expert_data(getattr(module, name), e).copy_(t)
    set_requires_grad(module, parts)


def _convert_layout(module, state_dict, prefix, *_):
    """``load_state_dict`` pre-hook: a state dict of either layout loads into either, the
    stacked ``name [E, ...]`` split into ``name.0`` .. ``name.{E-1}`` or those stacked."""
    for name in module.EXPERT_PARAMETERS:
        param = getattr(module, name, None)
        key = prefix + name
        keys = [f"{key}.{e}" for e in range(module.num_experts)]
        if isinstance(param, nn.ParameterList):
            if key in state_dict and not any(k in state_dict for k in keys):
                for k, t in zip(keys, state_dict.pop(key).unbind(0)):
                    state_dict[k] = t
        elif param is not None and key not in state_dict and all(k in state_dict for k in keys):
            state_dict[key] = torch.stack([state_dict.pop(k) for k in keys])


class ExpertModule(nn.Module):
    """Base of the multiway modules: keeps per-expert parameters in one storage across ``.to()``,
    ``.half()``, ``.cuda()`` (as ``nn.RNNBase`` re-flattens its weights after them), ``deepcopy``
    and unpickling, which give every parameter a storage of its own; and loads state dicts of
    either layout (``EXPERT_PARAMETERS``: the names of the weights and biases)."""

    EXPERT_PARAMETERS: tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.register_load_state_dict_pre_hook(_convert_layout)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._pack_experts()
        return self

    def __setstate__(self, state):
        super().__setstate__(state)
        self._pack_experts()

    def _pack_experts(self) -> None:
        for child in self.children():
            if isinstance(child, nn.ParameterList) and len(child):
                _storage.pack_(list(child))
