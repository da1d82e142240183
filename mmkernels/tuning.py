"""Launch configurations of the Triton kernels: one mechanism for every family.

Every launcher takes an explicit, typed config (a ``NamedTuple`` of its family, such as
``AttnConfig`` or ``MMConfig``). Without one it asks :func:`lookup` for an override set here,
and without an override it uses its family's heuristic table in code::

    from mmkernels import tuning
    tuning.set_config("attention", "fwd", {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8,
                                           "num_stages": 2}, dtype=torch.bfloat16, head_dim=128)
    tuning.set_option("contrastive.forward", "two_pass")
    tuning.load("tuned.json")          # the file ``python -m bench.tune_gpu --save FILE`` writes
    with tuning.scope():               # everything set inside is undone on exit
        ...

Settings made outside any ``scope()`` are process-wide (every thread sees them). A ``scope()``
is context-local: it starts from the settings visible where it is entered, and what is set
inside it is seen only by the thread or asyncio task that entered it, until it exits.

``kinds()`` and ``options()`` list what can be set; ``MMKERNELS_TUNING_FILE`` names a file
loaded before the first launch.
"""
from __future__ import annotations

import contextlib
import json
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from . import _settings
from ._context import ContextStack

_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "float64": torch.float64}


@dataclass(frozen=True)
class KindSpec:
    """A launch kind: its config type (a ``NamedTuple``) and the case keys overrides match on."""

    family: str
    kind: str
    config_type: type
    keys: tuple[str, ...]


@dataclass(frozen=True)
class OptionSpec:
    """A named launch option: its default and a check that returns the value to store."""

    name: str
    default: Any
    check: Callable[[Any], Any]
    doc: str


_KINDS: dict[tuple[str, str], KindSpec] = {}
_OPTIONS: dict[str, OptionSpec] = {}


@dataclass
class _State:
    """Overrides (``(family, kind) -> [(match, config)]``, newest last) and option values."""

    configs: dict[tuple[str, str], list[tuple[dict, Any]]]
    values: dict[str, Any]

    def copy(self) -> "_State":
        return _State({k: list(v) for k, v in self.configs.items()}, dict(self.values))


_PROCESS = _State({}, {})  # what is set outside any scope()
_scopes: ContextStack[_State] = ContextStack("mmkernels_tuning_scope")


def _state() -> _State:
    """The settings this thread / task reads and writes: its innermost scope's, else the process's."""
    return _scopes.top(_PROCESS)


def register_kind(family: str, kind: str, config_type: type, keys: tuple[str, ...]) -> None:
    """Declare a launch kind (called by each family's kernels module at import)."""
    _KINDS[(family, kind)] = KindSpec(family, kind, config_type, tuple(keys))


def register_option(name: str, default: Any, check: Callable[[Any], Any], doc: str) -> None:
    """Declare a named option (called by the module that reads it, at import)."""
    _OPTIONS[name] = OptionSpec(name, default, check, doc)


FAMILIES = ("contrastive", "attention", "cross_attention", "experts")


def _load_family(family: str) -> None:
    """Import a family's kernels so its kinds and options are registered (needs triton)."""
    import importlib
    try:
        importlib.import_module(f"mmkernels.{family}.kernels")
    except ImportError as e:
        raise RuntimeError(f"mmkernels.tuning: the {family} kernels need triton ({e})") from e


def _spec(family: str, kind: str) -> KindSpec:
    if (family, kind) not in _KINDS:
        if family in FAMILIES:
            _load_family(family)
    spec = _KINDS.get((family, kind))
    if spec is None:
        known = sorted(f"{f}/{k}" for f, k in _KINDS)
        raise ValueError(f"unknown launch kind {family}/{kind}; known: {', '.join(known)}")
    return spec


def _option_spec(name: str) -> OptionSpec:
    if name not in _OPTIONS:
        family = name.split(".", 1)[0]
        if family in FAMILIES:
            _load_family(family)
    if name not in _OPTIONS:
        raise ValueError(f"unknown tuning option {name!r}; known: {', '.join(sorted(_OPTIONS))}")
    return _OPTIONS[name]


def _match_value(key: str, value: Any) -> Any:
    if isinstance(value, str) and value in _DTYPE_NAMES and key == "dtype":
        return _DTYPE_NAMES[value]
    return value


def _as_config(spec: KindSpec, config: Any):
    fields = spec.config_type._fields
    if isinstance(config, dict):
        unknown = set(config) - set(fields)
        if unknown:
            raise ValueError(f"{spec.family}/{spec.kind}: unknown config fields {sorted(unknown)}; "
                             f"fields: {fields}")
        config = spec.config_type(**config)
    elif isinstance(config, (tuple, list)) and not isinstance(config, spec.config_type):
        config = spec.config_type(*config)
    elif not isinstance(config, spec.config_type):
        raise TypeError(f"{spec.family}/{spec.kind}: a config is a {spec.config_type.__name__}, a dict "
                        f"or a tuple of {fields}, got {type(config).__name__}")
    _check_field_types(spec, config)
    return config


def _check_field_types(spec: KindSpec, config) -> None:
    """Raise ``TypeError`` unless every field holds its annotated type (bool and int are told apart)."""
    hints = typing.get_type_hints(spec.config_type)
    for name in spec.config_type._fields:
        want, value = hints.get(name), getattr(config, name)
        if not isinstance(want, type):
            continue
        ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
        if not ok:
            raise TypeError(f"{spec.family}/{spec.kind}: config field {name} must be "
                            f"{want.__name__}, got {value!r}")


def set_config(family: str, kind: str, config: Any, **match: Any) -> None:
    """Use ``config`` for launches of ``family``/``kind`` whose case matches ``match``.

    ``config`` is the kind's ``NamedTuple``, a dict of its fields or a tuple in field order;
    ``match`` keys are among the kind's case keys (``kinds()``), dtypes as ``torch.dtype`` or
    their names. No ``match``: every launch of the kind.
    """
    _set_config(_state(), family, kind, config, match)


def _set_config(state: _State, family: str, kind: str, config: Any, match: dict) -> None:
    spec = _spec(family, kind)
    bad = set(match) - set(spec.keys)
    if bad:
        raise ValueError(f"{family}/{kind} matches on {spec.keys}, not {sorted(bad)}")
    match = {k: _match_value(k, v) for k, v in match.items()}
    entries = state.configs.setdefault((family, kind), [])
    entries[:] = [e for e in entries if e[0] != match]
    entries.append((match, _as_config(spec, config)))


def lookup(family: str, kind: str, **case: Any):
    """The override for this launch (``None``: use the heuristic). Called by the launchers.

    An override matches a launch when each of its keys equals the launch's value; the one with
    most keys wins, the newest among equals."""
    if not _environment_loaded:
        _load_environment_file()
    entries = _state().configs.get((family, kind))
    if not entries:
        return None
    best, best_n = None, -1
    for match, config in entries:
        if len(match) >= best_n and all(case.get(k) == v for k, v in match.items()):
            best, best_n = config, len(match)
    return best


def set_option(name: str, value: Any) -> None:
    """Set a named option (``options()`` lists them); ``None`` restores its default."""
    _set_option(_state(), name, value)


def _set_option(state: _State, name: str, value: Any) -> None:
    spec = _option_spec(name)
    if value is None:
        state.values.pop(name, None)
    else:
        state.values[name] = spec.check(value)


def option(name: str) -> Any:
    """The value of a named option (its default unless set)."""
    if not _environment_loaded:
        _load_environment_file()
    spec = _OPTIONS.get(name) or _option_spec(name)
    return _state().values.get(name, spec.default)


def _load_all() -> None:
    """Register every family's kinds and options (imports the kernels; needs triton)."""
    for family in FAMILIES:
        _load_family(family)


def kinds() -> dict[str, dict]:
    """Every launch kind: ``"family/kind" -> {"fields": ..., "keys": ...}`` (needs triton)."""
    _load_all()
    return {f"{s.family}/{s.kind}": {"fields": s.config_type._fields, "keys": s.keys}
            for s in _KINDS.values()}


def options() -> dict[str, dict]:
    """Every option: ``name -> {"default": ..., "value": ..., "doc": ...}`` (needs triton)."""
    _load_all()
    return {n: {"default": s.default, "value": _state().values.get(n, s.default), "doc": s.doc}
            for n, s in _OPTIONS.items()}


def reset() -> None:
    """Drop every override and option value (those of the innermost scope, inside one)."""
    state = _state()
    state.configs.clear()
    state.values.clear()


@contextlib.contextmanager
def scope() -> Iterator[None]:
    """Undo, on exit, every override and option set inside the block.

    The block starts from the settings visible here; what it sets is private to this thread /
    asyncio task (other threads keep reading the process-wide settings)."""
    if not _environment_loaded:  # else a first lookup inside would load it and the exit drop it
        _load_environment_file()
    with _scopes.pushed(_state().copy()):
        yield


def _json_value(v: Any) -> Any:
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    return v


def to_dict() -> dict:
    """The overrides and options set now, in the form :func:`save` writes."""
    configs = [{"family": f, "kind": k, "match": {mk: _json_value(mv) for mk, mv in match.items()},
                "config": config._asdict()}
               for (f, k), entries in _state().configs.items() for match, config in entries]
    return {"version": 1, "configs": configs, "options": dict(_state().values)}


def save(path: str) -> None:
    """Write the overrides and options set now to a JSON file :func:`load` reads."""
    with open(path, "w") as f:
        json.dump(to_dict(), f, indent=1)
        f.write("\n")


def load(path_or_dict: str | dict) -> None:
    """Apply the overrides and options of a file written by :func:`save` (or its dict)."""
    _load(_state(), path_or_dict)


def _load(state: _State, path_or_dict: str | dict) -> None:
    if isinstance(path_or_dict, dict):
        data = path_or_dict
    else:
        with open(path_or_dict) as f:
            data = json.load(f)
    if data.get("version") != 1:
        raise ValueError(f"mmkernels.tuning: unsupported file version {data.get('version')!r}")
    for entry in data.get("configs", []):
        _set_config(state, entry["family"], entry["kind"], entry["config"], entry.get("match", {}))
    for name, value in data.get("options", {}).items():
        _set_option(state, name, value)


_environment_loaded = False


def _load_environment_file() -> None:
    """Load the file ``MMKERNELS_TUNING_FILE`` names, once, at the first lookup, into the
    process-wide settings (whichever thread or scope looks up first; two threads racing here
    load the same file twice, which sets the same values)."""
    global _environment_loaded
    _environment_loaded = True  # first: loading imports families, which may look up options
    path = _settings.tuning_file()
    if path:
        _load(_PROCESS, path)
