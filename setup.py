"""Build of mmkernels and its C++ CPU kernels (mmkernels._C).

Install against the torch that is already installed, so the extension matches it:

    pip install --no-build-isolation -e .          # developer install (builds mmkernels._C)
    MMKERNELS_NO_EXT=1 pip install -e .            # pure-Python install, no C++ extension

The alternative CMake build of the same sources is described in CMakeLists.txt.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    """Return (ext_modules, cmdclass) for mmkernels._C, or nothing if MMKERNELS_NO_EXT=1."""
    if _truthy("MMKERNELS_NO_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "Building mmkernels._C needs torch installed first. Install torch, then run "
            "`pip install --no-build-isolation -e .` (so the extension is built against that "
            "torch), or set MMKERNELS_NO_EXT=1 for a pure-Python install."
        ) from exc

    # setuptools wants source paths relative to setup.py.
    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    if not sources:
        return [], {}

    openmp = torch.backends.openmp.is_available()
    if sys.platform == "win32":
        cxx = ["/O2"] + (["/openmp"] if openmp else [])
        link = []
    elif sys.platform == "darwin":
        # Apple clang has no plain -fopenmp; keep the SIMD pragmas only.
        cxx = ["-O3", "-fopenmp-simd"]
        link = []
    else:
        # ATen's at::parallel_for is inlined from headers: it is only parallel when the
        # extension is compiled with the same threading (OpenMP) as torch itself.
        cxx = ["-O3"] + (["-fopenmp"] if openmp else ["-fopenmp-simd"])
        link = ["-fopenmp"] if openmp else []

    ext = CppExtension(
        name="mmkernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="mmkernels",
    version="0.1.0",
    description="Fused GPU (Triton) and CPU (C++) kernels for vision-language models",
    python_requires=">=3.10",
    packages=find_packages(include=["mmkernels", "mmkernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        # numpy<2.3: Triton 3.6's interpreter breaks with numpy>=2.3.
        # transformers: the Q-Former and patch_blip2 are tested against HF's Blip2QFormerModel
        # (built from a config, nothing downloaded) and benchmarked against it.
        "test": ["pytest", "psutil", "expecttest", "matplotlib", "numpy<2.3", "transformers>=4.45"],
        "bench": ["matplotlib", "psutil", "transformers>=4.45"],
    },
    zip_safe=False,
)
