"""mmkernels benchmark suite.

One harness for every op family (``bench/harness.py``); each family keeps its
cases and providers in ``bench/cases/<family>.py``. Two entry points use the
same cases: ``python -m bench`` (JSON + Markdown + PNG report) and
``pytest bench/`` (pytest-benchmark, small CPU sizes).
"""
