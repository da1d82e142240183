"""The ``models`` family: one training step of each reference model of ``mmkernels.models``
(CLIP, ALBEF, BLIP-2 stage 1, VLMo, CogVLM, LLaVA), its plain PyTorch form against its mmkernels
form.

Op ``train_<name>``, mode ``fwd+bwd``: the model's training loss (``model(**batch)``) and its
backward, gradients for every trainable parameter (the optimizer's update is the same for both
forms and is not timed). Shape keys: ``batch`` and the ``Config`` fields the size table sets.

Each model's sizes live in ``bench/cases/train_<name>.py``:

* ``SIZES = {"cuda": {"full": [...], "quick": [...]}, "cpu": {"full": [...], "quick": [...]},
  "pytest": [...]}``, each entry a dict ``batch=B`` plus ``Config`` fields;
* optionally ``DTYPES = {"cuda": (...), "cpu": (...), "pytest": (...)}`` (default bf16 on the GPU,
  fp32 on the CPU) and ``NOTE``, one line on what the step runs.

Providers share the case's inputs: the parameters and buffers of one model (built in the
``plain`` form from the case's seed, ``param:<name>`` / ``buffer:<name>``) and the batch
(``batch:<key>``); each form is built once on the meta device and run on those tensors with
``torch.func.functional_call``. So both forms train the same weights, the harness clears their
gradients between repeats, and the memory figures hold only what a step allocates.

* ``mmkernels``: ``Model(config, impl="mmkernels")`` (backend auto);
* ``reference``: ``Model(config, impl="plain")``, the model as its paper's code writes it.
"""
from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch

from bench.harness import Case, Provider
from mmkernels.models import common

FAMILY = "models"
MODELS = common.REFERENCE_MODELS
DEFAULT_DTYPES = {"cuda": ("bfloat16",), "cpu": ("float32",), "pytest": ("float32",)}
P_PARAM, P_BUFFER, P_BATCH = "param:", "buffer:", "batch:"


def op_name(model: str) -> str:
    return f"train_{model}"


def model_of(case: Case) -> str:
    return case.op[len("train_"):]


def sizes_module(model: str):
    return importlib.import_module(f"bench.cases.train_{model}")


def config_of(case: Case):
    module = common.load(model_of(case))
    return module.Config(**{k: v for k, v in case.shape.items() if k != "batch"})


class ModelContext:
    """The non-tensor input of a case: the reference model's name and config, and each form built
    on the meta device by its first (untimed) call, cached."""

    def __init__(self, model: str, config):
        self.name = model
        self.config = config
        self.forms: dict = {}

    def form(self, impl: str) -> torch.nn.Module:
        m = self.forms.get(impl)
        if m is None:
            with torch.device("meta"):
                m = self.forms[impl] = common.load(self.name).Model(self.config, impl=impl)
            m.train()
        return m


def make_inputs(case: Case) -> dict:
    name, config = model_of(case), config_of(case)
    module = common.load(name)
    model = common.build(name, config, "plain", seed=case.seed, device=case.device, dtype=case.torch_dtype)
    inputs: dict = {P_PARAM + n: p.detach().requires_grad_(p.requires_grad) for n, p in model.named_parameters()}
    inputs.update({P_BUFFER + n: b.detach() for n, b in model.named_buffers()})
    batch = module.synthetic_batch(config, case.shape["batch"], seed=case.seed, device=case.device,
                                   dtype=case.torch_dtype)
    inputs.update({P_BATCH + k: v for k, v in batch.items()})
    inputs["ctx"] = ModelContext(name, config)
    return inputs


def split_inputs(inputs: dict) -> tuple[dict, dict]:
    """``(parameters and buffers by name, batch)`` of a case's inputs."""
    state, batch = {}, {}
    for k, v in inputs.items():
        for prefix, into in ((P_PARAM, state), (P_BUFFER, state), (P_BATCH, batch)):
            if k.startswith(prefix):
                into[k[len(prefix):]] = v
    return state, batch


def train_step(impl: str, ctx: ModelContext, **inputs):
    """The training loss of the ``impl`` form on the case's tensors."""
    state, batch = split_inputs(inputs)
    return torch.func.functional_call(ctx.form(impl), state, args=(), kwargs=batch, strict=True)


def check_mmkernels(case: Case) -> Optional[str]:
    if case.device.startswith("cuda"):
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
    return None


def providers() -> tuple:
    return (
        Provider("mmkernels", functools.partial(train_step, "mmkernels"), check_mmkernels,
                 note="Model(impl='mmkernels'), backend auto"),
        Provider("reference", functools.partial(train_step, "plain"),
                 note="Model(impl='plain'): the model as its paper's code writes it"),
    )


def _entries(model: str, device: str, profile: str) -> tuple[list, tuple]:
    try:
        mod = sizes_module(model)
    except ModuleNotFoundError as exc:
        if exc.name != f"bench.cases.train_{model}":
            raise
        return [], ()          # not written yet: tests/bench/test_models_cases.py fails on it
    dtypes = getattr(mod, "DTYPES", DEFAULT_DTYPES)
    if profile == "pytest":
        return mod.SIZES["pytest"], dtypes.get("pytest", DEFAULT_DTYPES["pytest"])
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return mod.SIZES[kind][profile], dtypes.get(kind, DEFAULT_DTYPES[kind])


def _with_overrides(entry: dict, overrides: dict) -> list:
    """``entry`` once per combination of the override values of the keys it has."""
    shapes = [dict(entry)]
    for k, values in overrides.items():
        if k in entry:
            shapes = [{**s, k: v} for s in shapes for v in values]
    return shapes


def cases(device: str, profile: str, overrides: Optional[dict] = None) -> list:
    out = []
    for model in MODELS:
        entries, dtypes = _entries(model, device, profile)
        for entry in entries:
            for shape in _with_overrides(entry, overrides or {}):
                for dtype in dtypes:
                        out.append(Case(family=FAMILY, op=op_name(model), shape=shape, dtype=dtype, device=device,
                                    make_inputs=make_inputs, providers=providers(), mode="fwd+bwd", x="batch",
                                    note=getattr(sizes_module(model), "NOTE", "")))
    return out


def notes(device: str, profile: str) -> list:
    lines = ["models: one training step (loss forward + backward, every trainable parameter) of each "
             "reference model; `reference` is the plain PyTorch form, `mmkernels` the same weights on "
             "mmkernels' ops. The optimizer step is the same for both and not timed."]
    for model in MODELS:
        if not _entries(model, device, profile)[0]:
            continue
        note = getattr(sizes_module(model), "NOTE", "")
        if note:
            lines.append(f"train_{model}: {note}")
    return lines
