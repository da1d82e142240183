"""The benchmark cases under pytest-benchmark.

``pytest bench/`` times the same cases and providers as ``python -m bench`` (both read
``bench/cases/``), at small CPU sizes by default (profile ``pytest``). Environment variables pick
others::

    pytest bench/ --benchmark-disable -q               # every case once: a smoke test
    pytest bench/ --benchmark-only --benchmark-save=X  # store timings (.benchmarks/)
    pytest bench/ --benchmark-only --benchmark-compare # compare with the last stored run
    BENCH_PROFILE=quick pytest bench/ --benchmark-only # the --quick sizes (CPU: N 1024/4096)
    BENCH_DEVICE=cuda BENCH_PROFILE=quick pytest bench/ --benchmark-only

Only relative numbers between commits on the same machine mean anything here; the performance
record is ``python -m bench`` on a GPU (bench/results/). The tests about the suite (harness,
report, providers' agreement with the reference) live in tests/bench/.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench import harness
from bench.cases import pair_id, pytest_plan
from mmkernels._dispatch import PathUnavailable

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
PAIRS = pytest_plan()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@pytest.mark.parametrize("case,provider", PAIRS, ids=[pair_id(p) for p in PAIRS])
def test_case(benchmark, case, provider):
    reason = harness.preflight(case, provider, harness.RunOptions())
    if reason:
        pytest.skip(reason)
    torch.manual_seed(case.seed)
    inputs = case.make_inputs(case)
    leaves = harness.grad_leaves(inputs)
    step = harness.make_step(case, provider, inputs)

    def run():
        out = step()
        _sync(case.device)
        return out

    try:
        harness.clear_grads(leaves)
        run()  # a forced path that cannot run this case skips here, before timing
    except PathUnavailable as exc:
        pytest.skip(str(exc))

    benchmark.group = case.id
    benchmark.extra_info.update(
        case=case.id, provider=provider.name, shape=dict(case.shape), dtype=case.dtype, device=case.device, mode=case.mode
    )
    out = benchmark.pedantic(run, setup=lambda: harness.clear_grads(leaves), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    assert torch.isfinite(out).all()
    if case.mode == "fwd+bwd":
        for leaf in leaves:
            assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
