"""Drop-in use of mmkernels' routed expert modules inside torchscale models (BEiT-3, VLMo in
torchscale): :func:`patch_multiway` (its docstring says what it replaces, what it leaves and how
the result differs from torchscale) and :class:`MultiwayAdapter`. torchscale is never imported.
"""
from __future__ import annotations

import numbers
import warnings

import torch
from torch import nn

from ..experts import MultiwayFFN, MultiwayLayerNorm, MultiwayLinear
from .expert_layouts import is_layer_norm

#: torchscale's names of the two experts, in expert order (A = expert 0, B = expert 1)
EXPERTS = ("A", "B")

#: module kind -> ((name in the fused module, name in each torchscale expert), ...), in the
#: order torchscale's modules list their parameters (so the state-dict key order matches)
KEY_MAPS: dict[str, tuple[tuple[str, str], ...]] = {
    "linear": (("weight", "weight"), ("bias", "bias")),
    "layer_norm": (("weight", "weight"), ("bias", "bias")),
    "ffn": (("w_in", "fc1.weight"), ("b_in", "fc1.bias"), ("w_out", "fc2.weight"), ("b_out", "fc2.bias"),
            ("ffn_layernorm.weight", "ffn_layernorm.weight"), ("ffn_layernorm.bias", "ffn_layernorm.bias")),
}

_FUSED_CLASSES = {"linear": MultiwayLinear, "layer_norm": MultiwayLayerNorm, "ffn": MultiwayFFN}
_FUSED = "fused"  # the adapter's attribute holding the fused module


def _is_multiway(m) -> bool:
    return isinstance(m, nn.Module) and all(hasattr(m, a) for a in ("A", "B", "split_position", "dim"))


def _is_ffn(m) -> bool:
    return isinstance(getattr(m, "fc1", None), nn.Linear) and isinstance(getattr(m, "fc2", None), nn.Linear)


def _kind(m) -> str | None:
    """The module kind (a key of :data:`KEY_MAPS`) of a torchscale ``MultiwayNetwork``, or None
    when it is not one or its experts are not a supported pair."""
    if not _is_multiway(m):
        return None
    a, b = m.A, m.B
    if isinstance(a, nn.Linear) and isinstance(b, nn.Linear):
        kind = "linear"
    elif is_layer_norm(a) and is_layer_norm(b):
        kind = "layer_norm"
    elif _is_ffn(a) and _is_ffn(b):
        kind = "ffn"
    else:
        return None
    names = {ts for _, ts in KEY_MAPS[kind]}
    if any(set(e.state_dict().keys()) - names for e in (a, b)):
        return None  # state the fused module would not hold (e.g. an extra submodule with parameters)
    return kind


class MultiwayAdapter(nn.Module):
    """A torchscale ``MultiwayNetwork`` running on one fused mmkernels module.

    Attributes:
        fused: the :class:`mmkernels.MultiwayLinear` / :class:`mmkernels.MultiwayLayerNorm` /
            :class:`mmkernels.MultiwayFFN` holding A as expert 0 and B as expert 1.
        kind: ``"linear"``, ``"layer_norm"`` or ``"ffn"`` (selects the state-dict key map).
        dim: the dimension split by position (torchscale's ``dim``, 1 for ``[B, S, H]``).
        split_position: as torchscale's: ``-1`` every position on A, ``0`` every position on B,
            ``p > 0`` positions ``< p`` on A and the rest on B. Set it directly or with
            ``model.apply(set_split_position(p))``.

    ``forward(x [..., H_in]) -> [..., H_out]`` (``H_out = H_in`` for LayerNorms and FFNs).
    ``x [B, S, H]`` with ``dim = 1`` takes the int split fast path (no ids tensor, no sort),
    as does every shape when all tokens go to one expert (``split_position`` -1 or 0); other
    shapes and dims route by an int64 ids tensor of shape ``x.shape[:-1]`` built on ``x``'s
    device without a host synchronisation. A split along the last (feature) dimension is
    refused. With per-expert parameters, an expert that receives no token gets no gradient
    (``.grad`` stays ``None``, as in torchscale, where ``A(x)`` or ``B(x)`` alone runs), so
    AdamW neither decays nor moves it.

    ``state_dict()`` / ``load_state_dict()`` use torchscale's keys (``A.weight``, ``B.fc1.bias``,
    ...), whatever the fused module's layout (stacked or ``per_expert_parameters``).
    """

    def __init__(self, fused: nn.Module, kind: str, dim: int = 1, split_position: int = -1):
        super().__init__()
        if kind not in KEY_MAPS:
            raise ValueError(f"kind must be one of {sorted(KEY_MAPS)}, got {kind!r}")
        if not isinstance(fused, _FUSED_CLASSES[kind]) or getattr(fused, "num_experts", None) != 2:
            raise TypeError(f"a {kind!r} adapter holds a two-expert {_FUSED_CLASSES[kind].__name__}, "
                            f"got {type(fused).__name__}")
        self.kind = kind
        self.dim = int(dim)
        self.split_position = split_position
        setattr(self, _FUSED, fused)
        self.register_state_dict_post_hook(_to_torchscale_keys)
        self.register_load_state_dict_pre_hook(_from_torchscale_keys)

    @classmethod
    def from_multiway(cls, module: nn.Module, per_expert_parameters: bool = True) -> "MultiwayAdapter":
        """The adapter of one torchscale ``MultiwayNetwork`` (exact copies of ``A`` and ``B``,
        ``requires_grad`` included; ``dim``, ``split_position`` and train/eval mode copied;
        ``per_expert_parameters`` as in :func:`patch_multiway`).
        Raises TypeError if it is not one with a supported pair of experts."""
        kind = _kind(module)
        if kind is None:
            raise TypeError(f"{type(module).__name__} is not a torchscale MultiwayNetwork around a pair of "
                            "nn.Linear, LayerNorm or FeedForwardNetwork (fc1/fc2) experts")
        if kind == "ffn":
            for e in (module.A, module.B):
                if any(isinstance(d, nn.Dropout) and d.p > 0 for d in e.modules()):
                    warnings.warn("patching a torchscale FFN with dropout > 0: the fused MultiwayFFN has no "
                                  "dropout inside the FFN (it computes the eval-mode FFN)", stacklevel=3)
                    break
        fused = _FUSED_CLASSES[kind].from_experts([module.A, module.B], per_expert_parameters=per_expert_parameters)
        adapter = cls(fused, kind, module.dim, module.split_position)
        adapter.train(module.training)
        return adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.split_position
        if isinstance(p, bool) or not isinstance(p, numbers.Integral):
            raise TypeError(f"split_position must be an int, got {type(p).__name__}")
        p = int(p)
        nd = x.dim()
        d = self.dim + nd if self.dim < 0 else self.dim
        if not 0 <= d < nd:
            raise ValueError(f"MultiwayAdapter: dim={self.dim} is out of range for x of shape {tuple(x.shape)}")
        n = x.shape[d]
        if not -1 <= p <= n:
            raise ValueError(f"split_position must be -1 (all on A), 0 (all on B) or a position in [1, {n}] "
                             f"(the size of dim {self.dim}), got {p}")
        if p == -1:
            p = n
        if d == 1 and nd == 3:
            return self.fused(x, p)
        if d == nd - 1:
            raise ValueError(f"MultiwayAdapter: dim={self.dim} is the feature (last) dimension of x of shape "
                             f"{tuple(x.shape)}; experts are chosen along a token dimension, not the last one")
        if p in (0, n):
            # every token on one expert: a split position of the tokens as one sequence, so the
            # other expert gets no gradient (as torchscale's A(x) or B(x) alone)
            y = self.fused(x.reshape(1, -1, x.shape[-1]), 0 if p == 0 else x[..., 0].numel())
            return y.reshape(*x.shape[:-1], y.shape[-1])
        shape = [1] * (nd - 1)
        shape[d] = n
        ids = (torch.arange(n, device=x.device) >= p).to(torch.int64).view(shape).expand(x.shape[:-1])
        return self.fused(x, ids.contiguous())

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, dim={self.dim}, split_position={self.split_position}"


def _to_torchscale_keys(module: MultiwayAdapter, state_dict, prefix: str, local_metadata) -> None:
    """``state_dict`` post-hook: the fused module's entries (``fused.w_in [2, ...]``, or
    ``fused.w_in.0`` and ``fused.w_in.1`` with per-expert parameters) become torchscale's
    (``A.fc1.weight``, ``B.fc1.weight``), A's entries first as torchscale lists them."""
    per_expert: list[list[tuple[str, torch.Tensor]]] = [[] for _ in EXPERTS]
    for fused_name, ts_name in KEY_MAPS[module.kind]:
        key = f"{prefix}{_FUSED}.{fused_name}"
        keys = [f"{key}.{e}" for e in range(len(EXPERTS))]
        if key in state_dict:
            stacked = state_dict.pop(key)
            values = [stacked[e] for e in range(len(EXPERTS))]
        elif all(k in state_dict for k in keys):
            values = [state_dict.pop(k) for k in keys]
        else:
            continue  # no such parameter (no bias, no ffn_layernorm)
        for e, v in enumerate(values):
            per_expert[e].append((f"{prefix}{EXPERTS[e]}.{ts_name}", v))
    for entries in per_expert:
        for k, v in entries:
            state_dict[k] = v


def _from_torchscale_keys(module: MultiwayAdapter, state_dict, prefix: str, local_metadata, strict, missing_keys,
                          unexpected_keys, error_msgs) -> None:
    """``load_state_dict`` pre-hook: torchscale's ``A.<name>`` and ``B.<name>`` become the fused
    module's stacked ``fused.<name> [2, ...]`` (which the fused module's own hook splits into
    per-expert entries where it holds them so). Entries already in the fused layout are left
    alone; a pair with one side missing stays as it is (strict loading reports it)."""
    for fused_name, ts_name in KEY_MAPS[module.kind]:
        keys = [f"{prefix}{way}.{ts_name}" for way in EXPERTS]
        if not all(k in state_dict for k in keys):
            continue
        a, b = (state_dict[k] for k in keys)
        if a.shape != b.shape:
            error_msgs.append(f"size mismatch for {keys[0]} and {keys[1]}: torchscale's experts A and B have "
                              f"shapes {tuple(a.shape)} and {tuple(b.shape)}, but the fused module holds one "
                              "shape for both")
            continue
        for k in keys:
            del state_dict[k]
        state_dict[f"{prefix}{_FUSED}.{fused_name}"] = torch.stack([a, b])


def patch_multiway(model: nn.Module, per_expert_parameters: bool = True) -> int:
    """Replace, in place, every torchscale ``MultiwayNetwork`` in ``model`` around a pair of
    ``nn.Linear`` s, LayerNorms or ``FeedForwardNetwork`` s by a :class:`MultiwayAdapter`;
    return how many were replaced.

    ``per_expert_parameters`` (default ``True``): each expert keeps parameters of its own, of the
    shapes torchscale's had (``fused.b_in.0 [F]``, ``fused.weight.1 [H]``, ...; views of one
    storage, read by the kernels without a copy). Optimiser groups chosen by shape keep working
    (BEiT-3's rule: no weight decay for 1-D parameters, i.e. biases and LayerNorm scales), and
    one expert can stay frozen while the other trains (VLMo/BEiT-3 stages that train one
    modality's experts). ``False`` stacks each weight into one ``[2, ...]`` parameter: biases and
    LayerNorm scales become 2-D (a shape rule would then decay them), and a pair with A frozen
    and B trained is refused. Idempotent: a second call finds nothing more to replace and returns 0.
    A ``MultiwayNetwork`` reachable under several names (shared) is replaced once, everywhere.
    All replacements are built before any is installed, so an error leaves ``model`` unchanged.
    The model keeps its device, dtypes and train/eval mode; the state dict keeps its keys.

    A ``MultiwayNetwork`` is found by duck typing (a module with ``A``, ``B``, ``split_position``
    and ``dim`` attributes) and replaced when its two experts are

    * both ``nn.Linear`` (attention ``q_proj``/``k_proj``/``v_proj``/``out_proj``) ->
      :class:`mmkernels.MultiwayLinear`,
    * both LayerNorms (``nn.LayerNorm`` or apex ``FusedLayerNorm``: ``self_attn_layer_norm``,
      ``final_layer_norm``, ``inner_attn_ln``, the encoder's ``layer_norm``) ->
      :class:`mmkernels.MultiwayLayerNorm`,
    * both ``FeedForwardNetwork`` s (``fc1``/``fc2`` ``nn.Linear`` s, ``activation_fn``, optional
      ``ffn_layernorm``: torchscale's default ``subln=True``) -> :class:`mmkernels.MultiwayFFN`,

    by a :class:`MultiwayAdapter` holding the fused module, with exact copies of A's (expert 0) and
    B's (expert 1) weights and their ``requires_grad``. Each such layer then runs as one routed kernel
    over all tokens (no ``torch.split``, no ``torch.cat``, no host synchronisation).

    Not patched (left as they are): a ``MultiwayNetwork`` around anything else (torchscale's
    ``MutliwayEmbedding`` of positional embeddings, a custom module), experts of different kinds, an
    FFN expert that holds state other than ``fc1``/``fc2``/``ffn_layernorm``, and the model itself
    if it is a ``MultiwayNetwork`` (an error: wrap it, or use :meth:`MultiwayAdapter.from_multiway`).
    An FFN pair that looks right but that ``MultiwayFFN.from_experts`` refuses (an unknown
    activation; A frozen and B trained with ``per_expert_parameters=False``) raises, and then
    nothing in the model is changed.

    Differences from torchscale, by design:

    * The dropout inside an FFN (``activation_dropout_module``, ``dropout_module``) is dropped, as
      ``MultiwayFFN.from_experts`` documents: the patched FFN computes what the original does in
      eval mode (or with dropout 0, BEiT-3's pretraining and fine-tuning default). A warning is
      issued when an FFN with non-zero dropout is patched. Dropout outside the multiway modules
      (attention dropout, the layers' ``dropout_module``, drop path) is untouched.
    * The patch is one-way: there is no unpatch. Code that reads ``.A``/``.B`` of a patched module
      (or ``q_proj.weight``) no longer finds them; parameters are named ``fused.w_in``,
      ``fused.weight``, ... in ``named_parameters()`` (``fused.w_in.0`` ... with the default
      per-expert parameters: name-based optimiser groups see those names; shape-based ones work).
    * Checkpoints keep torchscale's keys: ``state_dict()`` of a patched model has exactly the keys
      of the unpatched one (``...q_proj.A.weight``, ``...ffn.B.fc1.bias``,
      ``...ffn.A.ffn_layernorm.weight``), in the same order and with equal values (views of the
      fused stacks, no copy; safetensors' ``save_file`` refuses tensors sharing storage, so clone
      them or use ``torch.save``), and ``load_state_dict`` takes a torchscale checkpoint with
      ``strict=True``. State-dict hooks on each adapter convert between the keys (:data:`KEY_MAPS`).

    Routing: torchscale sets ``split_position`` before each forward with
    ``model.apply(set_split_position(p))``, which sets it on every module having that attribute;
    the adapters have it, so that keeps working. Positions ``< p`` along ``dim`` go to A, the rest
    to B; ``p = -1`` sends every position to A, ``p = 0`` every position to B.
    """
    if _kind(model) is not None:
        raise ValueError("patch_multiway patches the MultiwayNetworks inside a model, and this model is one: "
                         "use MultiwayAdapter.from_multiway(module) to convert it")
    modules = list(model.modules())
    adapters: dict[int, MultiwayAdapter] = {}
    for m in modules:
        if id(m) not in adapters and _kind(m) is not None:
            adapters[id(m)] = MultiwayAdapter.from_multiway(m, per_expert_parameters=per_expert_parameters)
    for parent in modules:
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in adapters:
                parent._modules[name] = adapters[id(child)]
    return len(adapters)


__all__ = ["KEY_MAPS", "MultiwayAdapter", "patch_multiway"]
