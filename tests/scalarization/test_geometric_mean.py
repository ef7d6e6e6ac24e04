import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from torchjd.scalarization import GeometricMean


def test_worked_values() -> None:
    assert_close(GeometricMean()(torch.tensor([1.0, 2.0, 4.0])), torch.tensor(2.0))
    # (1 * 2 * 3 * 0.5) ** (1/4) = 3 ** 0.25
    assert_close(GeometricMean()(torch.tensor([[1.0, 2.0], [3.0, 0.5]])), torch.tensor(3.0**0.25))
    assert_close(GeometricMean()(torch.tensor(5.0)), torch.tensor(5.0))


def test_zero_gives_zero() -> None:
    assert GeometricMean()(torch.tensor([1.0, 0.0])) == 0.0


def test_tiny_value_is_finite() -> None:
    out = GeometricMean()(torch.tensor([1.0, 1e-13]))
    assert torch.isfinite(out)
    assert_close(out, torch.tensor(math.sqrt(1e-13)))


@pytest.mark.parametrize("values", [[1.0, -1.0], [-1e-13, 2.0], [-1.0]])
def test_negative_values_are_rejected(values: list[float]) -> None:
    with pytest.raises(ValueError, match="non-negative"):
        GeometricMean()(torch.tensor(values))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        GeometricMean()(torch.tensor([1.0, bad]))


def test_empty_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least one element"):
        GeometricMean()(torch.zeros(0))


def test_gradient() -> None:
    # d/dL_k (prod L)^(1/K) = G / (K L_k) with G = 2 and K = 3.
    values = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    GeometricMean()(values).backward()
    assert_close(values.grad, torch.tensor([2 / 3, 1 / 3, 1 / 6]))


def test_no_underflow_in_the_product() -> None:
    # The product 1e-30 ** 50 underflows, the log-domain computation does not.
    out = GeometricMean()(torch.full((50,), 1e-30))
    assert_close(out, torch.tensor(1e-30), rtol=1e-4, atol=0.0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=1, max_size=8))
def test_matches_numpy(values: list[float]) -> None:
    expected = float(np.prod(np.array(values)) ** (1.0 / len(values)))
    out = GeometricMean()(torch.tensor(values, dtype=torch.float64))
    assert math.isclose(float(out), expected, rel_tol=1e-9)


def test_repr_str() -> None:
    assert repr(GeometricMean()) == "GeometricMean()"
    assert str(GeometricMean()) == "GeometricMean"


def test_bfloat16_is_within_rounding() -> None:
    # (3000 * 4000 * 1000 * 2000) ** (1 / 4) = 2213.36..., rounded once to bfloat16 (2^-8).
    values = torch.tensor([3000.0, 4000.0, 1000.0, 2000.0], dtype=torch.bfloat16)
    expected = torch.tensor((3000.0 * 4000.0 * 1000.0 * 2000.0) ** 0.25, dtype=torch.float64)
    out = GeometricMean()(values)
    assert out.dtype == torch.bfloat16
    assert_close(out.double(), expected, rtol=2**-8, atol=0)
