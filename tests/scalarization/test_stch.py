import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from torchjd.scalarization import STCH

L = torch.tensor([1.0, 2.0, 4.0])
R = torch.tensor([0.2, 0.3, 0.5])
Z = torch.tensor([0.5, 0.5, 0.5])
LOG2 = math.log(2.0)


def test_worked_values() -> None:
    ones = torch.ones(2)
    assert_close(STCH(1.0)(torch.zeros(2)), torch.tensor(LOG2))
    assert_close(STCH(1.0, weights=ones)(ones), torch.tensor(1.0 + LOG2))
    assert_close(STCH(1.0, ones, ones)(ones), torch.tensor(LOG2))
    assert_close(STCH(0.5)(L), torch.tensor(1.5012), rtol=0.0, atol=1e-4)
    assert_close(STCH(1.0)(L), torch.tensor(1.9653), rtol=0.0, atol=1e-4)
    assert_close(STCH(0.1, R, Z)(L), torch.tensor(1.7500), rtol=0.0, atol=1e-4)
    assert_close(
        STCH(0.5)(torch.tensor([[1.0, 2.0], [3.0, 0.5]])), torch.tensor(1.1579), atol=1e-4, rtol=0
    )


def test_hand_derived_value_float64() -> None:
    mu = 0.3
    y = [0.2 * 0.5, 0.3 * 1.5, 0.5 * 3.5]
    expected = mu * math.log(sum(math.exp(v / mu) for v in y))
    r64 = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    z64 = torch.full((3,), 0.5, dtype=torch.float64)
    assert math.isclose(float(STCH(mu, r64, z64)(L.double())), expected, rel_tol=1e-12)


def test_no_overflow() -> None:
    out = STCH(1e-10)(torch.tensor([1e30, 2e30, 3e30]))
    assert torch.isfinite(out)
    assert_close(out, torch.tensor(1e30))


def test_gradient_is_weighted_softmax() -> None:
    mu = 0.5
    values = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64, requires_grad=True)
    weights = R.double()
    STCH(mu, weights)(values).backward()
    expected = torch.softmax(weights * values.detach() / mu, dim=0) * weights
    assert_close(values.grad, expected)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(min_value=-100, max_value=100), min_size=1, max_size=6),
    st.floats(min_value=1e-3, max_value=10.0),
)
def test_between_max_and_max_plus_mu_log_k(values: list[float], mu: float) -> None:
    # With uniform weights y = L / K, and max(y) <= mu log sum exp(y / mu) <= max(y) + mu log K.
    k = len(values)
    y_max = max(values) / k
    out = float(STCH(mu)(torch.tensor(values, dtype=torch.float64)))
    assert y_max - 1e-9 <= out <= y_max + mu * math.log(k) + 1e-9


@pytest.mark.parametrize("mu", [0.0, -1.0, float("nan")])
def test_invalid_mu(mu: float) -> None:
    with pytest.raises(ValueError, match="`mu`"):
        STCH(mu)


def test_shape_mismatches() -> None:
    with pytest.raises(ValueError, match="`weights`"):
        STCH(1.0, weights=torch.ones(3))(torch.ones(2))
    with pytest.raises(ValueError, match="`reference`"):
        STCH(1.0, reference=torch.ones(3))(torch.ones(2))


def test_repr_str() -> None:
    assert repr(STCH(0.5)) == "STCH(mu=0.5, weights=None, reference=None)"
    assert str(STCH(0.5)) == "STCH"
