"""Memory guards and measurements shared by the large-tensor tests.

``require_memory(n)`` skips a test (with the reason) when ``MemAvailable`` is below ``n`` bytes,
so a smaller machine skips instead of being killed. ``reset_peak_rss`` / ``peak_rss`` bracket a
test: the kernel's high-water mark of this process's resident memory (``VmHWM``), reset through
``/proc/self/clear_refs``.
"""
from __future__ import annotations

import resource

import pytest
import torch

INT32_MAX = 2**31 - 1
GIB = 2**30


def mem_available() -> int:
    """``MemAvailable`` of /proc/meminfo in bytes (0 where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def require_memory(nbytes: int, what: str) -> None:
    free = mem_available()
    if free < nbytes:
        pytest.skip(f"{what} needs {nbytes / GIB:.1f} GiB free, MemAvailable is {free / GIB:.1f} GiB")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Peak resident bytes since the last reset (``ru_maxrss`` where /proc has no ``VmHWM``)."""
    return _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


PERIOD = 4099  # odd: no wrap of a 32-bit offset (a multiple of 2**32 elements) maps a row to its twin


def uniform(*shape, dtype=torch.bfloat16, seed: int = 0, low: float = -1.0, high: float = 1.0,
            period: int = PERIOD):
    """``shape`` filled uniformly in ``[low, high)``: ``period`` random rows (of the last
    dimension) repeated, so filling billions of elements costs a copy; row ``r`` equals row
    ``r % period`` of the flattened ``[-1, shape[-1]]`` view."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(*shape, dtype=dtype)
    flat = out.view(-1, shape[-1])
    block = torch.empty(min(period, flat.shape[0]), shape[-1], dtype=dtype).uniform_(low, high, generator=g)
    for lo in range(0, flat.shape[0], block.shape[0]):
        n = min(block.shape[0], flat.shape[0] - lo)
        flat[lo:lo + n] = block[:n]
    return out


def fold_rows(values: torch.Tensor, period: int = PERIOD) -> torch.Tensor:
    """``values [n, ...]`` summed by ``row % period`` in float64: ``[period, ...]``. A sum
    ``sum_r values[r] * x[r]`` over rows of a tensor made by :func:`uniform` equals
    ``sum_p fold_rows(values)[p] * x[p]``."""
    idx = torch.arange(values.shape[0]) % period
    out = torch.zeros(period, *values.shape[1:], dtype=torch.float64)
    return out.index_add_(0, idx, values.double())


def probe_rows(n: int, width: int, count: int = 64) -> list[slice]:
    """Row slices at the start, the middle and the end of ``n`` rows of ``width`` elements; the
    last one's flat offsets all exceed ``INT32_MAX`` (asserted: the shapes must reach there)."""
    last = slice(n - count, n)
    assert last.start * width > INT32_MAX, (n, width)
    return [slice(0, count), slice(n // 2, n // 2 + count), last]
