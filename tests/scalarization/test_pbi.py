import math

import pytest
import torch
from torch.testing import assert_close

from torchjd.scalarization import PBI

L = torch.tensor([1.0, 2.0, 4.0])
R = torch.tensor([0.2, 0.3, 0.5])
Z = torch.tensor([0.5, 0.5, 0.5])


def test_worked_values() -> None:
    w = torch.tensor([1.0, 1.0])
    # f = [2, 0]: d1 = 2/sqrt(2) = sqrt(2), f - d1 w_hat = [1, -1], d2 = sqrt(2).
    assert_close(PBI(1.0, w)(torch.tensor([2.0, 0.0])), torch.tensor(2 * math.sqrt(2)))
    assert_close(PBI(0.0, w)(torch.tensor([2.0, 0.0])), torch.tensor(math.sqrt(2)))
    assert_close(
        PBI(1.0, w, reference=torch.tensor([1.0, 1.0]))(torch.tensor([3.0, 1.0])),
        torch.tensor(2 * math.sqrt(2)),
    )
    assert_close(PBI(5.0, R)(L), torch.tensor(7.5771), rtol=0.0, atol=1e-4)
    assert_close(PBI(5.0, R, Z)(L), torch.tensor(8.2834), rtol=0.0, atol=1e-4)
    assert_close(PBI(0.0, R)(L), torch.tensor(4.5422), rtol=0.0, atol=1e-4)
    # On the ray, d2 = sqrt(1e-12) = 1e-6.
    out = PBI(5.0, torch.tensor(1.0, dtype=torch.float64))(torch.tensor(3.0, dtype=torch.float64))
    assert math.isclose(float(out), 3.000005, rel_tol=1e-12)


def test_hand_derived_value_float64() -> None:
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    theta, z = 3.0, torch.full((3,), 0.5, dtype=torch.float64)
    f = L.double() - z
    w_hat = w / math.sqrt(0.38)
    d1 = float(f @ w_hat)
    d2 = math.sqrt(float(((f - d1 * w_hat) ** 2).sum()) + 1e-12)
    assert math.isclose(float(PBI(theta, w, z)(L.double())), d1 + theta * d2, rel_tol=1e-12)


def test_gradient_off_the_ray() -> None:
    # grad = w_hat + theta (f - d1 w_hat) / d2.
    theta, w = 2.0, torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    values = torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64, requires_grad=True)
    w_hat = w / 3.0
    f = values.detach()
    d1 = f @ w_hat
    residual = f - d1 * w_hat
    d2 = torch.sqrt(residual.square().sum() + 1e-12)
    PBI(theta, w)(values).backward()
    assert_close(values.grad, w_hat + theta * residual / d2)


def test_gradient_on_the_ray_is_finite() -> None:
    values = torch.tensor([1.0, 2.0], requires_grad=True)
    out = PBI(5.0, torch.tensor([1.0, 2.0]))(values)
    out.backward()
    assert torch.isfinite(out)
    assert torch.isfinite(values.grad).all()
    assert_close(values.grad, torch.tensor([1.0, 2.0]) / math.sqrt(5.0))


def test_scale_of_the_weights_does_not_matter() -> None:
    assert_close(PBI(2.0, R)(L), PBI(2.0, 10.0 * R)(L))


@pytest.mark.parametrize("theta", [-1.0, float("nan")])
def test_invalid_theta(theta: float) -> None:
    with pytest.raises(ValueError, match="`theta`"):
        PBI(theta, torch.ones(2))


def test_shape_mismatches() -> None:
    with pytest.raises(ValueError, match="`weights`"):
        PBI(1.0, torch.ones(3))(torch.ones(2))
    with pytest.raises(ValueError, match="`reference`"):
        PBI(1.0, torch.ones(2), reference=torch.ones(3))(torch.ones(2))


def test_zero_weights_are_rejected() -> None:
    with pytest.raises(ValueError, match="`weights` must have at least one non-zero"):
        PBI(1.0, torch.zeros(2))(torch.ones(2))


def test_non_finite_reference_is_rejected() -> None:
    with pytest.raises(ValueError, match="`reference` must be finite"):
        PBI(1.0, torch.ones(2), torch.tensor([0.0, float("inf")]))(torch.ones(2))


def test_repr_str() -> None:
    pbi = PBI(5.0, torch.tensor([0.5, 0.5]))
    assert repr(pbi) == "PBI(theta=5.0, weights=tensor([0.5000, 0.5000]), reference=None)"
    assert str(pbi) == "PBI"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_values_whose_result_fits(dtype: torch.dtype) -> None:
    # f = (3000, 4000, 1000), w_hat = (1, 1, 1) / sqrt(3): d1 = 8000 / sqrt(3), and
    # ||f||^2 = 2.6e7 (beyond float16's 65504) gives d2 = sqrt(2.6e7 - 8000^2 / 3).
    values = torch.tensor([3000.0, 4000.0, 1000.0])
    d1 = 8000 / math.sqrt(3)
    d2 = math.sqrt(2.6e7 - d1**2 + 1e-12)
    out = PBI(2.0, torch.ones(3))(values.to(dtype))
    assert out.dtype == dtype
    assert_close(out.double(), torch.tensor(d1 + 2 * d2, dtype=torch.float64), rtol=2**-8, atol=0)


def test_half_precision_keeps_the_smoothing() -> None:
    # On the ray, d2 = sqrt(1e-12) = 1e-6; 1e-12 underflows in float16.
    out = PBI(5.0, torch.ones(2))(torch.zeros(2, dtype=torch.float16))
    assert_close(out.double(), torch.tensor(5e-6, dtype=torch.float64), rtol=2**-8, atol=0)
