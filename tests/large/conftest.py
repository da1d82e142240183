"""Each large-tensor test prints its wall time and peak resident memory (run with ``-s``)."""
from __future__ import annotations

import time

import pytest

from tests.large.memory import peak_rss, reset_peak_rss


@pytest.fixture(autouse=True)
def _report_time_and_peak_rss(request):
    reset_peak_rss()
    start = time.perf_counter()
    yield
    print(f"\n[large] {request.node.nodeid}: {time.perf_counter() - start:.1f} s, "
          f"peak RSS {peak_rss() / 2**30:.2f} GiB")
