"""What every reference model of ``mmkernels.models`` provides, and the helpers they share.

A reference model is one module, ``mmkernels/models/<name>.py`` (``name`` in
:data:`REFERENCE_MODELS`), that defines:

* ``Config``: a dataclass of the model's sizes (every field has a default); ``Config.tiny()``
  returns the smallest config, the one the tests train.
* ``Model(config, impl="mmkernels")``: an ``nn.Module`` in one of two forms, ``impl`` in
  :data:`IMPLS`:

  - ``"plain"``: the model as its paper's code writes it, in plain PyTorch (eager attention with
    a dense mask, split/concatenate or boolean-index routing, materialised losses);
  - ``"mmkernels"``: the same function with every op mmkernels has a kernel for. The ops run on
    the current backend (``with mmkernels.backend("triton"): ...`` forces the Triton kernels).

  Both forms have the same parameters and buffers (names, shapes, initialisation), so their
  state dicts interchange; all tensor state lives in parameters or buffers, never in plain
  attributes (``torch.func.functional_call`` can then run a form on given tensors).
  ``forward(**batch)`` returns the scalar training loss. Draws made in ``forward`` (hard
  negatives) come from torch's default generator in both forms, so a run seeded alike draws alike.
* ``synthetic_batch(config, batch_size, *, seed, device="cpu", dtype=torch.float32) -> dict``:
  a batch of tensors (floating ones in ``dtype``) with structure, so that training lowers the loss.
"""
from __future__ import annotations

import importlib

import torch

#: the two forms of a reference model
IMPLS = ("plain", "mmkernels")

#: the reference models, by module name under ``mmkernels.models``
REFERENCE_MODELS = ("clip", "albef", "blip2", "vlmo", "cogvlm", "llava")


def check_impl(impl: str) -> str:
    """``impl`` if it names a form (:data:`IMPLS`), else a ``ValueError``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def load(name: str):
    """The module of the reference model ``name`` (one of :data:`REFERENCE_MODELS`)."""
    if name not in REFERENCE_MODELS:
        raise KeyError(f"unknown reference model {name!r}; known: {', '.join(REFERENCE_MODELS)}")
    return importlib.import_module(f"mmkernels.models.{name}")


def build(name, config, impl: str = "mmkernels", *, seed: int = 0, device="cpu",
          dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """``Model(config, impl)`` of the reference model ``name`` (or of a module following the
    interface above), initialised from ``seed`` (the same parameters for both forms), on ``device``
    in ``dtype``."""
    module = load(name) if isinstance(name, str) else name
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = module.Model(config, impl=check_impl(impl))
    return model.to(device=device, dtype=dtype)
