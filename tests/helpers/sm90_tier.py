"""The part every family's sm_90 compile tier shares (see mmkernels.testing.sm90).

A tier module defines its compile jobs as ``JOBS`` and a subclass of :class:`Sm90Tier` that says
what each job's report must show (:meth:`Sm90Tier.check`) and, where a kernel has a
specialisation meant for small tensors only, which jobs the int64 address check reads
(:meth:`Sm90Tier.int64_jobs`)::

    from tests.helpers.sm90_tier import Sm90Tier, reports  # noqa: F401  (the fixture)

    JOBS = [...]

    class TestSm90(Sm90Tier):
        def check(self, rep, job):
            sm90.assert_sm90_ok(rep, wgmma=True)

The module-scoped ``reports`` fixture compiles the module's ``JOBS`` once, on every core
(``{label: report}``); the module's own tests may use it too.
"""
from __future__ import annotations

import pytest

from mmkernels.testing import sm90


def launch_grid(kinds, dtypes, precisions, d_values):
    """Every ``(kind, dtype, input precision, D)`` a tier compiles; ``precisions(dtype)`` gives the
    input precisions of a dtype."""
    for kind in kinds:
        for dtype in dtypes:
            for prec in precisions(dtype):
                for D in d_values:
                    yield kind, dtype, prec, D


@pytest.fixture(scope="module")
def reports(request):
    """``{job.label: Sm90Report}`` of the module's ``JOBS``, compiled once per module."""
    return sm90.compile_reports(request.module.JOBS)


class Sm90Tier:
    """The tests every compile tier runs over its module's ``JOBS``: the tools are there, each job
    names every kernel argument, labels are unique, and each job compiles and passes
    :meth:`check` (one test per job, its label as id)."""

    def check(self, rep: sm90.Sm90Report, job: sm90.CompileJob) -> None:
        """What the report of ``job`` must show (default: compiles, no spills, smem <= 227 KB)."""
        sm90.assert_sm90_ok(rep)

    def int64_jobs(self) -> list[sm90.CompileJob]:
        """The jobs whose address arithmetic must be 64-bit: one per kernel (the default); a
        tier overrides it to pass over specialisations the launcher picks only when every
        offset fits in int32."""
        return sm90.one_job_per_kernel(self._jobs())

    def pytest_generate_tests(self, metafunc):
        if "job" in metafunc.fixturenames:
            jobs = metafunc.module.JOBS
            metafunc.parametrize("job", jobs, ids=[j.label for j in jobs])

    def test_tools_present(self):
        sm90.check_tools()

    def test_every_kernel_argument_is_specified(self):
        sm90.assert_jobs_specify_every_argument(self._jobs())

    def test_labels_unique(self):
        labels = [j.label for j in self._jobs()]
        assert len(labels) == len(set(labels))

    def test_sm90_compile(self, reports, job):
        rep = reports[job.label]
        print(rep.summary())
        self.check(rep, job)

    def test_int64_offsets(self):
        """Each kernel (one configuration each) multiplies size-scaled offsets in 64 bits."""
        jobs = self.int64_jobs()
        assert jobs
        failures = []
        reps = sm90.compile_reports(jobs)
        for job in jobs:
            try:
                sm90.assert_int64_offsets(reps[job.label])
            except AssertionError as exc:
                failures.append(str(exc))
        assert not failures, "\n".join(failures)

    def _jobs(self):
        import sys
        return sys.modules[type(self).__module__].JOBS
