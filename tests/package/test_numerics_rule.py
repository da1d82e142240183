"""The project's comparison rule (mmkernels/testing/numerics.py) passes and fails where it says."""
import pytest
import torch

from mmkernels.testing.numerics import assert_close


def test_within_the_table_passes_without_eager():
    ref = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    assert_close((ref * (1 + 5e-6)).float(), ref)


def test_outside_the_table_fails_without_eager():
    ref = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    with pytest.raises(AssertionError, match="max error"):
        assert_close((ref + 1e-3).float(), ref)


def test_nan_never_passes():
    ref = torch.tensor([1.0, 2.0], dtype=torch.float64)
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(torch.tensor([1.0, float("nan")]), ref, eager=torch.tensor([1.0, float("nan")]))


def test_twice_eager_plus_one_rounding_step_at_the_largest_value():
    # an element near zero among large ones: the elementwise bound fails for both
    ref = torch.tensor([1e4, 1e-3], dtype=torch.float64)
    eager = (ref + torch.tensor([0.0, 3e-3], dtype=torch.float64)).float()
    step = torch.finfo(torch.float32).eps * 1e4
    ok = (ref + torch.tensor([0.0, 2 * 3e-3 + 0.9 * step], dtype=torch.float64)).float()
    assert_close(ok, ref, eager=eager)
    bad = (ref + torch.tensor([0.0, 2 * 3e-3 + 2.0 * step], dtype=torch.float64)).float()
    with pytest.raises(AssertionError, match="2x eager"):
        assert_close(bad, ref, eager=eager)


def test_exact_eager_leaves_only_the_rounding_slack():
    ref = torch.tensor([0.5, 1e-9], dtype=torch.float64)
    eager = ref.float()  # eager exact up to float32 rounding
    with pytest.raises(AssertionError, match="2x eager"):
        assert_close((ref + torch.tensor([0.0, 1e-4], dtype=torch.float64)).float(), ref, eager=eager)


def test_an_exception_applies_only_where_documented(monkeypatch):
    from mmkernels import _dispatch
    from mmkernels.testing import numerics
    exc = numerics.NumericsException("op_a", "kernel", ("cpu",), (torch.float32,), ("dq",), "bound_a", "why")
    monkeypatch.setattr(numerics, "NUMERICS_EXCEPTIONS", (exc,))
    ran = _dispatch.Decision("family", "op_a", ("cpu", "float32", "*"), "kernel", "cpu", "table")
    bounds = lambda: {"bound_a": {"dq": 0.5}}  # noqa: E731
    assert numerics.exception_allowance([ran], torch.float32, "dq", bounds) == 0.5
    assert numerics.exception_allowance([ran], torch.float32, "dk", bounds) == 0.0
    assert numerics.exception_allowance([ran], torch.float16, "dq", bounds) == 0.0
    assert numerics.exception_allowance([ran._replace(backend="triton")], torch.float32, "dq", bounds) == 0.0
    assert numerics.exception_allowance([ran._replace(path="sdpa", backend=None)], torch.float32, "dq",
                                        bounds) == 0.0
    with pytest.raises(AssertionError, match="computed no allowance"):
        numerics.exception_allowance([ran], torch.float32, "dq", None)


def test_the_exception_bound_widens_the_eager_rule():
    ref = torch.tensor([1e-3], dtype=torch.float64)
    eager = (ref + 1e-6).float()
    bad = (ref + 1e-4).float()
    with pytest.raises(AssertionError, match="2x eager"):
        assert_close(bad, ref, eager=eager)
    assert_close(bad, ref, eager=eager, extra=1e-4)
