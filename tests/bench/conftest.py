"""Fixtures of the tests about the benchmark suite."""
import json

import pytest


@pytest.fixture
def bench_cli(tmp_path):
    """Run ``python -m bench`` in-process on the CPU at the pytest profile, writing to a temporary
    folder: ``bench_cli(*args)`` returns the parsed ``results.json``, the text of ``results.md`` and the
    folder."""
    from bench.__main__ import main

    def run(*args):
        out = tmp_path / "run"
        rc = main(["--profile", "pytest", "--device", "cpu", "--no-isolate", "--out", str(out), *args])
        assert rc == 0
        return json.loads((out / "results.json").read_text()), (out / "results.md").read_text(), out

    return run
