"""pytest configuration for bench/.

``pytest bench/`` runs the benchmark cases under pytest-benchmark. Where the
pytest-benchmark plugin is not installed, a stand-in ``benchmark`` fixture runs
each case once, so the file still collects and checks that every case runs.
"""

import os

import pytest
import torch

# As in tests/conftest.py: without a CUDA device the Triton kernels run through Triton's
# interpreter, which must be chosen before triton or mmkernels is imported (so `pytest bench/`
# alone behaves as the whole suite does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import pytest_benchmark  # noqa: F401

    HAVE_PYTEST_BENCHMARK = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_PYTEST_BENCHMARK = False


if not HAVE_PYTEST_BENCHMARK:

    class _RunOnce:
        """The subset of pytest-benchmark's fixture that bench/test_bench.py uses."""

        def __init__(self):
            self.extra_info = {}
            self.group = None

        def __call__(self, fn, *args, **kwargs):
            return fn(*args, **kwargs)

        def pedantic(self, fn, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0, iterations=1):
            if setup is not None:
                got = setup()
                if got is not None:
                    args, kwargs = got
            return fn(*args, **(kwargs or {}))

    @pytest.fixture
    def benchmark():
        return _RunOnce()
