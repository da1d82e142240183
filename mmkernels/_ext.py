"""The compiled CPU kernels (``mmkernels._C``), built at first use against the running torch
(:func:`build`; ``python -m mmkernels.build`` builds ahead of time).

Cache root: ``$MMKERNELS_CACHE_DIR``, else ``$XDG_CACHE_HOME/mmkernels``, else
``~/.cache/mmkernels``. ``MMKERNELS_NO_EXT=1`` never builds nor loads the kernels (CPU tensors
then use the ``reference`` backend).

Accessing ``mmkernels._ext.C`` loads (and if needed builds) the module; it is ``None`` when
that failed, with the reason in ``LOAD_ERROR``.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator

from . import _settings

MODULE_NAME = "mmkernels._C"
SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
LIBRARY = "_C.so"          # what torch.utils.cpp_extension names the library of extension "_C"
STAMP = "build_info.json"  # written after a successful build: what the library was built from

_lock = threading.Lock()
_state: dict = {"loaded": False, "module": None, "error": None}


def cache_root() -> Path:
    """The folder holding one build directory per (torch, Python, flags, install)."""
    return _settings.cache_root()


def source_files() -> list[Path]:
    """The C++ sources and headers compiled into ``mmkernels._C``, sorted."""
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".cpp", ".h"))


def sources_digest() -> str:
    """sha256 over the names and contents of the C++ sources and headers."""
    h = hashlib.sha256()
    for p in source_files():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def compile_flags(debug: bool = False) -> tuple[list[str], list[str]]:
    """(compiler flags, linker flags) for this platform and torch.

    Release builds are optimised and stripped of debug info (``-s``); ``debug=True`` keeps
    symbols and line tables for a debugger. ATen's ``at::parallel_for`` is inlined from
    headers, so the library is parallel only when compiled with torch's threading (OpenMP).
    """
    import torch

    openmp = torch.backends.openmp.is_available()
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    if sys.platform == "win32":
        return (["/Od", "/Zi"] if debug else ["/O2"]) + (["/openmp"] if openmp else []), []
    if sys.platform == "darwin":  # Apple clang has no plain -fopenmp: keep the SIMD pragmas only
        return opt + ["-fopenmp-simd"], ([] if debug else ["-Wl,-S"])
    cflags = opt + (["-fopenmp"] if openmp else ["-fopenmp-simd"])
    ldflags = (["-fopenmp"] if openmp else []) + ([] if debug else ["-s"])
    return cflags, ldflags


def build_key(debug: bool = False) -> dict:
    """Everything the compiled library depends on besides its sources."""
    import torch

    cflags, ldflags = compile_flags(debug)
    return {
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", ""),
        "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)),
        "python": sys.implementation.cache_tag,
        "machine": platform.machine(),
        "cflags": cflags,
        "ldflags": ldflags,
        "source_dir": str(SOURCE_DIR),
    }


def build_dir(debug: bool = False) -> Path:
    """This install's build directory for the running torch, e.g.
    ``~/.cache/mmkernels/cpu-kernels/torch-2.13.0+cpu-cpython-311-1a2b3c4d5e6f``."""
    key = build_key(debug)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = f"torch-{key['torch']}-{key['python']}-{'debug-' if debug else ''}{digest}"
    return cache_root() / "cpu-kernels" / name


def stamp_matches(directory: Path, digest: str) -> bool:
    try:
        info = json.loads((directory / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return info.get("sources") == digest and (directory / LIBRARY).is_file()


def _import_library(path: Path):
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[MODULE_NAME] = module
    return module


def _ninja_on_path() -> None:
    """Put the ``ninja`` of the ``ninja`` package (a dependency) and of this interpreter's
    environment on PATH: torch's builder calls ``ninja`` by name, and an environment used
    without being activated has neither on PATH."""
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI package: its binary lives in ninja.BIN_DIR
        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([d for d in dirs if d not in path] + path)


def _report_progress(directory: Path, total: int, done: threading.Event, start: float) -> None:
    """Print how many sources are compiled every few seconds until ``done`` is set."""
    last = -1
    while not done.wait(5.0):
        compiled = len(list(directory.glob("*.o")))
        if compiled != last:
            print(f"mmkernels: compiled {compiled}/{total} C++ sources ({time.monotonic() - start:.0f} s)",
                  file=sys.stderr, flush=True)
            last = compiled


def build(*, force: bool = False, debug: bool = False, quiet: bool = False) -> Path:
    """Compile the C++ CPU kernels for the running torch unless an up-to-date build exists.

    Returns the path of the library. Raises ``RuntimeError`` with the compiler's output when
    the build fails. ``force`` rebuilds from scratch; ``debug`` builds with symbols, unoptimised.

    The wheel ships the C++ sources (``mmkernels/csrc``), not a binary: a binary built with
    PyTorch's C++ API works only with the torch it was compiled against, and pip's isolated
    build cannot see the user's torch. So the sources are compiled with
    ``torch.utils.cpp_extension`` (ninja and a C++ compiler), printing progress, into a cache
    directory keyed by everything the binary depends on (:func:`build_key`). A different torch
    gets its own directory and its own build; later processes load the cached library
    directly, without compiler or ninja.
    """
    import torch
    from torch.utils import cpp_extension

    directory = build_dir(debug)
    digest = sources_digest()
    if not force and stamp_matches(directory, digest):
        return directory / LIBRARY
    directory.mkdir(parents=True, exist_ok=True)
    if force:
        for p in directory.glob("*.o"):
            p.unlink()
    sources = [p for p in source_files() if p.suffix == ".cpp"]
    start = time.monotonic()
    if not quiet:
        print(f"mmkernels: compiling the C++ CPU kernels ({len(sources)} sources) for torch "
              f"{torch.__version__} into {directory}; this happens once per torch version and "
              "takes a few minutes on 2 cores", file=sys.stderr, flush=True)
    _ninja_on_path()
    cflags, ldflags = compile_flags(debug)
    done = threading.Event()
    reporter = None
    if not quiet:
        reporter = threading.Thread(target=_report_progress, args=(directory, len(sources), done, start),
                                    daemon=True)
        reporter.start()
    try:
        cpp_extension.load(name="_C", sources=[str(p) for p in sources], extra_cflags=cflags,
                           extra_ldflags=ldflags, extra_include_paths=[str(SOURCE_DIR)],
                           build_directory=str(directory), is_python_module=False, verbose=False)
    finally:
        done.set()
        if reporter is not None:
            reporter.join()
    info = dict(build_key(debug), sources=digest, seconds=round(time.monotonic() - start, 1))
    tmp = directory / (STAMP + f".{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, directory / STAMP)
    if not quiet:
        print(f"mmkernels: C++ CPU kernels built in {info['seconds']:.0f} s", file=sys.stderr, flush=True)
    return directory / LIBRARY


def _load() -> None:
    if _settings.no_ext():
        _state["error"] = "MMKERNELS_NO_EXT=1 is set: the C++ CPU kernels are neither built nor loaded"
        return
    try:
        _state["module"] = _import_library(build())
    except Exception as exc:  # no compiler or ninja, a compile error, a library that will not load
        text = f"{type(exc).__name__}: {exc}"
        if len(text) > 4000:
            text = text[:1500] + "\n...\n" + text[-2500:]
        _state["error"] = (
            f"{text}\nThe C++ CPU kernels need a C++17 compiler (g++ or clang++) and ninja "
            "(`pip install ninja`); install them, then run `python -m mmkernels.build` to build "
            f"for torch in {build_dir()}.")
        warnings.warn(f"mmkernels: the C++ CPU kernels are not available; CPU tensors use the "
                      f"'reference' backend. {_state['error']}", RuntimeWarning, stacklevel=3)


def _ensure_loaded() -> None:
    if _state["loaded"]:
        return
    with _lock:
        if not _state["loaded"]:
            _load()
            _state["loaded"] = True


def available() -> bool:
    """True when the compiled CPU kernels are loaded (building them first if needed)."""
    _ensure_loaded()
    return _state["module"] is not None


@contextlib.contextmanager
def cpu_blas(enabled: bool) -> Iterator[None]:
    """Internal, for tests: inside the block the CPU kernels' GEMMs call BLAS (``True``) or always
    take their ATen fallback (``False``, the path of a torch that exports no ``sgemm_``/``dgemm_``).
    The previous setting is restored on exit. One switch for the whole process; needs ``C``."""
    module = __getattr__("C")
    if module is None:
        raise RuntimeError(f"mmkernels: the C++ CPU kernels are not available ({_state['error']})")
    previous = module.set_cpu_blas(bool(enabled))
    try:
        yield
    finally:
        module.set_cpu_blas(previous)


def __getattr__(name: str):
    # ``C`` (the module or None) and ``LOAD_ERROR`` (why it is None) load on first access.
    if name == "C":
        _ensure_loaded()
        return _state["module"]
    if name == "LOAD_ERROR":
        _ensure_loaded()
        return _state["error"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
