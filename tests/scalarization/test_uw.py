import math

import pytest
import torch
from torch.testing import assert_close

from torchjd.scalarization import UW

L = torch.tensor([1.0, 2.0, 4.0])


def _uw_with(log_var: list[float]) -> UW:
    uw = UW(len(log_var))
    with torch.no_grad():
        uw.log_var.copy_(torch.tensor(log_var))
    return uw


def test_worked_values() -> None:
    assert_close(UW((3,))(L), torch.tensor(3.5))
    # 0.5 (e^-0.5 + 2 e + 4) + 0.5 (0.5 - 1 + 0)
    expected = 0.5 * (math.exp(-0.5) + 2 * math.e + 4) - 0.25
    assert_close(_uw_with([0.5, -1.0, 0.0])(L), torch.tensor(expected))
    assert_close(_uw_with([0.5, -1.0, 0.0])(L), torch.tensor(4.7715), rtol=0.0, atol=1e-4)


def test_gradients() -> None:
    s = [0.5, -1.0, 0.0]
    uw = _uw_with(s)
    values = L.clone().requires_grad_()
    uw(values).backward()
    s_t = torch.tensor(s)
    assert_close(values.grad, 0.5 * torch.exp(-s_t))
    assert_close(uw.log_var.grad, 0.5 * (1 - torch.exp(-s_t) * L))


def test_learns_log_of_the_losses() -> None:
    # For fixed L > 0, 0.5 e^-s L + 0.5 s is minimal at s = log L.
    losses = torch.tensor([0.5, 2.0, 8.0])
    uw = UW(3)
    optimizer = torch.optim.Adam(uw.parameters(), lr=0.05)
    for _ in range(600):
        optimizer.zero_grad()
        uw(losses).backward()
        optimizer.step()
    assert_close(uw.log_var.detach(), torch.log(losses), rtol=0.0, atol=1e-2)


def test_parameter() -> None:
    uw = UW(3)
    assert isinstance(uw.log_var, torch.nn.Parameter)
    assert uw.log_var.shape == (3,)
    assert list(uw.parameters()) == [uw.log_var]
    assert list(uw.state_dict()) == ["log_var"]
    assert UW((2, 3)).log_var.shape == (2, 3)
    assert UW(()).log_var.shape == ()
    assert UW(3).log_var.dtype == torch.get_default_dtype()


@pytest.mark.parametrize(
    ("shape", "values_shape"), [((5,), (4,)), ((5,), (5, 1)), ((3, 4), (4, 3))]
)
def test_shape_mismatch(shape: tuple[int, ...], values_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="shape"):
        UW(shape)(torch.ones(values_shape))


def test_scalar_shape() -> None:
    assert_close(UW(())(torch.tensor(4.0)), torch.tensor(2.0))


def test_negative_values_are_accepted() -> None:
    assert_close(UW(2)(torch.tensor([-1.0, -3.0])), torch.tensor(-2.0))


def test_one_sgd_step_changes_log_var_and_reset_zeros_it_in_place() -> None:
    uw = UW(2)
    optimizer = torch.optim.SGD(uw.parameters(), lr=0.1)
    uw(torch.tensor([2.0, 5.0])).backward()
    optimizer.step()
    # grad = 0.5 (1 - L) = [-0.5, -2]
    assert_close(uw.log_var.detach(), torch.tensor([0.05, 0.2]))
    parameter = uw.log_var
    uw.reset()
    assert uw.log_var is parameter
    assert torch.equal(uw.log_var.detach(), torch.zeros(2))


def test_float64_values_train_the_float32_parameter() -> None:
    uw = UW(2)
    out = uw(torch.tensor([2.0, 5.0], dtype=torch.float64))
    assert out.dtype == torch.float64
    out.backward()
    assert uw.log_var.grad is not None
    assert uw.log_var.grad.dtype == torch.float32
    assert torch.isfinite(uw.log_var.grad).all()


@pytest.mark.parametrize("shape", [-1, (2, -3), 2.5, "3"])
def test_invalid_shape_argument(shape: object) -> None:
    with pytest.raises((ValueError, TypeError), match="`shape`"):
        UW(shape)  # type: ignore[arg-type]


def test_repr_str() -> None:
    assert repr(UW(3)) == "UW(shape=(3,))"
    assert repr(UW((2, 3))) == "UW(shape=(2, 3))"
    assert str(UW(3)) == "UW"
