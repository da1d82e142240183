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


def test_eager_factor_applies_only_to_a_documented_exception(monkeypatch):
    from mmkernels import _dispatch
    from mmkernels.testing import numerics
    exc = numerics.NumericsException("op_a", "sdpa", (None,), (torch.float32,), ("dq",), 6.0, "why")
    monkeypatch.setattr(numerics, "NUMERICS_EXCEPTIONS", (exc,))
    ran = _dispatch.Decision("family", "op_a", ("cpu", "float32", "*"), "sdpa", None, "table")
    assert numerics.eager_factor([ran], torch.float32, "dq") == 6.0
    assert numerics.eager_factor([ran], torch.float32, "dk") == 2.0
    assert numerics.eager_factor([ran], torch.float16, "dq") == 2.0
    assert numerics.eager_factor([ran._replace(path="kernel", backend="cpu")], torch.float32, "dq") == 2.0
    assert numerics.eager_factor([], torch.float32, "dq") == 2.0
