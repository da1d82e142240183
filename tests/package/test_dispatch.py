"""The path dispatcher (``mmkernels/_dispatch.py``): table lookup, eligibility, forcing, explain."""
from __future__ import annotations

import logging

import pytest
import torch

import mmkernels
from mmkernels import _dispatch, _ext, tuning

FAMILIES = ("contrastive", "attention", "cross_attention", "experts")

FAKE = {
    ("op_a", "cuda-sm90", "bfloat16", "big"): (("fast", "kernel"), "run A"),
    ("op_a", "cuda", "*", "*"): (("kernel", "fast"), "run B"),
    ("op_a", "cpu", "*", "small"): (("slow", "fast", "kernel"), "run C"),
    ("*", "*", "*", "*"): (("kernel",), "default"),
}


@pytest.fixture
def fake_table(monkeypatch):
    rows = {k: _dispatch.Row(tuple(v[0]), v[1]) for k, v in FAKE.items()}
    monkeypatch.setattr(_dispatch, "table", lambda family: rows)
    return rows


def _x(dtype=torch.float32):
    return torch.randn(4, 3, dtype=dtype)


needs_ext = pytest.mark.skipif(not _ext.available(), reason="the C++ kernels are not built")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_table_resolves_every_case(family):
    """Each family table has a wildcard row, and every order names the kernels."""
    rows = _dispatch.table(family)
    assert ("*", "*", "*", "*") in rows
    for key, row in rows.items():
        assert len(key) == 4 and all(isinstance(k, str) for k in key)
        assert key[1] in _dispatch.DEVICE_KINDS + ("*",), key
        assert "kernel" in row.order, key
        assert len(set(row.order)) == len(row.order), key
        assert row.source


def test_lookup_prefers_the_most_specific_row(fake_table):
    assert _dispatch.lookup("f", "op_a", "cuda-sm90", "bfloat16", "big")[1].source == "run A"
    # sm90 falls back to the generic cuda row, dtype and class to wildcards
    assert _dispatch.lookup("f", "op_a", "cuda-sm90", "float16", "big")[1].source == "run B"
    assert _dispatch.lookup("f", "op_a", "cpu", "float32", "small")[1].source == "run C"
    assert _dispatch.lookup("f", "op_a", "cpu", "float32", "other")[1].source == "default"
    assert _dispatch.lookup("f", "op_b", "cuda-sm90", "bfloat16", "big")[1].source == "default"


def test_lookup_without_wildcard_row_raises(monkeypatch):
    monkeypatch.setattr(_dispatch, "table", lambda family: {})
    with pytest.raises(LookupError, match="no row"):
        _dispatch.lookup("f", "op", "cpu", "float32", "c")


@needs_ext
def test_choose_takes_the_first_eligible_path(fake_table):
    x = _x()
    with mmkernels.explain() as log:
        d = _dispatch.choose("f", "op_a", x, "small", {"slow": "too slow here", "fast": None})
    assert d.path == "fast" and d.backend is None
    assert "skipped slow (too slow here)" in d.reason and "run C" in d.reason
    assert log.paths() == ["fast"]
    d = _dispatch.choose("f", "op_a", x, "small", {"slow": "no", "fast": "no"})
    assert d.path == "kernel" and d.backend == "cpu"


@needs_ext
def test_pretend_device_changes_the_row_not_the_device(fake_table):
    x = _x(torch.bfloat16)
    with _dispatch.pretend_device("cuda-sm90"):
        d = _dispatch.choose("f", "op_a", x, "big", {"fast": None})
        assert d.case == ("cuda-sm90", "bfloat16", "big") and d.path == "fast"
        d = _dispatch.choose("f", "op_a", x, "big", {"fast": "needs CUDA"})
        assert d.path == "kernel" and d.backend == "cpu"  # the kernels of the real device
    with _dispatch.pretend_device("cuda"):
        assert _dispatch.choose("f", "op_a", x, "big", {"fast": None}).path == "kernel"
    assert _dispatch.device_kind(x.device) == "cpu"
    with pytest.raises(ValueError, match="unknown device kind"):
        with _dispatch.pretend_device("tpu"):
            pass


def test_forced_backend_ignores_the_table(fake_table):
    x = _x()
    with mmkernels.backend("reference"):
        d = _dispatch.choose("f", "op_a", x, "small", {"fast": None})
    assert d.path == "reference" and "forced" in d.reason
    if _ext.available():
        with mmkernels.backend("cpu"), mmkernels.use_path("fast"):
            d = _dispatch.choose("f", "op_a", x, "small", {"fast": None})
        assert (d.path, d.backend) == ("kernel", "cpu")


@needs_ext
def test_use_path_forces_and_explains_refusal(fake_table):
    x = _x()
    with mmkernels.use_path("slow"):
        assert _dispatch.choose("f", "op_a", x, "other", {"slow": None}).path == "slow"
        with pytest.raises(_dispatch.PathUnavailable, match="cannot run this call: needs CUDA"):
            _dispatch.choose("f", "op_a", x, "other", {"slow": "needs CUDA"})
    with mmkernels.use_path("kernel"):
        assert _dispatch.choose("f", "op_a", x, "small", {"slow": None}).path == "kernel"
    with mmkernels.use_path("not_a_path_of_op_a"):  # ops without that path keep the table
        assert _dispatch.choose("f", "op_a", x, "small", {"slow": None}).path == "slow"
    with pytest.raises(ValueError):
        with mmkernels.use_path(""):
            pass


def test_nothing_eligible_falls_back_to_the_reference(fake_table, monkeypatch):
    monkeypatch.setattr(_dispatch, "kernel_backend", lambda device, dtype: (None, "no kernels here"))
    d = _dispatch.choose("f", "op_a", _x(), "small", {"slow": "no", "fast": "no"})
    assert d.path == "reference" and "no kernels here" in d.reason


def test_table_naming_an_unknown_path_is_an_error(monkeypatch):
    monkeypatch.setattr(_dispatch, "table", lambda family: {
        ("*", "*", "*", "*"): _dispatch.Row(("typo", "kernel"), "x")})
    with pytest.raises(LookupError, match="typo"):
        _dispatch.choose("f", "op", _x(), "c", {"fast": None})


@needs_ext
def test_explain_prints_and_logs(fake_table, caplog):
    with caplog.at_level(logging.DEBUG, logger="mmkernels.dispatch"):
        with mmkernels.explain() as outer:
            with mmkernels.explain() as inner:
                _dispatch.choose("f", "op_a", _x(), "small", {"slow": None})
            _dispatch.choose("f", "op_b", _x(), "small", {})
    assert len(inner) == 1 and len(outer) == 2
    assert str(inner).startswith("op_a [cpu, float32, small] -> slow")
    assert "op_b [cpu, float32, small] -> kernel (cpu)" in str(outer)
    assert any("op_a" in r.getMessage() for r in caplog.records)
    with mmkernels.explain() as empty:
        pass
    assert str(empty) == "(no mmkernels op ran)"


def test_memory_budget_option():
    assert _dispatch.memory_budget() == 64 << 20
    with tuning.scope():
        tuning.set_option("memory_budget", 1 << 20)
        assert _dispatch.memory_budget() == 1 << 20
        for bad in (-1, 1.5, True, "1M"):
            with pytest.raises(ValueError, match="memory_budget"):
                tuning.set_option("memory_budget", bad)
    assert _dispatch.memory_budget() == 64 << 20
