"""SigLIP family: the sigmoid loss of SigLIP (Zhai et al. 2023), one process.

Op ``siglip_loss``: forward + backward of

    loss = -sum_ij log sigmoid(z_ij * (logit_scale * img_i . txt_j + logit_bias)) / N,
    z = 2 * eye(N) - 1,

with gradients for both feature matrices, ``logit_scale`` and ``logit_bias`` (0-dim float32
leaves at SigLIP's initial values: scale 10, bias -10). Shape keys ``N`` (images = texts) and
``D``.

Providers:

* ``mmkernels``: ``mmkernels.siglip_loss(img, txt, logit_scale, logit_bias)`` (backend auto), and
  ``mmkernels:kernel`` / ``mmkernels:blockwise`` / ``mmkernels:materialized``: the same call with
  the path forced (dispatch family ``contrastive``, op ``siglip_loss``).
* ``open_clip``: ``SigLipLoss()`` from open_clip's ``loss`` module
  (``mmkernels.testing.peers.open_clip_loss``, loaded without torchvision), world size 1.
* ``chunked``: a chunked SigLIP loss of the installed open_clip, found by name (a callable of its
  ``loss`` module whose name has ``chunk`` and ``sig``); added only where one exists (open_clip
  3.3.0 has none).
* ``reference``: the formula above in eager PyTorch (materialises N x N logits, as open_clip does).

The materialising providers are skipped where their N x N matrices would not fit the device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
import torch.nn.functional as F

from bench.cases import FORCED_PATHS, forced_call, mm
from bench.cases.common import elem_size, missing
from bench.cases.contrastive import _unit_rows
from bench.harness import BASELINE, Case, Provider

FAMILY = "siglip"
OP = "siglip_loss"
LOGIT_SCALE = 10.0  # SigLIP's initial exp(t') = 10 and bias b = -10, learnable 0-dim tensors
LOGIT_BIAS = -10.0
#: the paths of the SigLIP unit that ``mmkernels:<path>`` providers force, beside ``kernel``
#: (when ``bench.cases.FORCED_PATHS`` names the op, ``collect`` adds them instead)
PATHS = ("blockwise", "materialized")

# Shapes and dtypes per (device kind, profile). Target: N = 32768, D = 768 (SigLIP's batch of
# 32k on one process), bf16.
GPU_SIZES = {
    "full": {"N": [1024, 4096, 16384, 32768], "D": [768]},
    "quick": {"N": [32768], "D": [768]},
    "pytest": {"N": [256, 1024], "D": [256]},
}
CPU_SIZES = {
    "full": {"N": [1024, 4096, 8192], "D": [768]},
    "quick": {"N": [1024, 4096], "D": [768]},
    "pytest": {"N": [128, 512], "D": [64]},
}
GPU_DTYPES = {"full": ("bfloat16", "float32"), "quick": ("bfloat16", "float32"), "pytest": ("bfloat16", "float32")}
CPU_DTYPES = {"full": ("float32", "bfloat16"), "quick": ("float32", "bfloat16"), "pytest": ("float32",)}


# --------------------------------------------------------------------------
# Forced paths (shared with the distributed CLIP cases)
# --------------------------------------------------------------------------


def with_paths(case: Case, paths: tuple, estimates: Optional[dict] = None) -> Case:
    """``case`` with ``mmkernels:kernel`` and ``mmkernels:<path>`` providers after ``mmkernels``
    (its function under ``mmkernels.use_path``), as ``bench.cases.with_forced_paths`` builds them
    for the ops of ``FORCED_PATHS``; unchanged when ``FORCED_PATHS`` names the op (``collect``
    adds them then). ``estimates`` maps a path to its own memory estimate (default: the base's)."""
    names = [p.name for p in case.providers]
    if case.op in FORCED_PATHS or BASELINE not in names:
        return case
    i = names.index(BASELINE)
    base = case.providers[i]
    forced = tuple(
        Provider(f"{BASELINE}:{path}", functools.partial(forced_call, base.fn, path), base.check,
                 (estimates or {}).get(path, base.mem_estimate), note=f"mmkernels with the {path} path forced")
        for path in ("kernel", *paths))
    return dataclasses.replace(case, providers=case.providers[:i + 1] + forced + case.providers[i + 1:])


def grid(table: dict, profile: str, overrides: dict) -> Optional[dict]:
    """The profile's shape lists with ``overrides`` (``--size``) in place of the keys they name."""
    if profile not in table:
        return None
    return {k: list(overrides.get(k) or v) for k, v in table[profile].items()}


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def make_inputs(case: Case) -> dict:
    N, D = case.shape["N"], case.shape["D"]
    g = torch.Generator(device=case.device).manual_seed(case.seed)
    img = _unit_rows(N, D, g, case.device)
    txt = _unit_rows(N, D, g, case.device, base=img)  # positives correlated (cosine ~0.7)
    dt = case.torch_dtype
    return {
        "image_features": img.to(dt).requires_grad_(),
        "text_features": txt.to(dt).requires_grad_(),
        "logit_scale": torch.tensor(LOGIT_SCALE, device=case.device, dtype=torch.float32, requires_grad=True),
        "logit_bias": torch.tensor(LOGIT_BIAS, device=case.device, dtype=torch.float32, requires_grad=True),
    }


# --------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------


def siglip_reference(image_features, text_features, logit_scale, logit_bias):
    """The plain formula: N x N logits, z = 2 * eye - 1, -logsigmoid(z * logits).sum() / N."""
    n = image_features.shape[0]
    z = 2 * torch.eye(n, device=image_features.device, dtype=image_features.dtype) - 1
    logits = logit_scale * image_features @ text_features.T + logit_bias
    return -F.logsigmoid(z * logits).sum() / n


def siglip_mmkernels(image_features, text_features, logit_scale, logit_bias):
    import mmkernels

    return mmkernels.siglip_loss(image_features, text_features, logit_scale, logit_bias)


_PEERS: dict = {}


def _open_clip_loss():
    from mmkernels.testing.peers import open_clip_loss

    return open_clip_loss()


def siglip_open_clip(image_features, text_features, logit_scale, logit_bias):
    if "siglip" not in _PEERS:
        _PEERS["siglip"] = _open_clip_loss().SigLipLoss()
    return _PEERS["siglip"](image_features, text_features, logit_scale, logit_bias)


def chunked_name() -> Optional[str]:
    """The name of a chunked SigLIP loss in the installed open_clip's ``loss`` module (a callable
    whose name has ``chunk`` and ``sig``, any case), or None (open_clip 3.3.0 has none)."""
    mod = _open_clip_loss()
    if mod is None:
        return None
    for name in sorted(dir(mod)):
        low = name.lower()
        if "chunk" in low and "sig" in low and callable(getattr(mod, name)):
            return name
    return None


def siglip_chunked(image_features, text_features, logit_scale, logit_bias):
    """open_clip's chunked SigLIP loss: a class is built once with its defaults, a function is
    called as is, both with ``(img, txt, logit_scale, logit_bias)``."""
    if "chunked" not in _PEERS:
        obj = getattr(_open_clip_loss(), chunked_name())
        _PEERS["chunked"] = obj() if isinstance(obj, type) else obj
    return _PEERS["chunked"](image_features, text_features, logit_scale, logit_bias)


def open_clip_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("open_clip_torch")
    except Exception:
        return None


# --------------------------------------------------------------------------
# Availability checks and memory estimates
# --------------------------------------------------------------------------


def check_mmkernels(case: Case) -> Optional[str]:
    return missing("mmkernels", "siglip_loss")


def check_open_clip(case: Case) -> Optional[str]:
    if _open_clip_loss() is None:
        return "open_clip is not installed (mmkernels.testing.peers.open_clip_loss() is None)"
    return None


def check_chunked(case: Case) -> Optional[str]:
    reason = check_open_clip(case)
    if reason is None and chunked_name() is None:
        reason = f"open_clip {open_clip_version()} has no chunked SigLIP loss"
    return reason


def est_dense(case: Case) -> int:
    """Materialised N x N: the product, the scaled and biased logits, the signs z (and eye), z *
    logits, log-sigmoid's output (and its CPU buffer) in forward, their gradients in backward:
    about 8 N x N matrices of the features' dtype at the peak."""
    N, D = case.shape["N"], case.shape["D"]
    e = elem_size(case)
    return 8 * N * N * e + 4 * N * D * e


def est_tiled(case: Case) -> int:
    """O(N*D): fp32 gradient accumulators and per-row sums."""
    N, D = case.shape["N"], case.shape["D"]
    return 2 * 6 * N * D * 4 + 64 * 2 * N


def providers() -> tuple:
    out = [
        Provider("mmkernels", siglip_mmkernels, check=check_mmkernels, mem_estimate=est_tiled,
                 note="mmkernels.siglip_loss(img, txt, logit_scale, logit_bias) (backend auto)"),
        Provider("open_clip", siglip_open_clip, check=check_open_clip, mem_estimate=est_dense,
                 note="open_clip loss.SigLipLoss() (one process; materialises N x N logits and labels)"),
    ]
    if chunked_name() is not None:
        out.append(Provider("chunked", siglip_chunked, check=check_chunked, mem_estimate=est_dense,
                            note=f"open_clip loss.{chunked_name()} (chunked SigLIP)"))
    out.append(Provider("reference", siglip_reference, mem_estimate=est_dense,
                        note="-F.logsigmoid(z * (scale * img @ txt.T + bias)).sum() / N, z = 2*eye - 1 (eager)"))
    return tuple(out)


# --------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------


def siglip_case(N: int, D: int, dtype: str, device: str) -> Case:
    case = Case(
        family=FAMILY,
        op=OP,
        shape={"N": N, "D": D},
        dtype=dtype,
        device=device,
        make_inputs=make_inputs,
        providers=providers(),
        flops=8.0 * N * N * D,
        flops_formula="8*N^2*D",
        x="N",
    )
    return with_paths(case, PATHS, {"materialized": est_dense})


def cases(device: str, profile: str, overrides: Optional[dict] = None) -> list:
    overrides = overrides or {}
    gpu = device.startswith("cuda")
    sizes = grid(GPU_SIZES if gpu else CPU_SIZES, profile, overrides)
    if sizes is None:
        return []
    dtypes = (GPU_DTYPES if gpu else CPU_DTYPES)[profile]
    out = [siglip_case(N, D, dt, device) for dt in dtypes for D in sizes["D"] for N in sizes["N"]]
    probes = [p for dt in dtypes for p in mm.probes_for(device, profile, sorted(set(sizes["D"])), dt)]
    return probes + out


def notes(device: str, profile: str) -> list:
    lines = [
        "siglip: time is forward + backward of the sigmoid loss (gradients for both feature matrices, logit_scale "
        "and logit_bias, 0-dim fp32 at SigLIP's initial 10 and -10); inputs are random unit-norm rows, text "
        "correlated with image; FLOPs 8*N^2*D as for contrastive_loss.",
    ]
    if chunked_name() is None:
        lines.append(f"siglip: open_clip {open_clip_version() or '(not installed)'} has no chunked SigLIP loss, so "
                     "there is no `chunked` peer; open_clip's SigLipLoss materialises the N x N logits.")
    if device.startswith("cuda"):
        lines.append("siglip: GPU run in bf16 and fp32, N up to 32768 at D = 768 (the target: N = 32768, bf16).")
    else:
        c = CPU_SIZES.get(profile, CPU_SIZES["full"])
        lines.append(f"siglip: CPU run, N in {c['N']}, D = {c['D']}; the GPU sizes go to N = 32768.")
    return lines
