"""``python -m mmkernels.env``: the facts to paste into a bug report."""
from __future__ import annotations

import platform
import sys


def report() -> str:
    """A multi-line text: versions, compiled kernels, backends, CUDA device."""
    import torch

    import mmkernels
    from mmkernels import _backend, _ext

    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # not installed, or broken
        triton_version = f"not importable ({type(exc).__name__})"
    try:  # used by mmkernels.integrations.transformers (patch_blip2) only
        import transformers
        transformers_version = transformers.__version__
    except Exception as exc:  # optional
        transformers_version = f"not importable ({type(exc).__name__}; only patch_blip2 needs it)"
    lines = [
        f"mmkernels: {mmkernels.__version__}",
        f"python: {sys.version.split()[0]} ({platform.platform()})",
        f"torch: {torch.__version__} (cuda {torch.version.cuda})",
        f"triton: {triton_version}",
        f"transformers: {transformers_version}",
        "compiled CPU kernels (mmkernels._C): "
        + (f"loaded from {_ext.build_dir()}" if _ext.available() else f"missing: {_ext.LOAD_ERROR}"),
        f"backend asked for: {_backend.current()}  (MMKERNELS_BACKEND / mmkernels.backend)",
        f"TRITON_INTERPRET: {int(_backend.TRITON_INTERPRET)}",
    ]
    for name, where in _backend.available_backends().items():
        lines.append(f"  backend {name}: {where}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda device {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB")
    else:
        lines.append("cuda device: none")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
