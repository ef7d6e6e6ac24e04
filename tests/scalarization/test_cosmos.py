import math

import pytest
import torch
from torch.testing import assert_close

from torchjd.scalarization import COSMOS

L = torch.tensor([1.0, 2.0, 4.0])
R = torch.tensor([0.2, 0.3, 0.5])


@pytest.mark.parametrize(
    ("lambda_", "weights", "values", "expected"),
    [
        (1.0, [0.5, 0.5], [1.0, 1.0], 0.0),  # 1 - cos = 1 - 1
        (0.0, [1 / 3] * 3, [1.0, 2.0, 4.0], 7 / 3),
        (0.0, [2.0, 1.0], [3.0, 4.0], 10.0),
        (1.0, [0.5, 0.5], [0.0, 0.0], 0.0),  # the cosine of a zero vector is 0
        (1.0, [0.2, 0.3, 0.5], [1.0, 2.0, 4.0], 1.8088),
        (2.0, [0.5, 0.3, 0.2], [1.0, 2.0, 4.0], 0.5548),
    ],
)
def test_worked_values(
    lambda_: float, weights: list[float], values: list[float], expected: float
) -> None:
    out = COSMOS(lambda_, torch.tensor(weights))(torch.tensor(values))
    assert_close(out, torch.tensor(expected), rtol=0.0, atol=1e-4)


def test_hand_derived_value() -> None:
    # r.L = 0.5 + 0.6 + 0.8 = 1.9, |r| = sqrt(0.38), |L| = sqrt(21).
    cos = 1.9 / (math.sqrt(0.38) * math.sqrt(21.0))
    out = COSMOS(2.0, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))(L.double())
    assert math.isclose(float(out), 1.9 - 2.0 * cos, rel_tol=1e-12)


def test_gradient() -> None:
    # d/dL [r.L - lambda r.L / (|r||L|)] = r - lambda (r / (|r||L|) - (r.L) L / (|r||L|^3)).
    lambda_ = 0.7
    r, values = R.double(), torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    nr, nl, dot = r.norm(), values.norm(), r @ values
    expected = r - lambda_ * (r / (nr * nl) - dot * values / (nr * nl**3))
    values.requires_grad_()
    COSMOS(lambda_, r)(values).backward()
    assert_close(values.grad, expected)


def test_matrix_values_are_flattened() -> None:
    weights, values = R.reshape(3, 1), L.reshape(3, 1)
    assert_close(COSMOS(1.0, weights)(values), COSMOS(1.0, R)(L))


@pytest.mark.parametrize("lambda_", [-1.0, -1e-9, float("nan")])
def test_negative_lambda_is_rejected(lambda_: float) -> None:
    with pytest.raises(ValueError, match="`lambda_`"):
        COSMOS(lambda_, torch.tensor([0.5, 0.5]))


def test_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"`weights` has shape \(3,\).*\(2,\)"):
        COSMOS(1.0, torch.ones(3))(torch.ones(2))


def test_weights_can_be_resampled() -> None:
    cosmos = COSMOS(0.0, torch.tensor([1.0, 0.0]))
    values = torch.tensor([3.0, 5.0])
    assert_close(cosmos(values), torch.tensor(3.0))
    cosmos.weights = torch.tensor([0.0, 1.0])
    assert_close(cosmos(values), torch.tensor(5.0))


def test_repr_str() -> None:
    cosmos = COSMOS(0.5, torch.tensor([0.5, 0.5]))
    assert repr(cosmos) == "COSMOS(lambda_=0.5, weights=tensor([0.5000, 0.5000]))"
    assert repr(COSMOS(1, torch.tensor([0.5, 0.5]))).startswith("COSMOS(lambda_=1, ")
    assert str(cosmos) == "COSMOS"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_zeros_give_zero(dtype: torch.dtype) -> None:
    # cos(r, 0) = 0 by the max(., 1e-8) of the denominator, which must not underflow in fp16 (its
    # gradient, -lambda r / 1e-8, does not fit in float16: that overflow is the true value's).
    out = COSMOS(2.0, R)(torch.zeros(3, dtype=dtype))
    assert out.dtype == dtype
    assert_close(out, torch.tensor(0.0, dtype=dtype))
