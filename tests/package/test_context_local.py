"""Runtime settings are context-local: threads, asyncio tasks and interleaved generators that force
different backends, paths, device kinds or launch options never see each other's choice.

Each threaded test lines the threads up on a barrier while both hold their setting open, so
the settings overlap in time; a module-level stack (the design these tests guard against) fails
them."""
import asyncio
import threading

import pytest
import torch

import mmkernels
from mmkernels import _backend, _dispatch, _ext, tuning

pytestmark = pytest.mark.skipif(not _ext.available(), reason="needs the C++ CPU kernels")


def _features(seed: int):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(8, 16, generator=g)
    txt = torch.randn(8, 16, generator=g)
    return img, txt, torch.tensor(2.0)


def _run_threads(*targets):
    """Run each target in its own thread; re-raise the first failure here."""
    errors = []

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                errors.append(e)
        return run

    threads = [threading.Thread(target=guard(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]


def test_two_threads_force_different_backends():
    barrier = threading.Barrier(2, timeout=60)
    seen = {}

    def worker(name, seed):
        img, txt, scale = _features(seed)
        with mmkernels.backend(name):
            barrier.wait()  # both blocks open at once
            for _ in range(20):
                with mmkernels.explain() as log:
                    loss = mmkernels.contrastive_loss(img, txt, scale)
                assert _backend.current() == name
                assert {d.backend for d in log} == {None if name == "reference" else name}, str(log)
            barrier.wait()
            seen[name] = (loss, [d.path for d in log])
        assert _backend.current() == _backend.DEFAULT

    _run_threads(lambda: worker("reference", 0), lambda: worker("cpu", 1))
    assert seen["reference"][1] == ["reference"]
    assert seen["cpu"][1] == ["kernel"]
    for name, seed in (("reference", 0), ("cpu", 1)):
        img, txt, scale = _features(seed)
        with mmkernels.backend(name):
            want = mmkernels.contrastive_loss(img, txt, scale)
        torch.testing.assert_close(seen[name][0], want)
    assert _backend.current() == _backend.DEFAULT


def test_explain_records_only_its_own_thread():
    barrier = threading.Barrier(2, timeout=60)
    counts = {}

    def recorder():
        with mmkernels.explain() as log:
            barrier.wait()
            barrier.wait()  # the other thread runs its ops between the two waits
        counts["recorder"] = len(log)

    def runner():
        img, txt, scale = _features(2)
        barrier.wait()
        for _ in range(3):
            mmkernels.contrastive_loss(img, txt, scale)
        barrier.wait()

    _run_threads(recorder, runner)
    assert counts["recorder"] == 0


def test_use_path_and_pretend_device_are_per_thread():
    barrier = threading.Barrier(2, timeout=60)
    img, txt, scale = _features(3)
    paths = {}

    def forced():
        with mmkernels.use_path("blockwise"), _dispatch.pretend_device("cuda-sm90"):
            barrier.wait()
            assert _dispatch.device_kind(img.device) == "cuda-sm90"
            with mmkernels.explain() as log:
                mmkernels.contrastive_loss(img, txt, scale)
            assert log[0].case[0] == "cuda-sm90"
            barrier.wait()
        paths["forced"] = log.paths()

    def free():
        barrier.wait()
        assert _dispatch.device_kind(img.device) == "cpu"
        with mmkernels.explain() as log:
            mmkernels.contrastive_loss(img, txt, scale)
        assert log[0].case[0] == "cpu"
        barrier.wait()
        paths["free"] = log.paths()

    _run_threads(forced, free)
    assert paths["forced"] == ["blockwise"]
    with mmkernels.explain() as log:
        mmkernels.contrastive_loss(img, txt, scale)
    assert paths["free"] == log.paths() != ["blockwise"]


def test_tuning_scope_is_per_thread_and_process_settings_are_shared():
    name = "memory_budget"
    default = tuning.option(name)
    barrier = threading.Barrier(2, timeout=60)
    seen = {}

    def scoped(value):
        def run():
            with tuning.scope():
                tuning.set_option(name, value)
                barrier.wait()
                seen[value] = tuning.option(name)
                barrier.wait()
            seen[(value, "after")] = tuning.option(name)
        return run

    _run_threads(scoped(1 << 10), scoped(1 << 20))
    assert seen[1 << 10] == 1 << 10 and seen[1 << 20] == 1 << 20
    assert seen[(1 << 10, "after")] == seen[(1 << 20, "after")] == default
    assert tuning.option(name) == default

    # set outside any scope: process-wide, a new thread sees it
    try:
        tuning.set_option(name, 12345)
        got = []
        _run_threads(lambda: got.append(tuning.option(name)))
        assert got == [12345]
    finally:
        tuning.set_option(name, None)
    assert tuning.option(name) == default


def test_asyncio_tasks_keep_their_own_backend():
    async def task(name, ready, go):
        with mmkernels.backend(name):
            ready.set()
            await go.wait()  # the other task entered its block meanwhile
            assert _backend.current() == name
            img, txt, scale = _features(4)
            with mmkernels.explain() as log:
                mmkernels.contrastive_loss(img, txt, scale)
            return log.paths()

    async def main():
        go = asyncio.Event()
        r1, r2 = asyncio.Event(), asyncio.Event()
        t1 = asyncio.create_task(task("reference", r1, go))
        t2 = asyncio.create_task(task("cpu", r2, go))
        await r1.wait()
        await r2.wait()
        assert _backend.current() == _backend.DEFAULT
        go.set()
        return await t1, await t2

    assert asyncio.run(main()) == (["reference"], ["kernel"])
    assert _backend.current() == _backend.DEFAULT


def test_interleaved_generators_leave_nothing_behind():
    def holding(name):
        with mmkernels.backend(name):
            yield _backend.current()
            yield _backend.current()

    a, b = holding("reference"), holding("cpu")
    assert next(a) == "reference"
    assert next(b) == "cpu"
    # generators share their caller's context: the innermost open block is b's
    assert _backend.current() == "cpu"
    assert next(a) == "cpu"
    assert next(a, None) is None  # a's block exits first, out of order
    assert _backend.current() == "cpu"  # b's block is still open, a's left nothing behind
    assert next(b) == "cpu"
    assert next(b, None) is None
    assert _backend.current() == _backend.DEFAULT
